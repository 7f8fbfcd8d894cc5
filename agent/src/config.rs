//! Agent configuration, merged from layered sources.
//!
//! Each source yields a TOML table; later layers override earlier ones key by key:
//! 1. the config file (`/etc/fleet/agent.toml`, baked into the AMI),
//! 2. user-data: `--user-data-file`, else EC2 user-data read over IMDSv2 when `imds` is true
//!    (a TOML document of these same keys; see `docs/user-data.md`),
//! 3. environment variables `FLEET_AGENT_<KEY>` (through the [`Env`] trait, so tests use a map),
//! 4. command-line `--set key=value`.
//!
//! Fetching a source is kept apart from parsing it: everything here works on strings and maps
//! (the network part is `crate::imds`; [`resolve`] decides what its outcome means).

use std::collections::BTreeMap;
use std::path::PathBuf;

use fleet_common::manifest::VerifyKey;
use serde::Deserialize;

/// Where the baked-in config lives. The AMI installs `ami/agent.toml` here, and the unit that
/// starts the agent, `ami/fleet-agent.service`, passes no `--config` so this path applies
/// (docs/ami.md).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/fleet/agent.toml";

/// Every key the agent understands. Unknown keys are refused so a typo is not silently ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `https://host:port` of the controller.
    pub controller: String,
    /// PEM of the fleet CA, inline (user-data carries it this way)...
    pub ca_pem: Option<String>,
    /// ...or a path to it.
    pub ca_file: Option<PathBuf>,
    /// The fleet's agent token, inline or in a file.
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// Base64 Ed25519 public key that bundles must be signed with.
    pub verify_key: String,
    /// The fleet this node belongs to: a manifest naming another fleet is refused. Unset:
    /// manifests of any fleet are taken, if signed with `verify_key`.
    pub fleet: Option<String>,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The id in heartbeats. Unset in every layer: the EC2 instance id when IMDS answered (with
    /// or without user-data), else the host name (`agent::default_node_id`).
    pub node_id: Option<String>,
    /// Whether to read user-data from IMDS at start. Only the file, env and flag layers decide
    /// it (see [`Layers::imds`]); `--user-data-file` replaces IMDS whatever it says.
    #[serde(default = "default_imds")]
    pub imds: bool,
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Locust workers to run; 0 means one per available CPU.
    #[serde(default)]
    pub workers: u32,
    /// The `locust` executable.
    #[serde(default = "default_locust")]
    pub locust: String,
    /// Replaces the whole worker command line. Placeholders: `{locustfile}`, `{bundle_dir}`,
    /// `{master_host}`, `{master_port}`, `{index}`. Used for stub workers in benchmarks.
    pub worker_command: Option<Vec<String>>,
    /// Variables of the agent's environment the workers also get, by name or `PREFIX*`, on
    /// top of `PATH`, `LANG`, `LC_*` and `TZ`. `AWS_*` and `FLEET_*` never pass
    /// (docs/security.md, "The spec author's reach").
    #[serde(default)]
    pub worker_env_allow: Vec<String>,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Longest wait for a new worker to join the master (hold a connection to it) before the
    /// old generation is stopped anyway; a worker that joins sooner ends the overlap sooner.
    #[serde(default = "default_join_grace_ms")]
    pub join_grace_ms: u64,
    /// SIGTERM to SIGKILL grace for a worker's process group.
    #[serde(default = "default_stop_grace_ms")]
    pub stop_grace_ms: u64,
    /// A bundle whose workers ran this long without crash-looping becomes the last good one.
    #[serde(default = "default_stable_ms")]
    pub stable_ms: u64,
    /// Worker exits within `stable_ms` of a bundle's start that count as a crash loop.
    #[serde(default = "default_crash_loop_exits")]
    pub crash_loop_exits: u32,
    /// Long-poll length asked of the controller, seconds.
    #[serde(default = "default_poll_wait_s")]
    pub poll_wait_s: u64,
    /// Power the node off after this long (seconds). Unset: never.
    pub max_lifetime_s: Option<u64>,
    #[serde(default = "default_poweroff")]
    pub poweroff_command: Vec<String>,
    /// Largest bundle accepted, bytes (packed).
    #[serde(default = "default_max_bundle")]
    pub max_bundle_bytes: u64,
    /// Largest bundle accepted once unpacked, bytes.
    #[serde(default = "default_max_unpacked")]
    pub max_unpacked_bytes: u64,
}

