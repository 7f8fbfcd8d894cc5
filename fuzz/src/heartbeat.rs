//! Heartbeats (`POST /v1/heartbeat`): the body goes through the controller's own path, JSON,
//! validation, the node table, `/api/nodes` and the `fleet status` table, in
//! `fleet::daemon::fuzz::heartbeat`, which holds the properties (the node table is private to
//! the controller crate).
//!
//! Input: the request body.

pub fn run(data: &[u8]) {
    fleet::daemon::fuzz::heartbeat(data);
}
