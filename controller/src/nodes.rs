//! The agents as the controller knows them: the last heartbeat of each node, checked and bounded
//! (docs/protocol.md, "Heartbeat validation").
//!
//! Memory: a heartbeat is stored only once [`validate`] accepted it, so each entry holds at most
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fleet_common::bundle::is_sha256_hex;
use fleet_common::wire::{Heartbeat, NodeStatus, NodeView, Standing, WorkerReport};
use serde::{Deserialize, Serialize};

use crate::standing::{classify, Current, SILENT_AFTER_S};

/// Largest heartbeat body accepted. A heartbeat with [`MAX_WORKERS`] workers fits; one with a
/// few workers is under 1 KiB.
pub const MAX_HEARTBEAT_BYTES: usize = 32 << 10;
/// Longest node id, in bytes.
pub const MAX_ID: usize = 128;
/// Longest `backend` and `agent_version`.
pub const MAX_SHORT: usize = 64;
/// Longest `last_error` and `update.error`.
pub const MAX_ERROR: usize = 1024;
/// Most worker reports in one heartbeat: one worker per CPU on a 192-vCPU instance, the largest
/// general-purpose size.
pub const MAX_WORKERS: usize = 192;
/// Longest `last_exit` of a worker (`exit 3`, `signal 9`).
pub const MAX_EXIT: usize = 32;
/// Heap bytes one entry of the table may take (checked by a test against the largest heartbeat
/// [`validate`] accepts).
pub const ENTRY_BOUND: usize = 24 << 10;
/// Default for `controller.max_nodes_tracked`.
pub const DEFAULT_MAX_NODES: usize = 2048;
/// Default for `controller.forget_silent_after_s`.
pub const DEFAULT_FORGET_SILENT_AFTER: Duration = Duration::from_secs(600);
/// How often at most the table looks for nodes to forget.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Checks every field of a heartbeat; the error is one line naming the field.
pub fn validate(hb: &Heartbeat) -> Result<(), String> {
    let id = &hb.node_id;
    if id.is_empty() || id.len() > MAX_ID {
        return Err(format!("node_id must be 1 to {MAX_ID} bytes"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".-_:@".contains(&b))
    {
        return Err("node_id may hold only ASCII letters, digits and . - _ : @".into());
    }
    text("backend", &hb.backend, MAX_SHORT)?;
    text("agent_version", &hb.agent_version, MAX_SHORT)?;
    if let Some(r) = &hb.running {
        sha("running.sha256", &r.sha256)?;
    }
    if let Some(s) = &hb.last_good {
        sha("last_good", s)?;
    }
    if let Some(s) = &hb.rejected {
        sha("rejected", s)?;
    }
    if let Some(e) = &hb.last_error {
        text("last_error", e, MAX_ERROR)?;
    }
    if let Some(u) = &hb.update {
        sha("update.sha256", &u.sha256)?;
        text("update.error", &u.error, MAX_ERROR)?;
    }
    if hb.workers.len() > MAX_WORKERS {
        return Err(format!("more than {MAX_WORKERS} workers"));
    }
    for w in &hb.workers {
        if let Some(e) = &w.last_exit {
            text("workers[].last_exit", e, MAX_EXIT)?;
        }
    }
    Ok(())
}

fn sha(field: &str, s: &str) -> Result<(), String> {
    if is_sha256_hex(s) {
        Ok(())
    } else {
        Err(format!("{field} is not 64 lowercase hex digits"))
    }
}

fn text(field: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("{field} is over {max} bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{field} holds a control character"));
    }
    Ok(())
}

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

    pub fn limits(&self) -> Limits {
        self.limits
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

/// Most distinct running bundles a summary names; the rest are counted in `other_bundles`.
pub const MAX_BUNDLES: usize = 16;

/// Nodes on one running bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleCount {
    /// `None`: the nodes that run nothing.
    pub sha256: Option<String>,
    pub nodes: usize,
}

/// The node table in counts: what the dashboard shows first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSummary {
    pub total: usize,
    /// Count per standing, every standing present (zeros too).
    pub standing: BTreeMap<Standing, usize>,
    /// Count per reported status, only those present.
    pub status: BTreeMap<NodeStatus, usize>,
    /// The most common running bundles, most nodes first (ties by sha).
    pub bundles: Vec<BundleCount>,
    /// Nodes on bundles beyond the first [`MAX_BUNDLES`].
    pub other_bundles: usize,
    /// Changes whenever a node's row would show something else (see `Nodes::update`); with the
    /// standing counts it tells a viewer when to fetch its rows again.
    pub version: u64,
}

