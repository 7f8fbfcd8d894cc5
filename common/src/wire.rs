//! JSON bodies exchanged between agents, the controller and the CLI (docs/protocol.md).

use serde::{Deserialize, Serialize};

/// Route paths, in one place for both sides.
pub mod routes {
    pub const HEALTH: &str = "/healthz";
    pub const MANIFEST: &str = "/v1/manifest";
    pub const BUNDLES: &str = "/v1/bundles";
    pub const HEARTBEAT: &str = "/v1/heartbeat";
    pub const API_NODES: &str = "/api/nodes";
    pub const API_SPEC: &str = "/api/spec";
    pub const API_SWARM: &str = "/api/swarm";
    pub const API_STOP: &str = "/api/stop";
    pub const API_RELOAD: &str = "/api/reload";
    pub const API_MASTER: &str = "/api/master";
    /// The test's stats, merged over its masters (`/stats/requests`' shape).
    pub const API_STATS: &str = "/api/stats";
    /// The same as Locust's `stats.csv`.
    pub const API_STATS_CSV: &str = "/api/stats/csv";
    /// The spec editor's routes (docs/protocol.md, "Editing the spec").
    pub const API_SPEC_FILES: &str = "/api/spec/files";
    pub const API_SPEC_FILE: &str = "/api/spec/file";
    pub const API_SPEC_DIFF: &str = "/api/spec/diff";
    pub const API_SPEC_BUNDLE: &str = "/api/spec/bundle";
    pub const API_SPEC_ROLLBACK: &str = "/api/spec/rollback";
}

/// The highest sequence number a controller learns from an agent's heartbeat (2^53, so it
/// survives any JSON reader): a forged heartbeat can push the count up to here, no further.
pub const MAX_SEQUENCE: u64 = 1 << 53;

/// Longest long-poll the controller holds, in seconds.
pub const MAX_WAIT_SECS: u64 = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Spawned, within the join grace.
    Starting,
    Running,
    /// Exited; waiting out the restart backoff.
    Backoff,
    Stopping,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerReport {
    pub index: u32,
    pub pid: Option<u32>,
    pub state: WorkerState,
    /// Restarts since this worker slot was created for the running bundle.
    pub restarts: u32,
    /// Last exit status, as the shell would print it (`exit 3`, `signal 9`).
    pub last_exit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    pub sha256: String,
    pub sequence: u64,
    pub master_epoch: u64,
    /// Unix milliseconds when the agent started this bundle's workers.
    pub since_ms: u64,
}

/// How the agent's workers are, as its heartbeat reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// Nothing to run yet: no publication received and no last good bundle on disk.
    Waiting,
    /// Workers of a new bundle were spawned and have not all joined the master yet.
    Starting,
    Running,
    /// A bundle's workers crash-looped; the workers run the last good bundle again.
    RolledBack,
    /// A bundle's workers crash-loop and there is no other bundle to go back to.
    CrashLoop,
    /// The controller cannot be reached; the workers run the last good bundle from disk.
    OfflineFallback,
}

impl NodeStatus {
    pub const ALL: [NodeStatus; 6] = [
        NodeStatus::Waiting,
        NodeStatus::Starting,
        NodeStatus::Running,
        NodeStatus::RolledBack,
        NodeStatus::CrashLoop,
        NodeStatus::OfflineFallback,
    ];

    /// The wire name (`rolled_back`...).
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Waiting => "waiting",
            NodeStatus::Starting => "starting",
            NodeStatus::Running => "running",
            NodeStatus::RolledBack => "rolled_back",
            NodeStatus::CrashLoop => "crash_loop",
            NodeStatus::OfflineFallback => "offline_fallback",
        }
    }
}

impl std::fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an agent stands with a publication newer than the one it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    /// Fetching the bundle failed for a transient reason (a reset, a timeout, an HTTP 5xx);
    /// the agent retries with backoff until it succeeds or a newer publication supersedes it.
    Retrying,
    /// The manifest or bundle failed verification (signature, sha256, size cap, unsafe path):
    /// this sequence is used up and never fetched again.
    Refused,
}

/// A publication the agent has seen but does not run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    pub sequence: u64,
    pub sha256: String,
    pub state: UpdateState,
    /// Fetch attempts so far.
    pub attempts: u32,
    /// The last error, one line.
    pub error: String,
}

