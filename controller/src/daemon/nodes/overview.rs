//! The node table in counts and in pages: the summary the dashboard shows first and the filter
//! behind `GET /api/nodes?standing=...&limit=...` (docs/protocol.md).

use std::collections::{BTreeMap, HashMap};

use fleet_common::wire::{Heartbeat, NodeStatus, NodeView, Standing};
use serde::{Deserialize, Serialize};

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
    use crate::daemon::nodes::standing::{classify, Current, SILENT_AFTER_S};
    use crate::daemon::nodes::validate::samples::*;
    use crate::daemon::nodes::Nodes;
    use fleet_common::wire::{Update, UpdateState};
    use std::time::Instant;

    fn addr() -> std::net::SocketAddr {
        "127.0.0.1:5000".parse().unwrap()
    }

    fn cur() -> Option<Current<'static>> {
        Some(Current {
            sequence: 2,
            sha256: A,
        })
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
