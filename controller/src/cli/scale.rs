//! `fleet scale`: converge the fleet to N nodes, up or down, with the same code on every
//! backend. The decision is `backend::plan` (pure); this carries it out, then waits for the
//! backend to show the nodes and for their agents to check in with the controller.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use fleet_common::wire::{routes, MasterView, NodeView};
use serde::Serialize;

use super::api::Api;
use super::backends::BackendArg;
use super::render::{bar, Output};
use crate::backend::{plan, Backend, NodeInfo, ScalePlan};
use crate::config::Fleet;
use crate::daemon::SILENT_AFTER_S;
use crate::master::{capacity, max_shards};

/// Converge the fleet to N nodes, up or down.
#[derive(clap::Args)]
pub struct ScaleArgs {
    #[arg(long, allow_hyphen_values = true)]
    nodes: i64,
    /// Default: `scale.backend` in fleet.toml, else local.
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Print the plan, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Seconds to wait for the agents to check in (0: do not wait).
    #[arg(long, default_value_t = 120)]
    wait: u64,
}

impl ScaleArgs {
    pub async fn run(self, fleet: &Fleet, output: Output) -> Result<ScaleReport> {
        // Bad input fails before any AWS client is made or anything launched.
        let nodes = check_nodes(fleet, self.nodes)?;
        let backend = BackendArg::pick(self.backend, fleet).build(fleet).await?;
        let wait = Duration::from_secs(self.wait);
        scale(fleet, &backend, nodes, self.dry_run, wait, output).await
    }
}

/// What `fleet scale` did.
#[derive(Debug, Serialize)]
pub struct ScaleReport {
    pub backend: &'static str,
    pub desired: usize,
    pub plan: ScalePlan,
    pub launched: Vec<String>,
    pub terminated: Vec<String>,
    pub live: usize,
    pub connected: usize,
    pub dry_run: bool,
    pub seconds: f64,
    /// One line when the nodes' workers are more than the Locust masters carry (null if not).
    pub capacity_warning: Option<String>,
}

impl fmt::Display for ScaleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dry_run {
            write!(
                f,
                "plan: launch {}, terminate {} ({}), clean up {} dead; {} live now",
                self.plan.launch,
                self.plan.terminate.len(),
                self.plan.terminate.join(", "),
                self.plan.cleanup.len(),
                self.live
            )?;
            stopped_note(f, &self.plan.stopped)?;
        } else {
            write!(
                f,
                "{} nodes ({} launched, {} terminated), {} agents connected, {:.1} s",
                self.live,
                self.launched.len(),
                self.terminated.len(),
                self.connected,
                self.seconds
            )?;
            stopped_note(f, &self.plan.stopped)?;
        }
        if let Some(w) = &self.capacity_warning {
            write!(f, "\nwarning: {w}")?;
        }
        Ok(())
    }
}

/// The warning for `desired` nodes of `backend`: their workers against the masters that run
/// (`running`, from the controller) or, when it is not up, the masters `fleet serve` would
/// start for them.
pub fn capacity_warning(
    fleet: &Fleet,
    backend: &str,
    desired: usize,
    running: Option<u32>,
) -> Option<String> {
    let m = &fleet.config.master;
    let per_node = capacity::workers_per_node(&fleet.config.local, &fleet.config.ec2, backend);
    let expected = capacity::expected_workers(desired, per_node, 0);
    let shards = running.unwrap_or_else(|| capacity::shard_count(m.shards, expected, m.capacity));
    capacity::overload(expected, shards, m.capacity, m.shards, max_shards(m)).map(|o| o.to_string())
}

/// Stopped nodes are left alone; say so, so that they are not forgotten.
fn stopped_note(f: &mut fmt::Formatter<'_>, stopped: &[String]) -> fmt::Result {
    if stopped.is_empty() {
        return Ok(());
    }
    write!(
        f,
        "; left {} stopped alone ({}): `fleet down` terminates them",
        stopped.len(),
        stopped.join(", ")
    )
}

/// Checks a requested node count against the fleet's safety cap.
pub fn check_nodes(fleet: &Fleet, nodes: i64) -> Result<usize> {
    if nodes < 0 {
        bail!("--nodes must be 0 or more (got {nodes})");
    }
    let cap = fleet.config.scale.max_nodes;
    if nodes as usize > cap {
        bail!("--nodes {nodes} is over the safety cap of {cap} (scale.max_nodes in fleet.toml); raise the cap to go higher");
    }
    Ok(nodes as usize)
}