/// `StateDirectory=fleet-agent` in `ami/fleet-agent.service`: the one persistent place the
/// hardened unit lets the agent write.
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/fleet-agent")
}
fn default_imds() -> bool {
    true
}
fn default_backend() -> String {
    "static".into()
}
fn default_locust() -> String {
    "locust".into()
}
fn default_heartbeat_ms() -> u64 {
    5_000
}
fn default_join_grace_ms() -> u64 {
    10_000
}
fn default_stop_grace_ms() -> u64 {
    5_000
}
fn default_stable_ms() -> u64 {
    15_000
}
fn default_crash_loop_exits() -> u32 {
    3
}
fn default_poll_wait_s() -> u64 {
    60
}
fn default_poweroff() -> Vec<String> {
    vec!["systemctl".into(), "poweroff".into()]
}
fn default_max_bundle() -> u64 {
    fleet_common::bundle::Limits::default().max_packed
}
fn default_max_unpacked() -> u64 {
    fleet_common::bundle::Limits::default().max_unpacked
}

/// Read access to the process environment, so parsing is tested on a map.
pub trait Env {
    fn var(&self, key: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }
}

pub type Table = toml::Table;

/// Parses one TOML source; `what` names it in errors.
pub fn parse_source(what: &str, text: &str) -> Result<Table, String> {
    text.parse::<Table>()
        .map_err(|e| format!("{what}: {}", one_line(&e.to_string())))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A value given as text (env or flag): TOML syntax if it parses as a value, else a string.
fn loose_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

/// The `FLEET_AGENT_<KEY>` overrides for every known key.
pub fn env_source(env: &dyn Env) -> Table {
    let mut t = Table::new();
    for key in KEYS {
        if let Some(v) = env.var(&format!("FLEET_AGENT_{}", key.to_ascii_uppercase())) {
            t.insert((*key).into(), loose_value(&v));
        }
    }
    t
}

/// `--set key=value` overrides.
pub fn flag_source(sets: &[String]) -> Result<Table, String> {
    let mut t = Table::new();
    for s in sets {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("--set {s:?}: expected key=value"))?;
        t.insert(k.trim().into(), loose_value(v.trim()));
    }
    Ok(t)
}

const KEYS: &[&str] = &[
    "controller",
    "ca_pem",
    "ca_file",
    "token",
    "token_file",
    "verify_key",
    "fleet",
    "state_dir",
    "node_id",
    "imds",
    "backend",
    "workers",
    "locust",
    "worker_command",
    "worker_env_allow",
    "heartbeat_ms",
    "join_grace_ms",
    "stop_grace_ms",
    "stable_ms",
    "crash_loop_exits",
    "poll_wait_s",
    "max_lifetime_s",
    "poweroff_command",
    "max_bundle_bytes",
    "max_unpacked_bytes",
];

/// Merges layers in order (later wins) and validates the result.
pub fn merge(layers: &[Table]) -> Result<Config, String> {
    let mut merged = Table::new();
    for l in layers {
        for (k, v) in l {
            merged.insert(k.clone(), v.clone());
        }
    }
    let cfg: Config = toml::Value::Table(merged)
        .try_into()
        .map_err(|e: toml::de::Error| format!("agent config: {}", one_line(e.message())))?;
    cfg.validate()?;
    Ok(cfg)
}

/// A user-data document (from IMDS or `--user-data-file`) as a config layer; `what` names its
/// source in errors. It must be UTF-8 TOML: a shell script or a gzip'd document is refused.
pub fn parse_user_data(what: &str, raw: &[u8]) -> Result<Table, String> {
    let text = std::str::from_utf8(raw).map_err(|_| {
        format!("user-data from {what} is not UTF-8 text; it must be a TOML agent config (docs/user-data.md)")
    })?;
    text.parse::<Table>().map_err(|e| {
        format!(
            "user-data from {what} is not a TOML agent config (docs/user-data.md): {}",
            one_line(&e.to_string())
        )
    })
}

