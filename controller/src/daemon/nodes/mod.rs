//! The agents as the controller knows them: the last heartbeat of each node, checked and bounded
//! (docs/protocol.md, "Heartbeat validation").
//!
//! Memory: a heartbeat is stored only once [`validate`] (validate.rs) accepted it, so each entry holds at most
//! [`ENTRY_BOUND`] bytes, and the table holds at most `max_nodes` entries: the node table never
//! holds more than `max_nodes × ENTRY_BOUND` (48 MiB with the defaults; a real heartbeat with a
//! few workers takes under 1 KiB).
//!
//! Forgetting: `fleet scale` and `fleet down` delete the nodes they terminate
//! (`DELETE /api/nodes/{id}`). A node that goes away otherwise (a spot interruption, its max
//! lifetime, a crash) is forgotten once it has been silent for `forget_silent_after`, unless the
//! backend still listed it the last time the CLI looked: `fleet scale` and `fleet status` send
//! the backend's live node ids (`PUT /api/nodes`), and the controller keeps those (silent, so
//! the operator sees them) until a later listing leaves them out.

pub(in crate::daemon) mod overview;
pub(in crate::daemon) mod standing;
pub(in crate::daemon) mod validate;

pub(crate) use standing::SILENT_AFTER_S;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fleet_common::wire::{Heartbeat, NodeView, WorkerReport};
use serde::{Deserialize, Serialize};

use crate::daemon::nodes::overview::{summarize, NodeSummary};
use crate::daemon::nodes::standing::{classify, Current};
use crate::daemon::nodes::validate::validate;

/// Heap bytes one entry of the table may take (checked by a test against the largest heartbeat
/// [`validate`] accepts).
pub const ENTRY_BOUND: usize = 24 << 10;
/// Default for `controller.max_nodes_tracked`.
pub const DEFAULT_MAX_NODES: usize = 2048;
/// Default for `controller.forget_silent_after_s`.
pub const DEFAULT_FORGET_SILENT_AFTER: Duration = Duration::from_secs(600);
/// How often at most the table looks for nodes to forget.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Heap bytes an entry takes: its strings, its worker reports and the map's copy of the id.
pub fn heap_bytes(hb: &Heartbeat) -> usize {
    let s = |o: &Option<String>| o.as_ref().map_or(0, |s| s.capacity());
    std::mem::size_of::<Entry>()
        + 2 * hb.node_id.capacity()
        + hb.backend.capacity()
        + hb.agent_version.capacity()
        + hb.running.as_ref().map_or(0, |r| r.sha256.capacity())
        + s(&hb.last_good)
        + s(&hb.rejected)
        + s(&hb.last_error)
        + hb.update.as_ref().map_or(0, |u| {
            std::mem::size_of_val(u) + u.sha256.capacity() + u.error.capacity()
        })
        + hb.workers.capacity() * std::mem::size_of::<WorkerReport>()
        + hb.workers.iter().map(|w| s(&w.last_exit)).sum::<usize>()
}

/// Why a heartbeat was not recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A field failed [`validate`] (HTTP 400).
    Invalid(String),
    /// The table is full of other nodes (HTTP 503).
    Full(usize),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Invalid(why) => write!(f, "bad heartbeat: {why}"),
            Refusal::Full(n) => write!(
                f,
                "node table full ({n} nodes); raise controller.max_nodes_tracked or forget terminated nodes"
            ),
        }
    }
}

/// The table's bounds (`[controller]` in fleet.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_nodes: usize,
    pub forget_silent_after: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_nodes: DEFAULT_MAX_NODES,
            forget_silent_after: DEFAULT_FORGET_SILENT_AFTER,
        }
    }
}

struct Entry {
    heartbeat: Heartbeat,
    at: Instant,
    addr: SocketAddr,
}

struct Table {
    map: HashMap<String, Entry>,
    /// The backend's live node ids, as the CLI last reported them.
    listed: HashSet<String>,
    /// Bumped on every change a viewer would see (not on a heartbeat that only restates).
    version: u64,
    last_sweep: Option<Instant>,
}

pub struct Nodes {
    limits: Limits,
    inner: Mutex<Table>,
}

impl Default for Nodes {
    fn default() -> Self {
        Nodes::new(Limits::default())
    }
}

/// Whether `new` shows the same as `old`: the uptime alone moves with every heartbeat.
fn same(old: &Heartbeat, new: &mut Heartbeat) -> bool {
    let uptime = std::mem::replace(&mut new.uptime_s, old.uptime_s);
    let same = old == &*new;
    new.uptime_s = uptime;
    same
}

