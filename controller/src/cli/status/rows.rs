//! The rows of `fleet status` and its text table: what the backend says of each node joined
//! with what its agent reports, the backend's nodes alone when the controller is down, or the
//! controller's nodes alone from a remote. Everything a node reports is escaped here.

use std::collections::HashMap;

use fleet_common::wire::{NodeStatus, NodeView, Standing};
use serde::Serialize;

use crate::backend::NodeInfo;
use crate::cli::render::escape;
use crate::daemon::SILENT_AFTER_S;

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
    /// The controller could not be asked: nothing is known of the node's agent.
    pub unknown: bool,
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
        .map(|n| row(Some(n), by_id.get(n.id.as_str()).copied()))
        .collect()
}

/// The backend's nodes when the controller cannot be asked: agent columns unknown.
pub fn unknown_rows(observed: &[NodeInfo]) -> Vec<StatusRow> {
    observed
        .iter()
        .map(|n| StatusRow {
            unknown: true,
            silent: false,
            ..row(Some(n), None)
        })
        .collect()
}

/// The nodes the controller hears from, without a backend to list them (a remote).
pub fn controller_rows(views: &[NodeView]) -> Vec<StatusRow> {
    views.iter().map(|v| row(None, Some(v))).collect()
}

/// One row: what the backend says of a node, what its agent reports, or both.
fn row(n: Option<&NodeInfo>, v: Option<&NodeView>) -> StatusRow {
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
    // Without a backend, the controller's own view: the node's backend and address.
    let (id, state, place, kind, launched, live) = match (n, v) {
        (Some(n), _) => (
            &n.id,
            n.state.as_str(),
            &n.place,
            &n.kind,
            n.launched,
            n.live,
        ),
        (None, Some(v)) => (
            &v.heartbeat.node_id,
            "-",
            &v.addr,
            &v.heartbeat.backend,
            0,
            true,
        ),
        (None, None) => unreachable!("a row is of a node or of a heartbeat"),
    };
    StatusRow {
        id: escape(id),
        state: escape(state),
        place: escape(place),
        kind: escape(kind),
        launched,
        running: v.and_then(|v| v.heartbeat.running.as_ref().map(|r| escape(&r.sha256))),
        running_short: v.and_then(|v| v.heartbeat.running.as_ref().map(|r| short(&r.sha256))),
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
        silent: live && age.is_none_or(|a| a >= SILENT_AFTER_S),
        unknown: false,
        error: error.map(|e| escape(&e)),
    }
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
            match (r.unknown, r.status) {
                (true, _) => "unknown",
                (false, s) => s.map(NodeStatus::as_str).unwrap_or("-"),
            },
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
    use super::super::Status;
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

    #[test]
    fn a_controller_that_is_down_leaves_the_nodes_listed_as_unknown() {
        let rows = unknown_rows(&[info("n1"), info("n2")]);
        assert!(rows
            .iter()
            .all(|r| r.unknown && !r.silent && r.status.is_none()));
        let status = Status {
            rows,
            unreachable: Some("https://c:8443".into()),
        };
        let text = status.to_string();
        assert_eq!(
            text.lines().filter(|l| l.contains(" unknown ")).count(),
            2,
            "{text}"
        );
        assert!(
            text.ends_with("the controller at https://c:8443 is unreachable, so what the agents run is unknown; is `fleet serve` running?"),
            "{text}"
        );
        assert!(!text.contains("SILENT"), "{text}");
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json[1]["id"], "n2");
        assert_eq!(json[1]["unknown"], true);
        // A controller that answers: known, and a node without a heartbeat is silent.
        let rows = join_status(&[info("n1")], &[]);
        assert!(!rows[0].unknown && rows[0].silent);
    }

    #[test]
    fn without_a_backend_the_rows_are_the_nodes_the_controller_hears() {
        let rows = controller_rows(&[view("i-1", "aa", Standing::Current, 1.0)]);
        assert_eq!(rows[0].id, "i-1");
        assert_eq!(
            (rows[0].state.as_str(), rows[0].place.as_str()),
            ("-", "127.0.0.1:1")
        );
        assert_eq!(rows[0].kind, "local");
        assert_eq!(rows[0].sequence, Some(3));
        assert!(!rows[0].silent);
        let stale = controller_rows(&[view("i-2", "aa", Standing::Current, 60.0)]);
        assert!(stale[0].silent);
    }
}
