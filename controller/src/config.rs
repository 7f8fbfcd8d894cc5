//! `fleet.toml` and the layout of a fleet directory.
//!
//! A fleet directory holds everything one fleet needs (docs/security.md lists what is secret):
//! ```text
//! fleet.toml
//! spec/                      the Locust spec the controller publishes
//! certs/ca.pem ca.key        the fleet CA (key 0600)
//! certs/server.pem server.key
//! secrets/signing.pk8        Ed25519 bundle-signing key (0600)
//! secrets/agent.token        agents' bearer token (0600)
//! secrets/operator.token     the CLI's bearer token, human rights (0600)
//! secrets/ui.hash            PBKDF2 hash of the web UI password (0600)
//! verify.key                 the public half of signing.pk8, base64 (not secret)
//! state/                     the controller's published history and master state
//! local/                     nodes of the `local` backend
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const CONFIG_FILE: &str = "fleet.toml";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// The fleet's name: the `fleet` tag on every instance, and the manifest's `fleet` field.
    /// [`check_name`]: a conservative charset, because EC2 filters treat `*` and `?` as wildcards.
    pub name: String,
    /// The fleet's random id: the `fleet-id` tag on everything it makes on AWS, so that two
    /// fleets with the same name never touch each other's resources. `fleet init` writes it; a
    /// fleet.toml without one gets one on first need ([`Fleet::ensure_id`]), and an id that is
    /// there is never changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub controller: ControllerConfig,
    #[serde(default)]
    pub master: MasterConfig,
    #[serde(default)]
    pub agents: AgentsConfig,
    #[serde(default)]
    pub local: LocalConfig,
    #[serde(default)]
    pub ec2: Ec2Config,
    #[serde(default)]
    pub asg: AsgConfig,
    #[serde(default)]
    pub scale: ScaleConfig,
    #[serde(default)]
    pub nginx: NginxConfig,
    #[serde(default)]
    pub run: RunConfig,
    #[serde(default)]
    pub spec: SpecConfig,
}

/// Defaults for `fleet run` (docs/run.md).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Thresholds that fail a run, in `--fail-on`'s syntax; `--fail-on` replaces them.
    #[serde(default)]
    pub fail_on: Vec<String>,
}

/// The validation gate every new spec passes before it is published (docs/configuration.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecConfig {
    /// Load each new spec with `locust --list` before publishing it; `false` publishes specs
    /// unchecked (for specs that import what only the nodes have).
    #[serde(default = "yes")]
    pub validate: bool,
    /// How long loading one spec may take.
    #[serde(default = "default_validate_timeout_s")]
    pub validate_timeout_s: f64,
    /// The `locust` that checks specs; default `master.locust` when the master is managed. With
    /// an external master and no value here, the gate is off.
    pub locust: Option<String>,
}

impl Default for SpecConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

fn default_validate_timeout_s() -> f64 {
    20.0
}

/// The optional nginx front that `fleet nginx` renders (docs/nginx.md). Every field is optional;
/// command-line flags override these.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NginxConfig {
    /// Where nginx listens for HTTPS: `ADDR:PORT` or a port. Default 443.
    pub listen: Option<String>,
    /// nginx's `server_name`. Default `_` (any).
    pub server_name: Option<String>,
    /// Certificate chain and key nginx serves. Default the fleet's `certs/server.pem`/`.key`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Output directory. Default `nginx/` in the fleet directory.
    pub out_dir: Option<PathBuf>,
    /// The controller nginx proxies to, `https://host:port`. Default `controller.url`.
    pub upstream: Option<String>,
    /// The name nginx expects in the controller's certificate. Default: the upstream's host if
    /// it is a name, else `localhost` (or another DNS name in `controller.cert_names`).
    pub upstream_name: Option<String>,
    /// Also listen on this address (e.g. `80`) for plain HTTP that only redirects to https.
    pub redirect_http: Option<String>,
    /// The account nginx's workers run as when nginx starts as root. Default `www-data`.
    pub user: Option<String>,
    /// A template to render instead of the built-in `nginx/fleet.conf.template`.
    pub template: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleConfig {
    /// Safety cap: `fleet scale` refuses more nodes than this on any backend.
    #[serde(default = "default_max_nodes")]
    pub max_nodes: usize,
    /// The backend of `scale`, `down`, `status` and `run --nodes` when `--backend` is not
    /// given; unset: `local`.
    #[serde(default)]
    pub backend: Option<crate::cli::BackendArg>,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        ScaleConfig {
            max_nodes: default_max_nodes(),
            backend: None,
        }
    }
}