/// The layers before merging. `user_data` is filled from `--user-data-file` or IMDS.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    pub file: Table,
    pub user_data: Option<Table>,
    pub env: Table,
    pub flags: Table,
}

impl Layers {
    /// Whether to read user-data from IMDS: the `imds` key from the file, env and flag layers
    /// (later wins), default true. User-data cannot decide it: it is what would be fetched.
    pub fn imds(&self) -> Result<bool, String> {
        let v = [&self.flags, &self.env, &self.file]
            .into_iter()
            .find_map(|t| t.get("imds"));
        match v {
            None => Ok(default_imds()),
            Some(toml::Value::Boolean(b)) => Ok(*b),
            Some(other) => Err(format!(
                "agent config: imds must be true or false, not {other}"
            )),
        }
    }

    /// Merges file, user-data, env and flags. `instance_id` (IMDS answered) is the `node_id`
    /// when no layer sets one.
    pub fn merge(&self, instance_id: Option<&str>) -> Result<Config, String> {
        let mut layers = vec![self.file.clone()];
        layers.extend(self.user_data.clone());
        layers.push(self.env.clone());
        layers.push(self.flags.clone());
        let mut cfg = merge(&layers)?;
        if cfg.node_id.is_none() {
            cfg.node_id = instance_id.map(str::to_string);
        }
        Ok(cfg)
    }
}

/// How the user-data step went, reduced to what merging needs.
#[derive(Debug, Clone)]
pub enum UserData {
    /// `--user-data-file` was given, or `imds = false`: nothing (more) to add.
    NotFetched,
    /// IMDS answered; `raw` is `None` when the instance has no user-data (404).
    Imds {
        endpoint: String,
        instance_id: String,
        raw: Option<Vec<u8>>,
    },
    /// IMDS could not be used (unreachable after the retries, or turned off): the error line.
    Unavailable(String),
}

/// The merged config, plus one line worth logging about where user-data came from.
///
/// - IMDS answered: its user-data (if any) is the user-data layer, and the instance id the
///   default `node_id`. User-data that is not UTF-8 TOML is an error, never skipped.
/// - IMDS unavailable: if the other layers alone make a valid config, that config and a line
///   saying so; otherwise an error naming the endpoint and what is missing.
pub fn resolve(mut layers: Layers, ud: UserData) -> Result<(Config, Option<String>), String> {
    match ud {
        UserData::NotFetched => Ok((layers.merge(None)?, None)),
        UserData::Imds {
            endpoint,
            instance_id,
            raw,
        } => {
            let note = match &raw {
                Some(raw) => {
                    let what = format!("IMDS {endpoint}");
                    layers.user_data = Some(parse_user_data(&what, raw)?);
                    format!(
                        "instance {instance_id}: {} bytes of user-data from IMDS {endpoint}",
                        raw.len()
                    )
                }
                None => format!("instance {instance_id}: no user-data at IMDS {endpoint}"),
            };
            let cfg = layers.merge(Some(&instance_id)).map_err(|e| match raw {
                Some(_) => e,
                None => {
                    format!("{e} (and IMDS {endpoint} has no user-data for instance {instance_id})")
                }
            })?;
            Ok((cfg, Some(note)))
        }
        UserData::Unavailable(why) => match layers.merge(None) {
            Ok(cfg) => Ok((
                cfg,
                Some(format!(
                    "{why}; continuing without user-data (the other config layers are complete)"
                )),
            )),
            Err(e) => Err(format!("{why}; user-data is needed: {e}")),
        },
    }
}

