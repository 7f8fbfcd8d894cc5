//! Where nodes come from. `fleet scale`, `fleet down` and `fleet status` run the same code on
//! every backend; a backend only observes, launches and terminates the fleet's own nodes.

pub mod any;
pub mod asg;
pub mod ec2;
pub mod launcher;
pub mod local;
pub mod owner;
pub mod user_data;

use std::future::Future;

use anyhow::Result;
use indicatif::ProgressBar;
use serde::Serialize;

/// A node as its backend sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    /// The node id its agent reports in heartbeats.
    pub id: String,
    /// `running`, `pending`, `dead`, ...
    pub state: String,
    /// Whether it counts toward the desired number (dead and terminating nodes do not).
    pub live: bool,
    /// Stopped on purpose by someone (an EC2 instance `stopping` or `stopped`: fleet's own
    /// instances terminate when they shut down). `scale` neither counts nor terminates it; `down`
    /// terminates it.
    pub stopped: bool,
    /// Where it runs: an AZ, or `localhost`.
    pub place: String,
    /// What it is: an instance type, or `process`.
    pub kind: String,
    /// Unix seconds.
    pub launched: u64,
}

pub trait Backend {
    fn name(&self) -> &'static str;
    /// Finishes what an interrupted run left half done (before anything is observed).
    fn recover(&self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
    /// The fleet's nodes, live or not.
    fn observe(&self) -> impl Future<Output = Result<Vec<NodeInfo>>> + Send;
    /// Launches up to `count` nodes; returns those launched.
    fn launch(
        &self,
        count: usize,
        progress: &ProgressBar,
    ) -> impl Future<Output = Result<Vec<NodeInfo>>> + Send;
    /// Terminates these nodes (and forgets dead ones).
    fn terminate(
        &self,
        ids: &[String],
        progress: &ProgressBar,
    ) -> impl Future<Output = Result<()>> + Send;
    /// A backend that sizes itself (an Auto Scaling group) takes the desired number here and
    /// answers true; the others answer false and are converged node by node.
    fn set_desired(&self, _desired: usize) -> impl Future<Output = Result<bool>> + Send {
        async { Ok(false) }
    }
    /// Removes what the backend created besides nodes (an Auto Scaling group) after `down`.
    fn teardown(&self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
}

/// What to do next to get from `observed` to `desired` live nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ScalePlan {
    pub launch: usize,
    pub terminate: Vec<String>,
    /// Dead nodes to clean up (they do not count toward the desired number).
    pub cleanup: Vec<String>,
    /// Stopped nodes, left alone: not counted, not terminated (`fleet down` ends them).
    pub stopped: Vec<String>,
}

impl ScalePlan {
    pub fn is_empty(&self) -> bool {
        self.launch == 0 && self.terminate.is_empty() && self.cleanup.is_empty()
    }
}

/// The scaling decision, a pure function: launch the shortfall, or terminate the surplus
/// newest first (the oldest have proven themselves), and always clean up the dead. Stopped
/// nodes were stopped by someone on purpose (to look at a disk, say): they are left alone.
pub fn plan(desired: usize, observed: &[NodeInfo]) -> ScalePlan {
    let ids = |keep: fn(&NodeInfo) -> bool| -> Vec<String> {
        observed
            .iter()
            .filter(|n| keep(n))
            .map(|n| n.id.clone())
            .collect()
    };
    let cleanup = ids(|n| !n.live && !n.stopped);
    let stopped = ids(|n| n.stopped);
    let mut live: Vec<&NodeInfo> = observed.iter().filter(|n| n.live).collect();
    if live.len() <= desired {
        return ScalePlan {
            launch: desired - live.len(),
            terminate: vec![],
            cleanup,
            stopped,
        };
    }
    live.sort_by(|a, b| b.launched.cmp(&a.launched).then_with(|| b.id.cmp(&a.id)));
    let surplus = live.len() - desired;
    ScalePlan {
        launch: 0,
        terminate: live.iter().take(surplus).map(|n| n.id.clone()).collect(),
        cleanup,
        stopped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, live: bool, launched: u64) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            state: if live { "running" } else { "dead" }.into(),
            live,
            stopped: false,
            place: "x".into(),
            kind: "t".into(),
            launched,
        }
    }

    #[test]
    fn plans_converge_from_any_state() {
        assert_eq!(
            plan(3, &[]),
            ScalePlan {
                launch: 3,
                ..Default::default()
            }
        );
        let obs = vec![
            node("a", true, 1),
            node("b", true, 2),
            node("c", false, 3),
            node("d", true, 4),
        ];
        // Up: the dead one does not count and is cleaned up.
        assert_eq!(
            plan(5, &obs),
            ScalePlan {
                launch: 2,
                terminate: vec![],
                cleanup: vec!["c".into()],
                stopped: vec![],
            }
        );
        // Down: newest live first.
        assert_eq!(
            plan(1, &obs),
            ScalePlan {
                launch: 0,
                terminate: vec!["d".into(), "b".into()],
                cleanup: vec!["c".into()],
                stopped: vec![],
            }
        );
        assert_eq!(plan(0, &obs).terminate.len(), 3);
        // Converged: nothing but cleanup.
        let p = plan(3, &obs);
        assert_eq!((p.launch, p.terminate.len()), (0, 0));
        assert!(plan(
            3,
            &[node("a", true, 1), node("b", true, 1), node("c", true, 1)]
        )
        .is_empty());
    }

    #[test]
    fn stopped_nodes_are_neither_counted_nor_terminated() {
        let stopped = |id: &str| NodeInfo {
            state: "stopped".into(),
            stopped: true,
            ..node(id, false, 5)
        };
        let obs = vec![node("a", true, 1), stopped("s"), node("c", false, 3)];
        // Up: the stopped one is not a node, and it is not cleaned up either.
        assert_eq!(
            plan(2, &obs),
            ScalePlan {
                launch: 1,
                terminate: vec![],
                cleanup: vec!["c".into()],
                stopped: vec!["s".into()],
            }
        );
        // Down to zero: the live one goes, the stopped one stays.
        let p = plan(0, &obs);
        assert_eq!(p.terminate, ["a"]);
        assert!(!p.terminate.contains(&"s".to_string()) && !p.cleanup.contains(&"s".to_string()));
        // Converged with a stopped node around: nothing to do.
        assert!(plan(1, &[node("a", true, 1), stopped("s")]).is_empty());
    }
}
