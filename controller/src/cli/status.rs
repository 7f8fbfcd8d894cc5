//! `fleet status`: the fleet's nodes, what the backend says joined with what each agent
//! reports to the controller. Everything a node reports is escaped before it is shown.

use std::collections::HashMap;
use std::fmt;

use anyhow::Result;
use fleet_common::wire::{NodeStatus, NodeView, Standing};
use serde::Serialize;

use super::api::Api;
use super::backends::BackendArg;
use super::render::escape;
use crate::backend::{Backend, NodeInfo};
use crate::config::Fleet;
use crate::daemon::SILENT_AFTER_S;

/// The fleet's nodes: what the backend says joined with what each agent reports.
#[derive(clap::Args)]
pub struct StatusArgs {
    #[arg(long, value_enum, default_value = "local")]
    backend: BackendArg,
}

impl StatusArgs {
    pub async fn run(self, fleet: &Fleet) -> Result<Status> {
        let observed = self.backend.build(fleet).await?.observe().await?;
        let api = Api::new(fleet)?;
        api.report_listed(&observed).await;
        let views = api.nodes().await?;
        Ok(Status(join_status(&observed, &views)))
    }
}

/// The rows of `fleet status`: a JSON array, or the text table.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct Status(pub Vec<StatusRow>);

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        f.write_str(&status_table(&self.0, now))
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

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_common::wire::{Heartbeat, Running, Update, UpdateState};

    fn info(id: &str) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            state: "running".into(),
            live: true,
            stopped: false,
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