impl Config {
    fn validate(&self) -> Result<(), String> {
        if !self.controller.starts_with("https://") {
            return Err(format!(
                "agent config: controller {:?} must be an https:// URL (fleet has no plaintext listener)",
                self.controller
            ));
        }
        VerifyKey::from_base64(&self.verify_key)
            .map_err(|e| format!("agent config: verify_key: {e}"))?;
        fleet_common::client::parse_base_url(&self.controller)
            .map_err(|e| format!("agent config: controller: {e}"))?;
        if self.ca_pem.is_none() && self.ca_file.is_none() {
            return Err("agent config: set ca_pem or ca_file (the fleet CA that signed the controller's certificate)".into());
        }
        if self.token.is_none() && self.token_file.is_none() {
            return Err("agent config: set token or token_file (the fleet's agent token)".into());
        }
        if self.fleet.as_deref().is_some_and(|f| f.trim().is_empty()) {
            return Err(
                "agent config: fleet must not be empty (unset it to take any fleet's manifests)"
                    .into(),
            );
        }
        if let Some(cmd) = &self.worker_command {
            if cmd.is_empty() {
                return Err("agent config: worker_command must not be empty".into());
            }
        }
        if self.poweroff_command.is_empty() {
            return Err("agent config: poweroff_command must not be empty".into());
        }
        fleet_common::child_env::check_allow(
            "agent config: worker_env_allow",
            &self.worker_env_allow,
        )?;
        Ok(())
    }

    pub fn verify_key(&self) -> VerifyKey {
        VerifyKey::from_base64(&self.verify_key).expect("validated")
    }