impl Nodes {
    pub fn new(limits: Limits) -> Nodes {
        Nodes {
            limits,
            inner: Mutex::new(Table {
                map: HashMap::new(),
                listed: HashSet::new(),
                version: 0,
                last_sweep: None,
            }),
        }
    }

    /// Records a heartbeat received at `now`.
    pub fn update(&self, mut hb: Heartbeat, addr: SocketAddr, now: Instant) -> Result<(), Refusal> {
        validate(&hb).map_err(Refusal::Invalid)?;
        hb.workers.shrink_to_fit();
        debug_assert!(heap_bytes(&hb) <= ENTRY_BOUND);
        let mut t = self.inner.lock().unwrap();
        self.sweep(&mut t, now);
        let changed = match t.map.get(&hb.node_id) {
            None if t.map.len() >= self.limits.max_nodes => {
                return Err(Refusal::Full(self.limits.max_nodes))
            }
            None => true,
            Some(e) => {
                !same(&e.heartbeat, &mut hb)
                    || e.addr.ip() != addr.ip()
                    || now.saturating_duration_since(e.at).as_secs_f64() >= SILENT_AFTER_S
            }
        };
        if changed {
            t.version += 1;
        }
        let id = hb.node_id.clone();
        t.map.insert(
            id,
            Entry {
                heartbeat: hb,
                at: now,
                addr,
            },
        );
        Ok(())
    }

    /// Forgets nodes silent for `forget_silent_after` that the backend did not list.
    fn sweep(&self, t: &mut Table, now: Instant) {
        if t.last_sweep
            .is_some_and(|l| now.saturating_duration_since(l) < SWEEP_EVERY)
        {
            return;
        }
        t.last_sweep = Some(now);
        let after = self.limits.forget_silent_after;
        let Table { map, listed, .. } = t;
        let before = map.len();
        map.retain(|id, e| now.saturating_duration_since(e.at) < after || listed.contains(id));
        if map.len() != before {
            t.version += 1;
        }
    }

    /// Every node, by id, classified against `current`.
    pub fn list(&self, current: Option<Current<'_>>, now: Instant) -> Vec<NodeView> {
        let mut t = self.inner.lock().unwrap();
        self.sweep(&mut t, now);
        let mut v: Vec<NodeView> = t
            .map
            .values()
            .map(|e| {
                let age = now.saturating_duration_since(e.at).as_secs_f64();
                NodeView {
                    standing: classify(current, &e.heartbeat, age, SILENT_AFTER_S),
                    heartbeat: e.heartbeat.clone(),
                    heartbeat_age_s: age,
                    addr: e.addr.to_string(),
                }
            })
            .collect();
        v.sort_by(|a, b| a.heartbeat.node_id.cmp(&b.heartbeat.node_id));
        v
    }

    /// Counts by standing, status and running bundle, without copying the table.
    pub fn summary(&self, current: Option<Current<'_>>, now: Instant) -> NodeSummary {
        let mut t = self.inner.lock().unwrap();
        self.sweep(&mut t, now);
        let mut s = summarize(t.map.values().map(|e| {
            let age = now.saturating_duration_since(e.at).as_secs_f64();
            (
                &e.heartbeat,
                classify(current, &e.heartbeat, age, SILENT_AFTER_S),
            )
        }));
        s.version = t.version;
        s
    }

    /// Forgets a node (after the backend terminated it).
    pub fn forget(&self, id: &str) {
        let mut t = self.inner.lock().unwrap();
        t.listed.remove(id);
        if t.map.remove(id).is_some() {
            t.version += 1;
        }
    }

    /// How many nodes the backend listed as live the last time the CLI looked.
    pub fn listed_count(&self) -> usize {
        self.inner.lock().unwrap().listed.len()
    }

    /// Replaces the backend's list of live nodes (at most `max_nodes` ids are kept).
    pub fn set_listed(&self, ids: Vec<String>) {
        let mut t = self.inner.lock().unwrap();
        t.listed = ids.into_iter().take(self.limits.max_nodes).collect();
    }
}