fn default_max_nodes() -> usize {
    1000
}

/// What EC2 nodes are made of (`ec2` and `asg` backends). See docs/ec2.md.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ec2Config {
    /// Region; unset: the standard chain (`AWS_REGION`, profile).
    pub region: Option<String>,
    /// An EC2/Auto Scaling endpoint other than AWS's (tests: moto behind the emulator).
    pub endpoint_url: Option<String>,
    /// The AMI with the agent baked in (packer/ writes it).
    #[serde(default)]
    pub ami: String,
    /// Instance types in order of preference; capacity errors fall over to the next.
    #[serde(default)]
    pub instance_types: Vec<String>,
    /// Subnets to spread over (their AZs); capacity errors fall over to the others.
    #[serde(default)]
    pub subnets: Vec<String>,
    #[serde(default)]
    pub security_groups: Vec<String>,
    pub key_name: Option<String>,
    /// Instance profile name or ARN.
    pub instance_profile: Option<String>,
    /// Spot instances (one-time, terminate on interruption).
    #[serde(default)]
    pub spot: bool,
    /// Agents power their node off after this long (the instance then terminates).
    pub max_lifetime_s: Option<u64>,
    /// Most instances asked of one RunInstances call.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Speeds up the client-side buckets to match a time-scaled emulator. 1.0 for AWS.
    #[serde(default = "default_time_scale")]
    pub time_scale: f64,
    /// Extra agent settings written into the user-data (e.g. `workers`).
    #[serde(default)]
    pub agent_settings: toml::Table,
}

impl Default for Ec2Config {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

fn default_max_batch() -> usize {
    500
}
fn default_time_scale() -> f64 {
    1.0
}

/// The `asg` backend's group (its instances are made from `[ec2]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsgConfig {
    /// Group name; default `fleet-<name>`. The launch template gets the same name.
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// Address `fleet serve` binds (HTTPS only).
    pub listen: SocketAddr,
    /// The URL agents and the CLI use; its host must be in the server certificate.
    pub url: String,
    /// Names and addresses the server certificate is issued for.
    pub cert_names: Vec<String>,
    #[serde(default = "default_spec_dir")]
    pub spec_dir: PathBuf,
    #[serde(default = "default_locustfile")]
    pub locustfile: String,
    /// Quiet time after the last change in the spec directory before a bundle is published.
    #[serde(default = "default_debounce_ms")]
    pub debounce_ms: u64,
    /// Published versions kept (bundles on disk and in memory).
    #[serde(default = "default_history")]
    pub history: usize,
    #[serde(default = "default_max_bundle")]
    pub max_bundle_bytes: u64,
    /// Failed authentications one client address may make in a burst...
    #[serde(default = "default_fail_burst")]
    pub auth_fail_burst: f64,
    /// ...and how many more it is allowed per second after that.
    #[serde(default = "default_fail_refill")]
    pub auth_fail_refill_per_s: f64,
    /// Proxies (addresses or networks) whose `X-Real-IP` header names the client, such as the
    /// nginx front. From any other peer the header is ignored.
    #[serde(default)]
    pub trusted_proxies: Vec<crate::daemon::Cidr>,
    /// Client connections served at once; 0 derives it from the open-files limit
    /// (`listener::connection_cap`). A value can only lower the derived cap.
    #[serde(default)]
    pub max_connections: usize,
    /// Most nodes the controller keeps a heartbeat of; a new node beyond it is answered 503.
    #[serde(default = "default_max_nodes_tracked")]
    pub max_nodes_tracked: usize,
    /// A node silent this long is forgotten, unless the backend still listed it the last time
    /// `fleet scale` or `fleet status` looked.
    #[serde(default = "default_forget_silent_after_s")]
    pub forget_silent_after_s: u64,
}