    pub fn ca_pem(&self) -> Result<String, String> {
        match (&self.ca_pem, &self.ca_file) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map_err(|e| format!("cannot read ca_file {}: {e}", f.display())),
            (None, None) => unreachable!("validated"),
        }
    }

    pub fn token(&self) -> Result<String, String> {
        match (&self.token, &self.token_file) {
            (Some(t), _) => Ok(t.trim().to_string()),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("cannot read token_file {}: {e}", f.display())),
            (None, None) => unreachable!("validated"),
        }
    }

    pub fn worker_count(&self) -> u32 {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
        }
    }

    pub fn limits(&self) -> fleet_common::bundle::Limits {
        fleet_common::bundle::Limits {
            max_packed: self.max_bundle_bytes,
            max_unpacked: self.max_unpacked_bytes,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    fn file() -> Table {
        parse_source(
            "file",
            &format!(
                "controller = \"https://10.0.0.1:8443\"\nca_file = \"/etc/fleet/ca.pem\"\ntoken_file = \"/etc/fleet/token\"\nverify_key = \"{KEY}\"\nworkers = 2\n"
            ),
        )
        .unwrap()
    }

    #[test]
    fn later_layers_override_earlier_ones() {
        let user_data = parse_source(
            "user-data",
            "controller = \"https://10.0.0.9:8443\"\nworkers = 4\nfleet = \"checkout\"\n",
        )
        .unwrap();
        let mut env = BTreeMap::new();
        env.insert("FLEET_AGENT_WORKERS".to_string(), "8".to_string());
        env.insert("FLEET_AGENT_NODE_ID".to_string(), "node-1".to_string());
        env.insert("UNRELATED".to_string(), "x".to_string());
        let flags = flag_source(&[
            "join_grace_ms=250".into(),
            "worker_command=[\"sleep\", \"1000\"]".into(),
        ])
        .unwrap();
        let cfg = merge(&[file(), user_data, env_source(&env), flags]).unwrap();
        assert_eq!(cfg.controller, "https://10.0.0.9:8443");
        assert_eq!(cfg.workers, 8);
        assert_eq!(cfg.node_id.as_deref(), Some("node-1"));
        assert_eq!(cfg.join_grace_ms, 250);
        assert_eq!(
            cfg.worker_command,
            Some(vec!["sleep".to_string(), "1000".to_string()])
        );
        assert_eq!(cfg.heartbeat_ms, 5_000);
        assert_eq!(cfg.fleet.as_deref(), Some("checkout"));
        assert_eq!(merge(&[file()]).unwrap().fleet, None, "no fleet by default");
    }

    #[test]
    fn bad_configs_are_one_clear_line() {
        let e = merge(&[parse_source("f", "controller = \"http://x\"").unwrap()]).unwrap_err();
        assert!(e.contains("verify_key") || e.contains("missing"), "{e}");
        let mut t = file();
        t.insert("controller".into(), "http://10.0.0.1:8080".into());
        assert!(merge(&[t]).unwrap_err().contains("https://"));
        let mut t = file();
        t.insert("wrokers".into(), 3.into());
        let e = merge(&[t]).unwrap_err();
        assert!(e.contains("wrokers") && !e.contains('\n'), "{e}");
        let mut t = file();
        t.remove("token_file");
        assert!(merge(&[t]).unwrap_err().contains("token"));
        assert!(parse_source("user-data", "controller = ")
            .unwrap_err()
            .starts_with("user-data:"));
        assert!(flag_source(&["novalue".into()]).is_err());
        let mut t = file();
        t.insert("worker_env_allow".into(), vec!["FLEET_AGENT_TOKEN"].into());
        let e = merge(&[t]).unwrap_err();
        assert!(e.starts_with("agent config: worker_env_allow: "), "{e}");
        let mut t = file();
        t.insert("fleet".into(), "".into());
        assert!(merge(&[t]).unwrap_err().contains("fleet must not be empty"));
    }

    #[test]
    fn imds_is_decided_by_file_env_and_flags_only() {
        let mut l = Layers {
            file: file(),
            ..Layers::default()
        };
        assert!(l.imds().unwrap(), "on by default");
        l.file.insert("imds".into(), false.into());
        assert!(!l.imds().unwrap());
        let mut env = BTreeMap::new();
        env.insert("FLEET_AGENT_IMDS".to_string(), "true".to_string());
        l.env = env_source(&env);
        assert!(l.imds().unwrap(), "env overrides the file");
        l.flags = flag_source(&["imds=false".into()]).unwrap();
        assert!(!l.imds().unwrap(), "flags override env");
        l.flags = flag_source(&["imds=yes".into()]).unwrap();
        assert!(l.imds().unwrap_err().contains("imds must be true or false"));
        // User-data cannot turn off its own fetch; in user-data the key is accepted and moot.
        let l = Layers {
            file: file(),
            user_data: Some(parse_source("u", "imds = false").unwrap()),
            ..Layers::default()
        };
        assert!(l.imds().unwrap());
        assert!(!l.merge(None).unwrap().imds);
    }

    #[test]
    fn resolve_layers_user_data_and_the_instance_id() {
        let base = Layers {
            file: file(),
            ..Layers::default()
        };
        let (cfg, note) = resolve(base.clone(), UserData::NotFetched).unwrap();
        assert_eq!((cfg.node_id, note), (None, None));

        let ud = UserData::Imds {
            endpoint: "http://169.254.169.254".into(),
            instance_id: "i-0abc".into(),
            raw: Some(b"workers = 6\n".to_vec()),
        };
        let (cfg, note) = resolve(base.clone(), ud).unwrap();
        assert_eq!(cfg.node_id.as_deref(), Some("i-0abc"));
        assert_eq!(cfg.workers, 6);
        assert!(note.unwrap().contains("i-0abc"));

        // IMDS answered without user-data: the instance id still names the node.
        let ud = UserData::Imds {
            endpoint: "http://169.254.169.254".into(),
            instance_id: "i-0abc".into(),
            raw: None,
        };
        let (cfg, _) = resolve(base.clone(), ud.clone()).unwrap();
        assert_eq!(cfg.node_id.as_deref(), Some("i-0abc"));
        assert_eq!(cfg.workers, 2);
        let e = resolve(Layers::default(), ud).unwrap_err();
        assert!(e.ends_with("has no user-data for instance i-0abc)"), "{e}");

        let gone = || UserData::Unavailable("IMDS at http://169.254.169.254 unreachable".into());
        let (cfg, note) = resolve(base, gone()).unwrap();
        assert_eq!(cfg.node_id, None);
        assert!(note.unwrap().contains("continuing without user-data"));
        let e = resolve(Layers::default(), gone()).unwrap_err();
        assert!(
            e.starts_with(
                "IMDS at http://169.254.169.254 unreachable; user-data is needed: agent config:"
            ),
            "{e}"
        );

        let e = parse_user_data("/tmp/ud", &[0x1f, 0x8b, 0x08, 0xff]).unwrap_err();
        assert!(e.contains("/tmp/ud") && e.contains("not UTF-8"), "{e}");
    }
}