/// Converges `backend` to `desired` live nodes and waits up to `wait` for their agents.
pub async fn scale<B: Backend>(
    fleet: &Fleet,
    backend: &B,
    desired: usize,
    dry_run: bool,
    wait: Duration,
    output: Output,
) -> Result<ScaleReport> {
    let t0 = Instant::now();
    if !dry_run {
        backend.recover().await?;
    }
    let observed = backend.observe().await?;
    let p = plan(desired, &observed);
    let mut report = ScaleReport {
        backend: backend.name(),
        desired,
        plan: p.clone(),
        launched: vec![],
        terminated: vec![],
        live: observed.iter().filter(|n| n.live).count(),
        connected: 0,
        dry_run,
        seconds: 0.0,
        capacity_warning: None,
    };
    // The masters that run, if the controller answers; else the ones it would start.
    let running = match Api::new(fleet) {
        Ok(api) => match api.get_json::<MasterView>(routes::API_MASTER).await {
            Ok(m) if !m.shards.is_empty() => Some(m.shards.len() as u32),
            _ => None,
        },
        Err(_) => None,
    };
    report.capacity_warning = capacity_warning(fleet, backend.name(), desired, running);
    if dry_run {
        return Ok(report);
    }
    let api = Api::new(fleet)?;
    let live = if backend.set_desired(desired).await? {
        wait_live(backend, desired, wait.max(Duration::from_secs(60)), output).await?
    } else {
        terminate(&api, backend, &p.cleanup, output).await?;
        terminate(&api, backend, &p.terminate, output).await?;
        report.terminated = p.terminate.clone();
        if p.launch > 0 {
            let pb = bar(output, p.launch as u64, "launching");
            let launched = backend.launch(p.launch, &pb).await?;
            pb.finish_and_clear();
            report.launched = launched.into_iter().map(|n| n.id).collect();
        }
        wait_live(backend, desired, Duration::from_secs(30), output).await?
    };
    report.live = live.len();
    api.report_listed(&live).await;
    // `--wait 0`: launch and return, without waiting for the agents to check in.
    if !wait.is_zero() {
        report.connected = wait_connected(fleet, &api, &live, wait, output).await?;
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// Terminates nodes through the backend, then tells the controller to forget them.
pub async fn terminate<B: Backend>(
    api: &Api,
    backend: &B,
    ids: &[String],
    output: Output,
) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let pb = bar(output, ids.len() as u64, "terminating");
    backend.terminate(ids, &pb).await?;
    pb.finish_and_clear();
    api.forget(ids).await;
    Ok(())
}

/// Waits until the backend shows exactly `desired` live nodes (EC2's reads are eventually
/// consistent; an Auto Scaling group takes its time).
async fn wait_live<B: Backend>(
    backend: &B,
    desired: usize,
    wait: Duration,
    output: Output,
) -> Result<Vec<NodeInfo>> {
    let pb = bar(output, desired as u64, "nodes up");
    let deadline = Instant::now() + wait;
    loop {
        let live: Vec<NodeInfo> = backend
            .observe()
            .await?
            .into_iter()
            .filter(|n| n.live)
            .collect();
        pb.set_position(live.len().min(desired) as u64);
        if live.len() == desired {
            pb.finish_and_clear();
            return Ok(live);
        }
        if Instant::now() >= deadline {
            pb.finish_and_clear();
            bail!("{} live nodes after scaling, {desired} wanted; run `fleet scale` again to converge", live.len());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The live nodes whose agents run a bundle and heartbeat.
fn connected<'a>(live: &'a [NodeInfo], views: &[NodeView]) -> Vec<&'a str> {
    let by_id: HashMap<&str, &NodeView> = views
        .iter()
        .map(|v| (v.heartbeat.node_id.as_str(), v))
        .collect();
    live.iter()
        .filter(|n| {
            by_id.get(n.id.as_str()).is_some_and(|v| {
                v.heartbeat.running.is_some() && v.heartbeat_age_s < SILENT_AFTER_S
            })
        })
        .map(|n| n.id.as_str())
        .collect()
}

/// Waits until every live node's agent runs a bundle and heartbeats; returns how many do.
async fn wait_connected(
    fleet: &Fleet,
    api: &Api,
    live: &[NodeInfo],
    wait: Duration,
    output: Output,
) -> Result<usize> {
    if live.is_empty() {
        return Ok(0);
    }
    let pb = bar(output, live.len() as u64, "agents connected");
    let deadline = Instant::now() + wait;
    loop {
        let up = connected(live, &api.nodes().await?);
        pb.set_position(up.len() as u64);
        if up.len() == live.len() {
            pb.finish_and_clear();
            return Ok(up.len());
        }
        if Instant::now() >= deadline {
            pb.finish_and_clear();
            let missing: Vec<&str> = live
                .iter()
                .map(|n| n.id.as_str())
                .filter(|id| !up.contains(id))
                .collect();
            let shown: Vec<&str> = missing.iter().take(10).copied().collect();
            bail!(
                "{} of {} agents did not check in within {:?}: {}{}; see their agent logs (local nodes: {}/<node>/agent.log)",
                missing.len(),
                live.len(),
                wait,
                shown.join(", "),
                if missing.len() > shown.len() { ", ..." } else { "" },
                fleet.local_dir().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_common::wire::{Heartbeat, NodeStatus, Running, Standing};

    fn info(id: &str) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            state: "running".into(),
            live: true,
            stopped: false,
            place: "localhost".into(),
            kind: "process".into(),
            launched: 1,
        }
    }

    fn view(id: &str, running: bool, age: f64) -> NodeView {
        NodeView {
            heartbeat: Heartbeat {
                node_id: id.into(),
                backend: "local".into(),
                agent_version: "0.1.0".into(),
                running: running.then(|| Running {
                    sha256: "aa".into(),
                    sequence: 1,
                    master_epoch: 1,
                    since_ms: 0,
                }),
                last_good: None,
                workers: vec![],
                status: NodeStatus::Running,
                last_error: None,
                rejected: None,
                uptime_s: 1,
                update: None,
                seen_sequence: None,
            },
            standing: Standing::Current,
            heartbeat_age_s: age,
            addr: "127.0.0.1:1".into(),
        }
    }

    #[test]
    fn a_node_is_connected_when_its_agent_runs_a_bundle_and_heartbeats() {
        let live = [info("a"), info("b"), info("c"), info("d")];
        let views = [
            view("a", true, 1.0),
            view("b", false, 1.0),
            view("c", true, SILENT_AFTER_S),
            view("x", true, 1.0),
        ];
        assert_eq!(connected(&live, &views), ["a"]);
    }

    /// A fleet directory made by `fleet init`, and its fleet.
    fn new_fleet() -> (tempfile::TempDir, Fleet) {
        let d = tempfile::tempdir().unwrap();
        crate::cli::init::init(
            d.path(),
            &crate::cli::init::InitOptions {
                name: "t".into(),
                listen: "127.0.0.1:8443".into(),
                url: None,
                cert_names: vec![],
                locust: "locust".into(),
                target: "http://127.0.0.1:8080".into(),
                force: false,
            },
        )
        .unwrap();
        let fleet = Fleet::load(d.path()).unwrap();
        (d, fleet)
    }

    #[test]
    fn scaling_past_one_masters_capacity_warns_with_the_setting_to_change() {
        let (_d, mut fleet) = new_fleet();
        fleet.config.ec2.instance_types = vec!["c6i.xlarge".into()];
        // 1000 nodes of 4 vCPUs: 4000 workers on one master of 2500.
        let w = capacity_warning(&fleet, "ec2", 1000, Some(1)).expect("warned");
        assert!(
            w.contains("4000 workers expected on one Locust master"),
            "{w}"
        );
        assert!(w.contains("master.shards = 2"), "{w}");
        assert_eq!(capacity_warning(&fleet, "ec2", 600, Some(1)), None);
        // Two masters running carry it; "auto" with the controller down would start enough.
        assert_eq!(capacity_warning(&fleet, "ec2", 1000, Some(2)), None);
        fleet.config.master.shards = capacity::Shards::Auto;
        assert_eq!(capacity_warning(&fleet, "ec2", 1000, None), None);
        let w = capacity_warning(&fleet, "ec2", 1000, Some(1)).expect("warned");
        assert!(w.contains("\"auto\" starts 2 as the workers"), "{w}");
        let report = ScaleReport {
            backend: "ec2",
            desired: 1000,
            plan: ScalePlan::default(),
            launched: vec![],
            terminated: vec![],
            live: 0,
            connected: 0,
            dry_run: true,
            seconds: 0.0,
            capacity_warning: Some(w.clone()),
        };
        assert!(report.to_string().ends_with(&format!("\nwarning: {w}")));
        assert_eq!(
            serde_json::to_value(&report).unwrap()["capacity_warning"],
            w
        );
    }

    #[test]
    fn node_counts_are_checked_against_the_cap() {
        let (_d, fleet) = new_fleet();
        let cap = fleet.config.scale.max_nodes;
        assert_eq!(check_nodes(&fleet, 0).unwrap(), 0);
        assert_eq!(check_nodes(&fleet, cap as i64).unwrap(), cap);
        assert!(check_nodes(&fleet, -1).is_err());
        let e = check_nodes(&fleet, cap as i64 + 1).unwrap_err().to_string();
        assert!(e.contains("scale.max_nodes"), "{e}");
    }
}