/// Counts nodes given with their standing.
pub fn summarize<'a>(nodes: impl Iterator<Item = (&'a Heartbeat, Standing)>) -> NodeSummary {
    let mut standing: BTreeMap<Standing, usize> = Standing::ALL.iter().map(|s| (*s, 0)).collect();
    let mut status: BTreeMap<NodeStatus, usize> = BTreeMap::new();
    let mut bundles: HashMap<Option<&str>, usize> = HashMap::new();
    let mut total = 0;
    for (hb, st) in nodes {
        total += 1;
        *standing.entry(st).or_default() += 1;
        *status.entry(hb.status).or_default() += 1;
        *bundles
            .entry(hb.running.as_ref().map(|r| r.sha256.as_str()))
            .or_default() += 1;
    }
    let mut bundles: Vec<(Option<&str>, usize)> = bundles.into_iter().collect();
    bundles.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let other_bundles = bundles.iter().skip(MAX_BUNDLES).map(|b| b.1).sum();
    NodeSummary {
        total,
        standing,
        status,
        bundles: bundles
            .into_iter()
            .take(MAX_BUNDLES)
            .map(|(sha, nodes)| BundleCount {
                sha256: sha.map(str::to_string),
                nodes,
            })
            .collect(),
        other_bundles,
        version: 0,
    }
}

/// `GET /api/nodes` query: every parameter optional; no `limit` means every matching node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Filter {
    pub standing: Option<Standing>,
    pub status: Option<NodeStatus>,
    /// A running bundle's sha256 or a prefix of it; `none` for nodes that run nothing.
    pub bundle: Option<String>,
    /// Text the node id, address, backend, last error or update error contains (any case).
    pub q: Option<String>,
    #[serde(default)]
    pub offset: usize,
    pub limit: Option<usize>,
}

/// Most rows one page may ask for.
pub const MAX_PAGE: usize = 500;

impl Filter {
    fn matches(&self, n: &NodeView) -> bool {
        let hb = &n.heartbeat;
        if self.standing.is_some_and(|s| s != n.standing)
            || self.status.is_some_and(|s| s != hb.status)
        {
            return false;
        }
        if let Some(b) = self.bundle.as_deref().filter(|b| !b.is_empty()) {
            let ok = match &hb.running {
                None => b == "none",
                Some(r) => r.sha256.starts_with(&b.to_ascii_lowercase()),
            };
            if !ok {
                return false;
            }
        }
        if let Some(q) = self.q.as_deref().map(str::trim).filter(|q| !q.is_empty()) {
            let q = q.to_lowercase();
            let hay = [
                Some(hb.node_id.as_str()),
                Some(n.addr.as_str()),
                Some(hb.backend.as_str()),
                hb.last_error.as_deref(),
                hb.update.as_ref().map(|u| u.error.as_str()),
            ];
            if !hay
                .into_iter()
                .flatten()
                .any(|h| h.to_lowercase().contains(&q))
            {
                return false;
            }
        }
        true
    }

