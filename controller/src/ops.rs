//! `fleet scale`, `fleet down` and `fleet status`: the same code for every backend.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use fleet_common::wire::{routes, NodeStatus, NodeView, Standing};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::backend::{plan, Backend, NodeInfo, Plan};
use crate::config::Fleet;

pub(crate) use crate::daemon::SILENT_AFTER_S;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Serialize)]
pub struct ScaleReport {
    pub backend: &'static str,
    pub desired: usize,
    pub plan: Plan,
    pub launched: Vec<String>,
    pub terminated: Vec<String>,
    pub live: usize,
    pub connected: usize,
    pub dry_run: bool,
    pub seconds: f64,
}

fn bar(len: u64, output: Output, msg: &str) -> ProgressBar {
    if output == Output::Json {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg:28} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// The controller's view of the nodes (operator credentials).
pub async fn controller_nodes(fleet: &Fleet) -> Result<Vec<NodeView>> {
    let client = fleet.operator_client()?;
    let r = client
        .get(routes::API_NODES, Duration::from_secs(10), 64 << 20)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "controller {} unreachable ({e}); is `fleet serve` running?",
                fleet.config.controller.url
            )
        })?;
    if r.status != 200 {
        bail!(
            "controller answered HTTP {} to {}; check secrets/operator.token",
            r.status,
            routes::API_NODES
        );
    }
    Ok(serde_json::from_slice(&r.body)?)
}

/// Terminates nodes through the backend, then tells the controller to forget them (best
/// effort: a controller that is down learns it from the missing heartbeats).
pub async fn terminate<B: Backend>(
    fleet: &Fleet,
    backend: &B,
    ids: &[String],
    output: Output,
) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let pb = bar(ids.len() as u64, output, "terminating");
    backend.terminate(ids, &pb).await?;
    pb.finish_and_clear();
    forget(fleet, ids).await;
    Ok(())
}

/// Tells the controller to forget nodes (best effort).
pub async fn forget(fleet: &Fleet, ids: &[String]) {
    if let Ok(client) = fleet.operator_client() {
        for id in ids {
            let path = format!("{}/{id}", routes::API_NODES);
            let _ = client
                .request(
                    hyper::Method::DELETE,
                    &path,
                    None,
                    Duration::from_secs(5),
                    1024,
                )
                .await;
        }
    }
}