/// What an agent says about itself, every few seconds and at once on every change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node_id: String,
    /// `local`, `ec2`, `asg`, or whatever the operator set.
    pub backend: String,
    pub agent_version: String,
    /// The bundle the workers run, if any.
    pub running: Option<Running>,
    /// The bundle the agent falls back to.
    pub last_good: Option<String>,
    pub workers: Vec<WorkerReport>,
    pub status: NodeStatus,
    /// The last refusal or error, one line.
    pub last_error: Option<String>,
    /// A bundle refused after its workers crash-looped.
    pub rejected: Option<String>,
    pub uptime_s: u64,
    /// A newer publication being retried or refused, if any.
    #[serde(default)]
    pub update: Option<Update>,
    /// The highest sequence this agent has accepted (run, retrying, or refused): it answers
    /// only manifests above it. A controller that lost its state learns from it where to
    /// continue counting (docs/protocol.md, "State loss").
    #[serde(default)]
    pub seen_sequence: Option<u64>,
}

/// Where a node stands with the current publication, as the controller classifies it
/// (docs/protocol.md, "Node standing").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Standing {
    /// Runs the current bundle (or nothing is published yet).
    Current,
    /// Runs another bundle (or none) and reports no trouble with the current one yet.
    Lagging,
    /// Fetching the current (or a newer) publication failed for a transient reason; it retries.
    Retrying,
    /// Refused the current (or a newer) publication: verification failed, or its workers
    /// crash-looped. It stays where it is until something newer is published.
    Refused,
    /// No heartbeat for a while: what it last said may no longer hold.
    Silent,
}

impl Standing {
    pub const ALL: [Standing; 5] = [
        Standing::Current,
        Standing::Lagging,
        Standing::Retrying,
        Standing::Refused,
        Standing::Silent,
    ];

    /// The wire name (`current`...).
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Current => "current",
            Standing::Lagging => "lagging",
            Standing::Retrying => "retrying",
            Standing::Refused => "refused",
            Standing::Silent => "silent",
        }
    }
}

impl std::fmt::Display for Standing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Bounds the controller checks every heartbeat against (docs/protocol.md, "Heartbeat
/// validation"); the agent fits its heartbeats into them before sending.
pub mod limits {
    /// Largest heartbeat body accepted.
    pub const MAX_HEARTBEAT_BYTES: usize = 32 << 10;
    /// Longest node id, in bytes.
    pub const MAX_ID: usize = 128;
    /// Longest `backend` and `agent_version`.
    pub const MAX_SHORT: usize = 64;
    /// Longest `last_error` and `update.error`.
    pub const MAX_ERROR: usize = 1024;
    /// Most worker reports in one heartbeat: one worker per CPU on a 192-vCPU instance.
    pub const MAX_WORKERS: usize = 192;
    /// Longest `last_exit` of a worker (`exit 3`, `signal 9`).
    pub const MAX_EXIT: usize = 32;
}

/// `s` as one line of at most `max` bytes: control characters (newlines, escapes) become
/// spaces, and a longer text is cut at a character boundary with `…` at the end.
pub fn one_line(s: &str, max: usize) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.len() <= max {
        return clean;
    }
    const MORE: &str = "…";
    let mut cut = max.saturating_sub(MORE.len());
    while !clean.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{MORE}", &clean[..cut])
}

/// A JSON parse error as one line of at most [`limits::MAX_ERROR`] bytes. serde_json quotes an
/// unknown variant or field name as it came, newlines and escapes included, so its message
/// cannot be sent back or logged as it is.
pub fn json_error(e: &serde_json::Error) -> String {
    one_line(&e.to_string(), limits::MAX_ERROR)
}

impl Heartbeat {
    /// Fits the free-text fields into [`limits`], so an unusual error message cannot get the
    /// whole heartbeat refused (which would make the node look silent).
    pub fn fit(&mut self) {
        use limits::*;
        self.backend = one_line(&self.backend, MAX_SHORT);
        self.agent_version = one_line(&self.agent_version, MAX_SHORT);
        if let Some(e) = &mut self.last_error {
            *e = one_line(e, MAX_ERROR);
        }
        if let Some(u) = &mut self.update {
            u.error = one_line(&u.error, MAX_ERROR);
        }
        self.workers.truncate(MAX_WORKERS);
        for w in &mut self.workers {
            if let Some(x) = &mut w.last_exit {
                *x = one_line(x, MAX_EXIT);
            }
        }
    }
}

