//! The agent's configuration (`fleet_agent::config`): EC2 user-data and `--set` flags merged
//! over the config file baked into the AMI (`ami/agent.toml`).
//!
//! Input: the user-data document, then optionally a NUL byte and `--set key=value` lines.
//!
//! Properties: nothing panics, whatever the layers say; a refusal is one line; an accepted config
//! has what the agent's start needs (its verify key, a CA and a token source, the instance id as
//! node id, its bundle limits), with the user-data's own values where it set them.

use fleet_agent::config::{flag_source, parse_source, resolve, Layers, UserData};

const AMI_CONFIG: &str = include_str!("../../ami/agent.toml");

pub fn run(data: &[u8]) {
    let (user_data, flags) = crate::split_at_byte(data, 0);
    let flags: Vec<String> = String::from_utf8_lossy(flags)
        .lines()
        .map(str::to_string)
        .collect();
    let flags = match flag_source(&flags) {
        Ok(t) => t,
        Err(e) => return crate::assert_one_line("--set", &e),
    };
    let layers = Layers {
        file: parse_source("ami/agent.toml", AMI_CONFIG).unwrap(),
        user_data: None,
        env: Default::default(),
        flags,
    };
    if let Err(e) = layers.imds() {
        crate::assert_one_line("imds", &e);
    }
    let ud = UserData::Imds {
        endpoint: "http://169.254.169.254".into(),
        instance_id: "i-0123456789abcdef0".into(),
        raw: Some(user_data.to_vec()),
    };
    let (cfg, note) = match resolve(layers.clone(), ud) {
        Ok(ok) => ok,
        Err(e) => return crate::assert_one_line("agent config", &e),
    };
    crate::assert_one_line("note", &note.unwrap_or_default());
    let _ = cfg.verify_key();
    let limits = cfg.limits();
    assert_eq!(limits.max_packed, cfg.max_bundle_bytes);
    assert!(cfg.ca_pem.is_some() || cfg.ca_file.is_some());
    assert!(cfg.token.is_some() || cfg.token_file.is_some());
    assert!(cfg.node_id.is_some(), "the instance id names the node");
    // The user-data's own controller wins over the file, and the flags over both.
    let text = std::str::from_utf8(user_data).unwrap();
    let ud = parse_source("user-data", text).unwrap();
    let want = layers
        .flags
        .get("controller")
        .or_else(|| ud.get("controller"));
    if let Some(toml::Value::String(url)) = want {
        assert_eq!(&cfg.controller, url);
    }
}
