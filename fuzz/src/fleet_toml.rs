//! The controller's `fleet.toml` (`fleet::config::Fleet::load`) and the user-data it renders for
//! its nodes (`fleet::backend::user_data::render`), read back by the agent's parser.
//!
//! Input: the text of `fleet.toml`.
//!
//! Properties: loading never panics and refuses in one line; an accepted config gives the node
//! table's bounds, serialises, and loads again to the same thing; the user-data rendered from it
//! is TOML the agent parses, naming the same controller, token and verify key (unless
//! `ec2.agent_settings` overrides them, which it may).

use std::fs;
use std::path::Path;

use fleet::config::{Fleet, CONFIG_FILE};

const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
const TOKEN: &str = "agent-token-0123456789";
const VERIFY_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

/// A fleet directory with the files `render` reads; made once per process.
fn fleet_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = crate::scratch().join("fleet");
        fs::create_dir_all(d.join("certs")).unwrap();
        fs::create_dir_all(d.join("secrets")).unwrap();
        fs::write(d.join("certs/ca.pem"), CA).unwrap();
        fs::write(d.join("secrets/agent.token"), format!("{TOKEN}\n")).unwrap();
        fs::write(d.join("verify.key"), format!("{VERIFY_KEY}\n")).unwrap();
        d
    })
}

fn load(dir: &Path, text: &[u8]) -> anyhow::Result<Fleet> {
    fs::write(dir.join(CONFIG_FILE), text).unwrap();
    Fleet::load(dir)
}

pub fn run(data: &[u8]) {
    let dir = fleet_dir();
    let fleet = match load(dir, data) {
        Ok(f) => f,
        Err(e) => return crate::assert_one_line("fleet.toml", &format!("{e:#}")),
    };
    let c = &fleet.config;
    let _ = c.controller.node_limits();
    let text = toml::to_string(c).expect("a loaded fleet.toml serialises");
    let again = load(dir, text.as_bytes())
        .unwrap_or_else(|e| panic!("a serialised fleet.toml does not load: {e:#}\n{text}"));
    assert_eq!(
        toml::to_string(&again.config).unwrap(),
        text,
        "fleet.toml changes in a round trip"
    );
    let rendered = match fleet::backend::user_data::render(&fleet, "ec2") {
        Ok(r) => r,
        Err(e) => return crate::assert_one_line("user-data", &format!("{e:#}")),
    };
    let ud = fleet_agent::config::parse_user_data("rendered", rendered.as_bytes())
        .unwrap_or_else(|e| panic!("the agent cannot parse rendered user-data: {e}"));
    let settings = &c.ec2.agent_settings;
    for (key, want) in [
        ("controller", c.controller.url.as_str()),
        ("token", TOKEN),
        ("verify_key", VERIFY_KEY),
        ("ca_pem", CA),
        ("backend", "ec2"),
    ] {
        if !settings.contains_key(key) {
            assert_eq!(ud.get(key).and_then(|v| v.as_str()), Some(want), "{key}");
        }
    }
}