impl ControllerConfig {
    /// The node table's bounds.
    pub fn node_limits(&self) -> crate::daemon::NodeLimits {
        crate::daemon::NodeLimits {
            max_nodes: self.max_nodes_tracked.max(1),
            forget_silent_after: std::time::Duration::from_secs(self.forget_silent_after_s),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterConfig {
    /// Run and supervise the Locust master; `false` points agents at an external one.
    #[serde(default = "yes")]
    pub managed: bool,
    /// The `locust` executable for the managed master.
    #[serde(default = "default_locust")]
    pub locust: String,
    /// Where the master's ZMQ port binds. It is unencrypted: keep it inside the VPC.
    #[serde(default = "default_bind_host")]
    pub bind_host: String,
    /// The address workers are told to connect to.
    #[serde(default = "default_bind_host")]
    pub host: String,
    #[serde(default = "default_master_port")]
    pub port: u16,
    /// The master's web UI, reverse-proxied under `/locust/` (loopback for a managed master).
    #[serde(default = "default_web_url")]
    pub web_url: String,
    /// Extra arguments for the managed master.
    #[serde(default)]
    pub args: Vec<String>,
    /// Variables of the controller's environment the master also gets, by name or `PREFIX*`
    /// (docs/security.md, "The spec author's reach"). `AWS_*` and `FLEET_*` never pass.
    #[serde(default, deserialize_with = "crate::master::env_allow")]
    pub env_allow: Vec<String>,
    /// The account the master runs as when `fleet serve` runs as root.
    #[serde(default = "default_master_user")]
    pub user: String,
    /// Keep the master out of the fleet's secrets (separate user, Landlock); `false` only
    /// clears its environment.
    #[serde(default = "yes")]
    pub confine: bool,
    /// Longest wait for the web UI's answer through the `/locust/` proxy, then `504`.
    #[serde(default = "default_proxy_timeout_s")]
    pub proxy_timeout_s: u64,
    /// Workers one master should carry (docs/architecture-master.md, "Shards").
    #[serde(default = "default_capacity")]
    pub capacity: u64,
    /// How many masters run: a number, or `"auto"` for enough of `capacity` each.
    #[serde(default)]
    pub shards: crate::master::capacity::Shards,
}

fn default_capacity() -> u64 {
    crate::master::capacity::DEFAULT_CAPACITY
}

fn default_master_user() -> String {
    "nobody".into()
}

fn default_proxy_timeout_s() -> u64 {
    30
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsConfig {
    /// Extra arguments for every worker (in the signed manifest).
    #[serde(default)]
    pub worker_args: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// The agent binary; empty means `fleet-agent` next to the `fleet` binary, then `$PATH`.
    #[serde(default)]
    pub agent_bin: String,
    /// Workers per local agent (0: one per CPU).
    #[serde(default = "one")]
    pub workers: u32,
    /// The `locust` the local agents run.
    #[serde(default = "default_locust")]
    pub locust: String,
    /// Replaces the worker command line (stub workers for benchmarks).
    #[serde(default)]
    pub worker_command: Option<Vec<String>>,
    /// Extra `key = value` agent settings, written into each local agent's config.
    #[serde(default)]
    pub agent_settings: toml::Table,
}

fn yes() -> bool {
    true
}
fn one() -> u32 {
    1
}
fn default_spec_dir() -> PathBuf {
    PathBuf::from("spec")
}
fn default_locustfile() -> String {
    "locustfile.py".into()
}
fn default_debounce_ms() -> u64 {
    150
}
fn default_history() -> usize {
    20
}
fn default_max_bundle() -> u64 {
    fleet_common::bundle::Limits::default().max_packed
}
fn default_fail_burst() -> f64 {
    crate::daemon::FAIL_BURST
}
fn default_fail_refill() -> f64 {
    crate::daemon::FAIL_REFILL_PER_S
}
fn default_max_nodes_tracked() -> usize {
    crate::daemon::DEFAULT_MAX_NODES
}
fn default_forget_silent_after_s() -> u64 {
    crate::daemon::DEFAULT_FORGET_SILENT_AFTER.as_secs()
}
fn default_locust() -> String {
    "locust".into()
}
fn default_bind_host() -> String {
    "127.0.0.1".into()
}
fn default_master_port() -> u16 {
    5557
}
fn default_web_url() -> String {
    "http://127.0.0.1:8089/locust".into()
}

impl Default for MasterConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

impl Default for LocalConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// A fleet directory and its parsed `fleet.toml`.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub dir: PathBuf,
    pub config: FleetConfig,
}

impl Fleet {
    pub fn load(dir: &Path) -> Result<Fleet> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}; run `fleet init` there first or pass --dir",
                path.display()
            )
        })?;
        let config: FleetConfig = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: {}",
                path.display(),
                e.message().split_whitespace().collect::<Vec<_>>().join(" ")
            )
        })?;
        check_name(&config.name).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if let Some(id) = &config.id {
            check_id(id).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
        if !config.controller.url.starts_with("https://") {
            bail!(
                "{}: controller.url must be https:// (fleet has no plaintext listener)",
                path.display()
            );
        }
        fleet_common::client::parse_base_url(&config.controller.url)
            .map_err(|e| anyhow::anyhow!("{}: controller.url: {e}", path.display()))?;
        // Absolute, so children started in other directories (agents, the master) find things.
        let dir = std::fs::canonicalize(dir)
            .with_context(|| format!("cannot resolve {}", dir.display()))?;
        Ok(Fleet { dir, config })
    }

    /// The fleet's id, written into fleet.toml first if it has none (a fleet made before ids).
    /// The line goes in at the top, so the operator's comments and layout stay as they are; an
    /// id that is there is returned as is, never replaced.
    pub fn ensure_id(&self) -> Result<String> {
        if let Some(id) = &self.config.id {
            return Ok(id.clone());
        }
        let path = self.dir.join(CONFIG_FILE);
        let text = self.read(&path)?;
        let (with_id, id) = add_id(&text, &new_id())?;
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, &with_id)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .with_context(|| format!("cannot write the fleet id into {}", path.display()))?;
        log!(
            "{} had no fleet id; it has id = {id:?} now. Instances, groups and templates made before carry no fleet-id tag and fleet leaves them alone (docs/ec2.md, \"Fleet id\")",
            path.display()
        );
        Ok(id)
    }

    fn rel(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    pub fn spec_dir(&self) -> PathBuf {
        self.rel(&self.config.controller.spec_dir)
    }
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.join("certs/ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("certs/ca.key")
    }
    pub fn server_pem(&self) -> PathBuf {
        self.dir.join("certs/server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("certs/server.key")
    }
    pub fn signing_key(&self) -> PathBuf {
        self.dir.join("secrets/signing.pk8")
    }
    pub fn verify_key(&self) -> PathBuf {
        self.dir.join("verify.key")
    }
    pub fn agent_token(&self) -> PathBuf {
        self.dir.join("secrets/agent.token")
    }
    pub fn operator_token(&self) -> PathBuf {
        self.dir.join("secrets/operator.token")
    }
    pub fn ui_hash(&self) -> PathBuf {
        self.dir.join("secrets/ui.hash")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn local_dir(&self) -> PathBuf {
        self.dir.join("local")
    }

    pub fn read(&self, p: &Path) -> Result<String> {
        std::fs::read_to_string(p).with_context(|| {
            format!(
                "cannot read {}; is this a fleet directory made by `fleet init`?",
                p.display()
            )
        })
    }

    /// An HTTPS client for the controller with the operator's credentials.
    pub fn operator_client(&self) -> Result<fleet_common::client::Client> {
        let ca = self.read(&self.ca_pem())?;
        let token = self.read(&self.operator_token())?;
        fleet_common::client::Client::new(
            &self.config.controller.url,
            &ca,
            Some(&format!("Bearer {}", token.trim())),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// Longest fleet name: room for `fleet-` prefixes in Auto Scaling group and template names.
pub const MAX_NAME: usize = 32;
const MAX_ID: usize = 64;

/// Lower-case letters, digits and `-`, starting with a letter or digit: nothing an EC2 filter
/// reads as a wildcard (`*`, `?`), nothing that needs quoting in a tag, a name or a shell.
fn conservative(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

/// Checks a fleet name (`fleet init --name`, `name` in fleet.toml).
pub fn check_name(name: &str) -> Result<()> {
    if !conservative(name, MAX_NAME) {
        bail!("fleet name {name:?} is not allowed: use 1 to {MAX_NAME} of a-z, 0-9 and '-', starting with a letter or digit");
    }
    Ok(())
}

/// Checks a fleet id (`id` in fleet.toml): the same charset as names, up to 64 (a UUID fits).
pub fn check_id(id: &str) -> Result<()> {
    if !conservative(id, MAX_ID) {
        bail!("fleet id {id:?} is not allowed: use 1 to {MAX_ID} of a-z, 0-9 and '-' (`fleet init` makes one)");
    }
    Ok(())
}

/// A new random fleet id: 16 hex digits (64 bits).
pub fn new_id() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("system RNG failed");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// fleet.toml's text with `id = "<id>"` added before its first line that is not a comment:
/// a top-level key must come before the first table. Refuses a text that already has an id.
fn add_id(text: &str, id: &str) -> Result<(String, String)> {
    let parsed: toml::Table = text.parse().context("fleet.toml does not parse")?;
    if parsed.contains_key("id") {
        bail!("fleet.toml already has an id; fleet never replaces one");
    }
    let mut out = String::with_capacity(text.len() + 40);
    let mut placed = false;
    for line in text.split_inclusive('\n') {
        if !placed && !line.trim_start().starts_with('#') {
            out.push_str(&format!("id = {id:?}\n"));
            placed = true;
        }
        out.push_str(line);
    }
    if !placed {
        out.push_str(&format!("\nid = {id:?}\n"));
    }
    let back: FleetConfig =
        toml::from_str(&out).context("fleet.toml with the new id does not parse")?;
    debug_assert_eq!(back.id.as_deref(), Some(id));
    Ok((out, id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_in_and_typos_are_refused() {
        let t = "name = \"x\"\n[controller]\nlisten = \"127.0.0.1:8443\"\nurl = \"https://127.0.0.1:8443\"\ncert_names = [\"127.0.0.1\"]\n";
        let c: FleetConfig = toml::from_str(t).unwrap();
        assert_eq!(c.master.port, 5557);
        assert!(c.master.managed);
        assert_eq!(c.local.workers, 1);
        assert_eq!(
            c.controller.node_limits(),
            crate::daemon::NodeLimits::default()
        );
        let bad = format!("{t}[master]\nprot = 1\n");
        assert!(toml::from_str::<FleetConfig>(&bad).is_err());
        assert!(c.controller.trusted_proxies.is_empty());
    }

    #[test]
    fn trusted_proxies_are_addresses_or_networks() {
        let t = "name = \"x\"\n[controller]\nlisten = \"127.0.0.1:8443\"\nurl = \"https://127.0.0.1:8443\"\ncert_names = [\"127.0.0.1\"]\n";
        let ok = format!("{t}trusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\", \"::1\"]\n");
        let c: FleetConfig = toml::from_str(&ok).unwrap();
        assert_eq!(c.controller.trusted_proxies.len(), 3);
        assert!(c.controller.trusted_proxies[1].contains("10.2.3.4".parse().unwrap()));
        let bad = format!("{t}trusted_proxies = [\"nginx.local\"]\n");
        let e = toml::from_str::<FleetConfig>(&bad).unwrap_err().to_string();
        assert!(e.contains("\"nginx.local\" is not an IP address"), "{e}");
    }

    #[test]
    fn names_and_ids_use_a_charset_no_filter_reads_as_a_pattern() {
        for ok in ["fleet", "e2e", "load-test-2", "0abc", &"a".repeat(32)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "load*",
            "lo?d",
            "Load",
            "load_test",
            "-load",
            "a b",
            "ł",
            &"a".repeat(33),
        ] {
            let e = check_name(bad).unwrap_err().to_string();
            assert!(e.contains("a-z, 0-9 and '-'"), "{bad}: {e}");
            assert_eq!(e.lines().count(), 1);
        }
        assert!(check_id("0123456789abcdef").is_ok());
        assert!(check_id("6f1c2b1e-1b7a-4b0e-9c1d-2b7f2f0a9e11").is_ok());
        assert!(check_id("abc*").is_err());
        assert!(check_id("").is_err());
        let a = new_id();
        assert_eq!(a.len(), 16);
        assert!(check_id(&a).is_ok());
        assert_ne!(a, new_id());
    }

    #[test]
    fn an_id_is_added_at_the_top_and_never_replaced() {
        let t = "# my fleet\n# notes\nname = \"x\"\n\n[controller]\nlisten = \"127.0.0.1:8443\"\nurl = \"https://127.0.0.1:8443\"\ncert_names = [\"127.0.0.1\"]\n";
        let (with_id, id) = add_id(t, "00ff00ff00ff00ff").unwrap();
        assert_eq!(id, "00ff00ff00ff00ff");
        assert!(
            with_id.starts_with("# my fleet\n# notes\nid = \"00ff00ff00ff00ff\"\nname = \"x\"\n"),
            "{with_id}"
        );
        let c: FleetConfig = toml::from_str(&with_id).unwrap();
        assert_eq!(c.id.as_deref(), Some("00ff00ff00ff00ff"));
        assert_eq!(c.controller.url, "https://127.0.0.1:8443");
        let e = add_id(&with_id, "1111111111111111")
            .unwrap_err()
            .to_string();
        assert!(e.contains("never replaces"), "{e}");
    }

    #[test]
    fn a_fleet_without_an_id_gets_one_on_first_need_and_keeps_it() {
        let d = tempfile::tempdir().unwrap();
        let t = "name = \"x\"\n[controller]\nlisten = \"127.0.0.1:8443\"\nurl = \"https://127.0.0.1:8443\"\ncert_names = [\"127.0.0.1\"]\n";
        std::fs::write(d.path().join(CONFIG_FILE), t).unwrap();
        let f = Fleet::load(d.path()).unwrap();
        assert_eq!(f.config.id, None);
        let id = f.ensure_id().unwrap();
        let again = Fleet::load(d.path()).unwrap();
        assert_eq!(again.config.id.as_deref(), Some(id.as_str()));
        assert_eq!(again.ensure_id().unwrap(), id, "an existing id is kept");
        // A bad name or id in fleet.toml stops every command with one line.
        std::fs::write(d.path().join(CONFIG_FILE), t.replace("\"x\"", "\"x*\"")).unwrap();
        let e = Fleet::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("fleet name \"x*\" is not allowed"), "{e}");
    }
}