/// `PUT /api/nodes`: the ids of the nodes the backend lists as live.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    pub listed: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::nodes::validate::samples::*;
    use crate::daemon::nodes::validate::MAX_HEARTBEAT_BYTES;
    use fleet_common::wire::Standing;

    fn addr() -> SocketAddr {
        "127.0.0.1:5000".parse().unwrap()
    }

    fn cur() -> Option<Current<'static>> {
        Some(Current {
            sequence: 2,
            sha256: A,
        })
    }

    #[test]
    fn the_largest_valid_heartbeat_fits_the_entry_bound_and_the_body_cap() {
        let h = biggest();
        assert!(
            heap_bytes(&h) <= ENTRY_BOUND,
            "{} > {ENTRY_BOUND}",
            heap_bytes(&h)
        );
        // As the agent sends it (a worker with no last exit is the common case: smaller).
        let json = serde_json::to_vec(&h).unwrap();
        assert!(json.len() <= MAX_HEARTBEAT_BYTES, "{} bytes", json.len());
        // Stored after a round trip through JSON (as the handler does), it still fits.
        let nodes = Nodes::default();
        nodes
            .update(
                serde_json::from_slice(&json).unwrap(),
                addr(),
                Instant::now(),
            )
            .unwrap();
        // The whole table's bound, as docs/configuration.md states it.
        assert_eq!(DEFAULT_MAX_NODES * ENTRY_BOUND, 48 << 20);
    }

    #[test]
    fn the_table_is_bounded_and_refuses_new_nodes_when_full() {
        let nodes = Nodes::new(Limits {
            max_nodes: 3,
            forget_silent_after: Duration::from_secs(600),
        });
        let t = Instant::now();
        for i in 0..3 {
            nodes
                .update(hb(&format!("n{i}"), Some(A)), addr(), t)
                .unwrap();
        }
        assert_eq!(
            nodes.update(hb("n9", Some(A)), addr(), t),
            Err(Refusal::Full(3))
        );
        // Known nodes still report.
        nodes.update(hb("n1", Some(B)), addr(), t).unwrap();
        assert_eq!(nodes.list(cur(), t).len(), 3);
        assert!(Refusal::Full(3).to_string().contains("max_nodes_tracked"));
        // Forgetting one makes room.
        nodes.forget("n0");
        nodes.update(hb("n9", Some(A)), addr(), t).unwrap();
        let err = nodes.update(hb("bad id", None), addr(), t).unwrap_err();
        assert!(matches!(err, Refusal::Invalid(_)), "{err:?}");
    }

    #[test]
    fn silent_nodes_are_forgotten_unless_the_backend_lists_them() {
        let nodes = Nodes::new(Limits {
            max_nodes: 10,
            forget_silent_after: Duration::from_secs(60),
        });
        let t0 = Instant::now();
        for id in ["gone", "listed", "alive"] {
            nodes.update(hb(id, Some(A)), addr(), t0).unwrap();
        }
        nodes.set_listed(vec!["listed".into()]);
        let t1 = t0 + Duration::from_secs(30);
        nodes.update(hb("alive", Some(A)), addr(), t1).unwrap();
        let ids = |t| -> Vec<String> {
            nodes
                .list(cur(), t)
                .into_iter()
                .map(|n| n.heartbeat.node_id)
                .collect()
        };
        assert_eq!(
            ids(t0 + Duration::from_secs(59)),
            ["alive", "gone", "listed"]
        );
        let v = nodes.list(cur(), t0 + Duration::from_secs(59));
        assert_eq!(v[1].standing, Standing::Silent);
        assert_eq!(ids(t0 + Duration::from_secs(61)), ["alive", "listed"]);
        // A later listing without it: forgotten at the next sweep.
        nodes.set_listed(vec![]);
        assert_eq!(ids(t0 + Duration::from_secs(63)), ["alive"]);
        assert_eq!(ids(t1 + Duration::from_secs(61)), Vec::<String>::new());
    }

    #[test]
    fn the_version_moves_only_with_what_a_viewer_sees() {
        let nodes = Nodes::default();
        let t = Instant::now();
        let v = || nodes.summary(cur(), t).version;
        nodes.update(hb("n1", Some(A)), addr(), t).unwrap();
        let v1 = v();
        // Uptime and source port change with every heartbeat: no news.
        let mut h = hb("n1", Some(A));
        h.uptime_s = 99;
        nodes
            .update(
                h,
                "127.0.0.1:6000".parse().unwrap(),
                t + Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(v(), v1);
        nodes
            .update(hb("n1", Some(B)), addr(), t + Duration::from_secs(6))
            .unwrap();
        let v2 = v();
        assert!(v2 > v1);
        // Back from silence: news even if it says the same.
        nodes
            .update(hb("n1", Some(B)), addr(), t + Duration::from_secs(30))
            .unwrap();
        assert!(v() > v2);
        let v3 = v();
        nodes.forget("n1");
        assert!(v() > v3);
    }
}