/// A node as the controller knows it (`GET /api/nodes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    #[serde(flatten)]
    pub heartbeat: Heartbeat,
    /// Where it stands with the current publication.
    pub standing: Standing,
    /// Seconds since the last heartbeat.
    pub heartbeat_age_s: f64,
    /// The peer address the last heartbeat came from.
    pub addr: String,
}

/// One published spec version (`GET /api/spec`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecVersion {
    pub sequence: u64,
    pub sha256: String,
    pub size: u64,
    pub master_epoch: u64,
    pub created: String,
    /// What made this version: `directory` (an edit on disk), `push`, `edit PATH`,
    /// `delete PATH`, `rollback to N`, `master restart`, `count past N`.
    #[serde(default)]
    pub origin: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecView {
    pub current: Option<SpecVersion>,
    /// Newest first.
    pub history: Vec<SpecVersion>,
    /// The last spec directory error (a symlink, a missing locustfile, a spec the validation
    /// gate refused...), if any: one line.
    pub last_error: Option<String>,
    /// The last spec the validation gate refused, until a spec is published again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<GateRefusal>,
    /// How specs are checked before they are published: `locust --list (timeout 20 s)`, or
    /// `off (...)` with the reason.
    #[serde(default)]
    pub gate: String,
    /// How the controller packs specs, so that `fleet spec push` from a laptop packs the same
    /// way (absent from older controllers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<PackRules>,
}

/// The packing settings a spec upload must follow (`[controller] locustfile` and
/// `max_bundle_bytes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackRules {
    pub locustfile: String,
    pub max_bundle_bytes: u64,
}

/// A spec the validation gate refused: what, why in one line, and the last lines of Locust's
/// output (a traceback's end, with paths relative to the spec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateRefusal {
    pub sha256: String,
    /// Where it came from, as [`SpecVersion::origin`].
    pub origin: String,
    pub reason: String,
    pub output: Vec<String>,
    pub at: String,
}

/// `POST /api/swarm`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SwarmRequest {
    pub users: u64,
    pub spawn_rate: f64,
}

/// `GET /api/master`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MasterView {
    pub managed: bool,
    pub pid: Option<u32>,
    pub epoch: u64,
    pub restarts: u64,
    pub user_classes: Vec<String>,
    pub web_url: String,
    /// The swarm the controller re-starts after a master restart, if a test is running.
    pub swarm: Option<SwarmRequest>,
    /// Every master the controller runs, shard 0 (the fields above) first. One entry for a
    /// fleet of one master; empty from a controller older than shards.
    #[serde(default)]
    pub shards: Vec<ShardView>,
    /// One line when the expected workers are more than the masters carry, saying what to set.
    #[serde(default)]
    pub capacity_warning: Option<String>,
}

/// One master of a sharded fleet, in `GET /api/master`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardView {
    pub index: u32,
    pub pid: Option<u32>,
    pub epoch: u64,
    pub restarts: u64,
    /// Its web API, which `/locust/<index>/` proxies (`/locust/` for shard 0).
    pub web_url: String,
    /// The ZMQ port its workers connect to.
    pub port: u16,
    /// Its share of the recorded test.
    pub swarm: Option<SwarmRequest>,
    /// Locust's numbers at the last poll; null when it did not answer.
    pub workers: Option<u64>,
    pub users: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing (docs/reliability.md): serde_json quotes an unknown variant verbatim.
    #[test]
    fn json_errors_are_one_bounded_line() {
        let body = format!(
            r#"{{"index":0,"pid":null,"state":"ru\nn{}","restarts":0,"last_exit":null}}"#,
            "x".repeat(4000)
        );
        let e = serde_json::from_str::<WorkerReport>(&body).unwrap_err();
        assert!(e.to_string().contains('\n'), "serde_json changed: {e}");
        let line = json_error(&e);
        assert!(line.starts_with("unknown variant `ru n"), "{line}");
        assert!(
            !line.contains('\n') && line.len() <= limits::MAX_ERROR,
            "{line}"
        );
    }

    #[test]
    fn one_line_replaces_control_characters_and_cuts_at_a_character_boundary() {
        assert_eq!(one_line("a\nb\u{1b}[31m", 100), "a b [31m");
        let long = "é".repeat(600);
        let cut = one_line(&long, limits::MAX_ERROR);
        assert!(cut.len() <= limits::MAX_ERROR);
        assert!(cut.ends_with('…'));
        assert_eq!(one_line("short", 5), "short");
    }
}
