//! The agents as the controller knows them: the last heartbeat of each node.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Instant;

use fleet_common::wire::{Heartbeat, NodeView};

/// Most nodes tracked; a heartbeat from a new node beyond it is refused.
pub const MAX_NODES: usize = 100_000;

struct Entry {
    heartbeat: Heartbeat,
    at: Instant,
    addr: SocketAddr,
}

#[derive(Default)]
pub struct Nodes {
    inner: Mutex<HashMap<String, Entry>>,
}

impl Nodes {
    /// Records a heartbeat; false when the table is full of other nodes or the id is unusable.
    pub fn update(&self, heartbeat: Heartbeat, addr: SocketAddr) -> bool {
        let id = &heartbeat.node_id;
        if id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_control()) {
            return false;
        }
        let mut m = self.inner.lock().unwrap();
        if m.len() >= MAX_NODES && !m.contains_key(id) {
            return false;
        }
        m.insert(
            id.clone(),
            Entry {
                heartbeat,
                at: Instant::now(),
                addr,
            },
        );
        true
    }

    pub fn list(&self) -> Vec<NodeView> {
        let m = self.inner.lock().unwrap();
        let mut v: Vec<NodeView> = m
            .values()
            .map(|e| NodeView {
                heartbeat: e.heartbeat.clone(),
                heartbeat_age_s: e.at.elapsed().as_secs_f64(),
                addr: e.addr.to_string(),
            })
            .collect();
        v.sort_by(|a, b| a.heartbeat.node_id.cmp(&b.heartbeat.node_id));
        v
    }

    /// Forgets a node (after the backend terminated it).
    pub fn forget(&self, id: &str) {
        self.inner.lock().unwrap().remove(id);
    }
}