    /// The matching nodes (in `nodes` order) and how many matched before paging.
    pub fn apply(&self, nodes: Vec<NodeView>) -> (usize, Vec<NodeView>) {
        let matched: Vec<NodeView> = nodes.into_iter().filter(|n| self.matches(n)).collect();
        let total = matched.len();
        let limit = self.limit.map_or(usize::MAX, |l| l.min(MAX_PAGE));
        (
            total,
            matched.into_iter().skip(self.offset).take(limit).collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_common::wire::{Running, Update, UpdateState, WorkerState};

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn hb(id: &str, running: Option<&str>) -> Heartbeat {
        Heartbeat {
            node_id: id.into(),
            backend: "local".into(),
            agent_version: "0.1.0".into(),
            running: running.map(|s| Running {
                sha256: s.into(),
                sequence: 1,
                master_epoch: 1,
                since_ms: 0,
            }),
            last_good: None,
            workers: vec![WorkerReport {
                index: 0,
                pid: Some(1),
                state: WorkerState::Running,
                restarts: 0,
                last_exit: None,
            }],
            status: NodeStatus::Running,
            last_error: None,
            rejected: None,
            uptime_s: 1,
            update: None,
            seen_sequence: None,
        }
    }

    fn addr() -> SocketAddr {
        "127.0.0.1:5000".parse().unwrap()
    }

    fn cur() -> Option<Current<'static>> {
        Some(Current {
            sequence: 2,
            sha256: A,
        })
    }

    /// The largest heartbeat `validate` accepts.
    fn biggest() -> Heartbeat {
        let mut h = hb(&"n".repeat(MAX_ID), Some(A));
        h.backend = "b".repeat(MAX_SHORT);
        h.agent_version = "v".repeat(MAX_SHORT);
        h.last_good = Some(A.into());
        h.rejected = Some(B.into());
        h.last_error = Some("e".repeat(MAX_ERROR));
        h.update = Some(Update {
            sequence: u64::MAX,
            sha256: B.into(),
            state: UpdateState::Retrying,
            attempts: u32::MAX,
            error: "é".repeat(MAX_ERROR / 2),
        });
        h.workers = (0..MAX_WORKERS as u32)
            .map(|i| WorkerReport {
                index: i,
                pid: Some(u32::MAX),
                state: WorkerState::Backoff,
                restarts: u32::MAX,
                last_exit: Some("x".repeat(MAX_EXIT)),
            })
            .collect();
        h
    }

    #[test]
    fn validation_refuses_each_bad_field_with_one_line() {
        assert_eq!(validate(&hb("local-0001", Some(A))), Ok(()));
        assert_eq!(validate(&biggest()), Ok(()));
        type Breaker = Box<dyn Fn(&mut Heartbeat)>;
        let bad: Vec<(&str, Breaker)> = vec![
            ("node_id", Box::new(|h| h.node_id = String::new())),
            ("node_id", Box::new(|h| h.node_id = "n".repeat(MAX_ID + 1))),
            ("node_id", Box::new(|h| h.node_id = "a/b".into())),
            ("node_id", Box::new(|h| h.node_id = "a\u{1b}[2J".into())),
            ("node_id", Box::new(|h| h.node_id = "nœud".into())),
            (
                "backend",
                Box::new(|h| h.backend = "b".repeat(MAX_SHORT + 1)),
            ),
            ("backend", Box::new(|h| h.backend = "lo\ncal".into())),
            (
                "agent_version",
                Box::new(|h| h.agent_version = "\u{7f}".into()),
            ),
            (
                "running.sha256",
                Box::new(|h| h.running.as_mut().unwrap().sha256 = "abc".into()),
            ),
            (
                "running.sha256",
                Box::new(|h| h.running.as_mut().unwrap().sha256 = A.to_uppercase()),
            ),
            // 64 bytes, but not hex: the multi-byte characters that once made `fleet status` panic.
            (
                "running.sha256",
                Box::new(|h| h.running.as_mut().unwrap().sha256 = "é".repeat(32)),
            ),
            (
                "last_good",
                Box::new(|h| h.last_good = Some("g".repeat(64))),
            ),
            ("rejected", Box::new(|h| h.rejected = Some(String::new()))),
            (
                "last_error",
                Box::new(|h| h.last_error = Some("e".repeat(MAX_ERROR + 1))),
            ),
            (
                "last_error",
                Box::new(|h| h.last_error = Some("two\nlines".into())),
            ),
            (
                "last_error",
                Box::new(|h| h.last_error = Some("bell\u{7}".into())),
            ),
            (
                "update.sha256",
                Box::new(|h| {
                    h.update = Some(Update {
                        sequence: 3,
                        sha256: "zz".into(),
                        state: UpdateState::Refused,
                        attempts: 1,
                        error: String::new(),
                    })
                }),
            ),
            (
                "update.error",
                Box::new(|h| {
                    h.update = Some(Update {
                        sequence: 3,
                        sha256: B.into(),
                        state: UpdateState::Refused,
                        attempts: 1,
                        error: "\r".into(),
                    })
                }),
            ),
            (
                "workers",
                Box::new(|h| h.workers = vec![h.workers[0].clone(); MAX_WORKERS + 1]),
            ),
            (
                "last_exit",
                Box::new(|h| h.workers[0].last_exit = Some("x".repeat(MAX_EXIT + 1))),
            ),
            (
                "last_exit",
                Box::new(|h| h.workers[0].last_exit = Some("\u{9b}31m".into())),
            ),
        ];
        for (field, f) in bad {
            let mut h = hb("n1", Some(A));
            f(&mut h);
            let e = validate(&h).expect_err(field);
            assert!(e.contains(field), "{field}: {e}");
            assert!(!e.contains('\n'));
        }
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

    #[test]
    fn summary_counts_by_standing_status_and_bundle() {
        let mut refused = hb("r", Some(B));
        refused.update = Some(Update {
            sequence: 2,
            sha256: A.into(),
            state: UpdateState::Refused,
            attempts: 1,
            error: "bad signature".into(),
        });
        let mut starting = hb("s", Some(A));
        starting.status = NodeStatus::Starting;
        let nodes = [
            (hb("a", Some(A)), 1.0),
            (hb("b", Some(A)), 1.0),
            (hb("l", Some(B)), 1.0),
            (hb("w", None), 1.0),
            (refused, 1.0),
            (starting, 1.0),
            (hb("q", Some(A)), 20.0),
        ];
        let s = summarize(
            nodes
                .iter()
                .map(|(h, age)| (h, classify(cur(), h, *age, SILENT_AFTER_S))),
        );
        assert_eq!(s.total, 7);
        assert_eq!(
            serde_json::to_value(&s.standing).unwrap(),
            serde_json::json!({"current": 3, "lagging": 2, "retrying": 0, "refused": 1, "silent": 1})
        );
        assert_eq!(
            serde_json::to_value(&s.status).unwrap(),
            serde_json::json!({"starting": 1, "running": 6})
        );
        assert_eq!(
            s.bundles,
            vec![
                BundleCount {
                    sha256: Some(A.into()),
                    nodes: 4
                },
                BundleCount {
                    sha256: Some(B.into()),
                    nodes: 2
                },
                BundleCount {
                    sha256: None,
                    nodes: 1
                },
            ]
        );
        assert_eq!(s.other_bundles, 0);

        // Many bundles: the first MAX_BUNDLES are named, the rest counted.
        let many: Vec<Heartbeat> = (0..MAX_BUNDLES + 3)
            .map(|i| hb(&format!("n{i}"), Some(&format!("{i:064x}"))))
            .collect();
        let s = summarize(many.iter().map(|h| (h, Standing::Lagging)));
        assert_eq!(s.bundles.len(), MAX_BUNDLES);
        assert_eq!(s.other_bundles, 3);
    }

    #[test]
    fn filters_and_pages() {
        let nodes = Nodes::default();
        let t = Instant::now();
        for i in 0..10 {
            let mut h = hb(&format!("n{i:02}"), Some(if i < 7 { A } else { B }));
            if i == 9 {
                h.last_error = Some("Connection RESET by peer".into());
            }
            nodes.update(h, addr(), t).unwrap();
        }
        let all = || nodes.list(cur(), t);
        let ids = |(n, v): (usize, Vec<NodeView>)| {
            (
                n,
                v.into_iter()
                    .map(|n| n.heartbeat.node_id)
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(Filter::default().apply(all()).0, 10);
        let f = Filter {
            standing: Some(Standing::Lagging),
            ..Default::default()
        };
        assert_eq!(
            ids(f.apply(all())),
            (3, vec!["n07".into(), "n08".into(), "n09".into()])
        );
        let f = Filter {
            bundle: Some("BBBB".into()),
            offset: 1,
            limit: Some(1),
            ..Default::default()
        };
        assert_eq!(ids(f.apply(all())), (3, vec!["n08".into()]));
        let f = Filter {
            q: Some("reset".into()),
            ..Default::default()
        };
        assert_eq!(ids(f.apply(all())), (1, vec!["n09".into()]));
        let f = Filter {
            q: Some("n0".into()),
            limit: Some(4),
            ..Default::default()
        };
        assert_eq!(ids(f.apply(all())).1.len(), 4);
        let f = Filter {
            status: Some(NodeStatus::CrashLoop),
            ..Default::default()
        };
        assert_eq!(f.apply(all()).0, 0);
        let f = Filter {
            bundle: Some("none".into()),
            ..Default::default()
        };
        assert_eq!(f.apply(all()).0, 0);
        let f = Filter {
            limit: Some(100_000),
            ..Default::default()
        };
        assert_eq!(f.apply(all()).1.len(), 10);
    }
}