/// Tells the controller which nodes the backend lists as live, so it keeps them while they are
/// silent (best effort: nodes.rs says why).
pub async fn report_listed(fleet: &Fleet, observed: &[NodeInfo]) {
    let listing = crate::daemon::Listing {
        listed: observed
            .iter()
            .filter(|n| n.live)
            .map(|n| n.id.clone())
            .collect(),
    };
    let Ok(body) = serde_json::to_vec(&listing) else {
        return;
    };
    if let Ok(client) = fleet.operator_client() {
        let _ = client
            .request(
                hyper::Method::PUT,
                routes::API_NODES,
                Some(("application/json", body)),
                Duration::from_secs(5),
                1024,
            )
            .await;
    }
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
    };
    if dry_run {
        return Ok(report);
    }
    let live = if backend.set_desired(desired).await? {
        wait_live(backend, desired, wait.max(Duration::from_secs(60)), output).await?
    } else {
        terminate(fleet, backend, &p.cleanup, output).await?;
        terminate(fleet, backend, &p.terminate, output).await?;
        report.terminated = p.terminate.clone();
        if p.launch > 0 {
            let pb = bar(p.launch as u64, output, "launching");
            let launched = backend.launch(p.launch, &pb).await?;
            pb.finish_and_clear();
            report.launched = launched.into_iter().map(|n| n.id).collect();
        }
        wait_live(backend, desired, Duration::from_secs(30), output).await?
    };
    report.live = live.len();
    report_listed(fleet, &live).await;
    // `--wait 0`: launch and return, without waiting for the agents to check in.
    if !wait.is_zero() {
        report.connected = wait_connected(fleet, &live, wait, output).await?;
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// Waits until the backend shows exactly `desired` live nodes (EC2's reads are eventually
/// consistent; an Auto Scaling group takes its time).
async fn wait_live<B: Backend>(
    backend: &B,
    desired: usize,
    wait: Duration,
    output: Output,
) -> Result<Vec<NodeInfo>> {
    let pb = bar(desired as u64, output, "nodes up");
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

/// Waits until every live node's agent runs a bundle and heartbeats; returns how many do.
async fn wait_connected(
    fleet: &Fleet,
    live: &[NodeInfo],
    wait: Duration,
    output: Output,
) -> Result<usize> {
    if live.is_empty() {
        return Ok(0);
    }
    let pb = bar(live.len() as u64, output, "agents connected");
    let deadline = Instant::now() + wait;
    loop {
        let views = controller_nodes(fleet).await?;
        let by_id: HashMap<&str, &NodeView> = views
            .iter()
            .map(|v| (v.heartbeat.node_id.as_str(), v))
            .collect();
        let connected: Vec<&NodeInfo> = live
            .iter()
            .filter(|n| {
                by_id.get(n.id.as_str()).is_some_and(|v| {
                    v.heartbeat.running.is_some() && v.heartbeat_age_s < SILENT_AFTER_S
                })
            })
            .collect();
        pb.set_position(connected.len() as u64);
        if connected.len() == live.len() {
            pb.finish_and_clear();
            return Ok(connected.len());
        }
        if Instant::now() >= deadline {
            pb.finish_and_clear();
            let missing: Vec<&str> = live
                .iter()
                .filter(|n| !connected.iter().any(|c| c.id == n.id))
                .map(|n| n.id.as_str())
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

#[derive(Debug, Serialize)]
pub struct StatusRow {
    pub id: String,
    pub state: String,
    pub place: String,
    pub kind: String,
    /// Unix seconds.
    pub launched: u64,
    pub running: Option<String>,
    /// The first 12 characters of `running` (escaped), for the text table.
    #[serde(skip)]
    pub running_short: Option<String>,
    pub sequence: Option<u64>,
    pub status: Option<NodeStatus>,
    /// Where the node stands with the current publication (standing.rs); none without a
    /// heartbeat.
    pub standing: Option<Standing>,
    pub workers: Vec<String>,
    pub heartbeat_age_s: Option<f64>,
    /// Running according to the backend, but no recent heartbeat.
    pub silent: bool,
    /// Why it is not on the current bundle (retrying, refused), or its last error.
    pub error: Option<String>,
}

/// `s` with every control character written as an escape (`\u{1b}`), so that nothing a node
/// reports can move the cursor, clear the screen or forge lines in a terminal or a log.
pub fn escape(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// The first 12 characters of a sha256 (characters, not bytes: a controller that did not
/// check may hand over anything).
pub fn short(sha: &str) -> String {
    escape(&sha.chars().take(12).collect::<String>())
}

/// Joins what the backend says with what each agent reports. Every string is escaped.
pub fn join_status(observed: &[NodeInfo], views: &[NodeView]) -> Vec<StatusRow> {
    let by_id: HashMap<&str, &NodeView> = views
        .iter()
        .map(|v| (v.heartbeat.node_id.as_str(), v))
        .collect();
    observed
        .iter()
        .map(|n| {
            let v = by_id.get(n.id.as_str());
            let age = v.map(|v| v.heartbeat_age_s);
            let standing = v.map(|v| v.standing);
            let error = v.and_then(|v| match (&v.heartbeat.update, standing) {
                (Some(u), Some(Standing::Retrying | Standing::Refused)) => Some(format!(
                    "{} sequence {} ({} attempts): {}",
                    match u.state {
                        fleet_common::wire::UpdateState::Retrying => "retrying",
                        fleet_common::wire::UpdateState::Refused => "refused",
                    },
                    u.sequence,
                    u.attempts,
                    u.error
                )),
                _ => v.heartbeat.last_error.clone(),
            });
            StatusRow {
                id: escape(&n.id),
                state: escape(&n.state),
                place: escape(&n.place),
                kind: escape(&n.kind),
                launched: n.launched,
                running: v.and_then(|v| v.heartbeat.running.as_ref().map(|r| escape(&r.sha256))),
                running_short: v
                    .and_then(|v| v.heartbeat.running.as_ref().map(|r| short(&r.sha256))),
                sequence: v.and_then(|v| v.heartbeat.running.as_ref().map(|r| r.sequence)),
                status: v.map(|v| v.heartbeat.status),
                standing,
                workers: v
                    .map(|v| {
                        v.heartbeat
                            .workers
                            .iter()
                            .map(|w| format!("{:?}", w.state).to_lowercase())
                            .collect()
                    })
                    .unwrap_or_default(),
                heartbeat_age_s: age,
                silent: n.live && age.is_none_or(|a| a >= SILENT_AFTER_S),
                error: error.map(|e| escape(&e)),
            }
        })
        .collect()
}

/// The text table of `fleet status` (rows as [`join_status`] made them: already escaped).
pub fn status_table(rows: &[StatusRow], now_unix: u64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<10} {:<11} {:<10} {:>7} {:<13} {:>4} {:<16} {:<9} {:<16} {:>7}",
        "NODE",
        "STATE",
        "PLACE",
        "TYPE",
        "UP",
        "BUNDLE",
        "SEQ",
        "AGENT",
        "STANDING",
        "WORKERS",
        "HB AGE"
    );
    for r in rows {
        let up = if r.launched > 0 {
            format!("{}s", now_unix.saturating_sub(r.launched))
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:<11} {:<10} {:>7} {:<13} {:>4} {:<16} {:<9} {:<16} {:>7}{}{}",
            r.id,
            r.state,
            r.place,
            r.kind,
            up,
            r.running_short.as_deref().unwrap_or("-"),
            r.sequence
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".into()),
            r.status.map(NodeStatus::as_str).unwrap_or("-"),
            r.standing.map(Standing::as_str).unwrap_or("-"),
            if r.workers.is_empty() {
                "-".to_string()
            } else {
                r.workers.join(",")
            },
            r.heartbeat_age_s
                .map(|a| format!("{a:.1}s"))
                .unwrap_or_else(|| "-".into()),
            if r.silent { "  SILENT" } else { "" },
            r.error
                .as_deref()
                .map(|e| format!("  {}", escape(e)))
                .unwrap_or_default(),
        );
    }
    let count = |s: Standing| rows.iter().filter(|r| r.standing == Some(s)).count();
    let (retrying, refused) = (count(Standing::Retrying), count(Standing::Refused));
    if retrying + refused > 0 {
        let _ = writeln!(
            out,
            "{retrying} node(s) retrying the current bundle, {refused} refused it: see the error after each row"
        );
    }
    let silent = rows.iter().filter(|r| r.silent).count();
    if silent > 0 {
        let _ = writeln!(out, "{silent} node(s) running but silent (no heartbeat for {SILENT_AFTER_S} s): check their agent logs");
    }
    out
}

pub fn print_status(rows: &[StatusRow]) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    print!("{}", status_table(rows, now));
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_common::wire::{Heartbeat, Running, Update, UpdateState};

    fn info(id: &str) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            state: "running".into(),
            live: true,
            place: "localhost".into(),
            kind: "process".into(),
            launched: 100,
        }
    }

    fn view(id: &str, sha: &str, standing: Standing, age: f64) -> NodeView {
        NodeView {
            heartbeat: Heartbeat {
                node_id: id.into(),
                backend: "local".into(),
                agent_version: "0.1.0".into(),
                running: Some(Running {
                    sha256: sha.into(),
                    sequence: 3,
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
            standing,
            heartbeat_age_s: age,
            addr: "127.0.0.1:1".into(),
        }
    }

    #[test]
    fn status_never_panics_on_multi_byte_shas_and_escapes_control_characters() {
        let nasty = "é\u{1b}[2J\u{7}ééééééééééééééééé\u{9b}";
        let mut v = view("n1\u{1b}]0;owned\u{7}", nasty, Standing::Lagging, 1.0);
        v.heartbeat.last_error = Some("line one\nFAKE ROW\r".into());
        let mut info1 = info("n1\u{1b}]0;owned\u{7}");
        info1.kind = "t\u{85}".into();
        let rows = join_status(&[info1, info("n2")], &[v]);
        let text = status_table(&rows, 200);
        let json = serde_json::to_string(&rows).unwrap();
        for out in [&text, &json] {
            assert!(
                !out.chars().any(|c| c.is_control() && c != '\n'),
                "raw control character in {out:?}"
            );
        }
        assert_eq!(
            text.lines().count(),
            4,
            "header, 2 rows, the silent line: {text}"
        );
        assert!(text.contains("\\u{1b}"), "{text}");
        assert!(
            text.contains("é\\u{1b}[2J\\u{7}éééééé "),
            "12 characters of the sha: {text}"
        );
        assert!(text.contains("line one\\u{a}FAKE ROW\\u{d}"), "{text}");
        assert!(rows[1].silent, "no heartbeat from n2");
        assert_eq!(short("abc"), "abc");
        assert_eq!(short(&"ab".repeat(40)), "abababababab");
    }

    #[test]
    fn status_shows_standing_and_why() {
        let mut r = view("n1", "aa", Standing::Retrying, 1.0);
        r.heartbeat.update = Some(Update {
            sequence: 4,
            sha256: "bb".into(),
            state: UpdateState::Retrying,
            attempts: 3,
            error: "connection reset".into(),
        });
        let rows = join_status(&[info("n1")], &[r]);
        assert_eq!(rows[0].standing, Some(Standing::Retrying));
        assert_eq!(
            rows[0].error.as_deref(),
            Some("retrying sequence 4 (3 attempts): connection reset")
        );
        let text = status_table(&rows, 200);
        assert!(text.contains(" retrying "), "{text}");
        assert!(
            text.contains("1 node(s) retrying the current bundle, 0 refused it"),
            "{text}"
        );
        let json: serde_json::Value = serde_json::to_value(&rows).unwrap();
        assert_eq!(json[0]["standing"], "retrying");
    }
}
