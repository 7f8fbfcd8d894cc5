//! `fleet-agent`: the small service baked into the AMI. It follows the controller's signed
//! manifests and keeps the right Locust workers running; docs/architecture-agent.md walks
//! through its parts.
//!
//! - [`agent`]: the `select!` loop that feeds events to the `machine` and carries out its
//!   effects, owning the worker sets and the long-running tasks;
//! - `machine`: the pure state machine (rollback, promotion, overlap, offline, lifetime);
//! - `poller`: long-poll, verification, download (with retries) of new releases;
//! - `heartbeat`: posts the node's state to the controller; `token`: a new agent token read
//!   while the agent runs;
//! - `store`: unpacked bundles and the last good manifest on disk;
//! - [`supervisor`]: the worker processes; `procfs`: what the agent reads from `/proc`;
//! - [`config`], [`imds`]: the layered configuration and EC2 user-data.
#![forbid(unsafe_code)]

/// One line on stderr, time-stamped, as every log line of the agent.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log_line(&format!($($arg)*))
    };
}

pub mod agent;
pub mod config;
mod heartbeat;
pub mod imds;
mod machine;
mod poller;
mod procfs;
mod store;
pub mod supervisor;
mod token;

/// Writes `line` to stderr behind a timestamp and the program's name (what [`log!`] does).
pub fn log_line(line: &str) {
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
    eprintln!("{now} fleet-agent: {line}");
}
