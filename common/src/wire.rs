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
    pub const API_MASTER: &str = "/api/master";
}

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
    /// `running`, `starting`, `rolled_back`, `crash_loop`, `offline_fallback`, `waiting`.
    pub status: String,
    /// The last refusal or error, one line.
    pub last_error: Option<String>,
    /// A bundle refused after its workers crash-looped.
    pub rejected: Option<String>,
    pub uptime_s: u64,
}

/// A node as the controller knows it (`GET /api/nodes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    #[serde(flatten)]
    pub heartbeat: Heartbeat,
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecView {
    pub current: Option<SpecVersion>,
    /// Newest first.
    pub history: Vec<SpecVersion>,
    /// The last spec directory error (a symlink, a missing locustfile...), if any.
    pub last_error: Option<String>,
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
}
