//! The heartbeat path without its HTTP, for the fuzz harness (`fuzz/`, docs/reliability.md):
//! it reaches the node table and `fleet status`, which are private to this crate. Nothing in the
//! daemon calls it.
//!
//! What a body goes through, as in `agent_routes::heartbeat`: JSON, the state-loss check
//! (`publish::count_past`), validation and the node table, then `GET /api/nodes` as the CLI
//! reads it and the `fleet status` table. Beside it, the agent's own `Heartbeat::fit`.

use std::net::SocketAddr;
use std::time::Instant;

use fleet_common::manifest::{BundleRef, Manifest, MasterAddr, FORMAT};
use fleet_common::wire::{json_error, Heartbeat, NodeView, Standing, MAX_SEQUENCE};

use crate::backend::NodeInfo;
use crate::cli::status::{join_status, status_table};
use crate::daemon::nodes::standing::Current;
use crate::daemon::nodes::validate::{validate, MAX_HEARTBEAT_BYTES};
use crate::daemon::nodes::{heap_bytes, Limits, Nodes, Refusal, ENTRY_BOUND};
use crate::daemon::publish::count_past;

const CURRENT_SHA: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const CURRENT_SEQ: u64 = 5;

fn one_line(what: &str, s: &str) {
    assert!(!s.contains(['\n', '\r']), "{what} is not one line: {s:?}");
}

/// Runs one heartbeat body through the controller and checks what comes out; panics when a
/// property fails (see docs/reliability.md for the list).
pub fn heartbeat(body: &[u8]) {
    if body.len() > MAX_HEARTBEAT_BYTES {
        return;
    }
    let hb: Heartbeat = match serde_json::from_slice(body) {
        Ok(h) => h,
        Err(e) => return one_line("a JSON refusal", &json_error(&e)),
    };
    agent_fit(&hb);
    let current = current_manifest();
    for cur in [None, Some(&current)] {
        if let Some(seen) = count_past(&hb, cur) {
            assert!(seen <= MAX_SEQUENCE, "learned sequence {seen}");
        }
    }
    let nodes = Nodes::new(Limits {
        max_nodes: 4,
        ..Limits::default()
    });
    let addr: SocketAddr = "10.0.0.7:40000".parse().unwrap();
    let now = Instant::now();
    match nodes.update(hb.clone(), addr, now) {
        Ok(()) => {}
        Err(Refusal::Invalid(e)) => {
            assert!(validate(&hb).is_err());
            return one_line("a refusal", &Refusal::Invalid(e).to_string());
        }
        Err(r) => panic!("an empty table refused a node: {r}"),
    }
    let mut stored = hb.clone();
    stored.workers.shrink_to_fit();
    assert!(heap_bytes(&stored) <= ENTRY_BOUND, "entry over its bound");
    let cur = Some(Current {
        sequence: CURRENT_SEQ,
        sha256: CURRENT_SHA,
    });
    let version = nodes.summary(cur, now).version;
    nodes.update(hb.clone(), addr, now).unwrap();
    assert_eq!(
        nodes.summary(cur, now).version,
        version,
        "a restated heartbeat"
    );
    cli_view(&hb, &nodes.list(cur, now));
}

/// The agent fits its own free text before sending: what is left for validation to refuse is
/// the node id and the bundle ids, never a text field.
fn agent_fit(hb: &Heartbeat) {
    let mut fitted = hb.clone();
    fitted.fit();
    if let Err(e) = validate(&fitted) {
        assert!(
            e.starts_with("node_id") || e.ends_with("is not 64 lowercase hex digits"),
            "a fitted heartbeat is refused: {e}"
        );
    }
    let mut twice = fitted.clone();
    twice.fit();
    assert_eq!(twice, fitted, "fit is not idempotent");
}

/// `GET /api/nodes` as `fleet status` reads it, and the table it prints: one line per node.
fn cli_view(hb: &Heartbeat, views: &[NodeView]) {
    let json = serde_json::to_vec(views).unwrap();
    let back: Vec<NodeView> = serde_json::from_slice(&json).expect("the CLI reads /api/nodes");
    assert_eq!(back, views, "/api/nodes does not round-trip");
    let observed = [NodeInfo {
        id: hb.node_id.clone(),
        state: "running".into(),
        live: true,
        place: "eu-west-1a".into(),
        kind: "c7i.large".into(),
        launched: 1,
        stopped: false,
    }];
    let rows = join_status(&observed, &back);
    let table = status_table(&rows, 2);
    // Below the rows, a line each about retrying or refused nodes and about silent ones.
    let stuck = rows
        .iter()
        .any(|r| matches!(r.standing, Some(Standing::Retrying | Standing::Refused)));
    let notes = usize::from(stuck) + usize::from(rows.iter().any(|r| r.silent));
    assert_eq!(table.lines().count(), 1 + rows.len() + notes, "{table}");
}

fn current_manifest() -> Manifest {
    Manifest {
        format: FORMAT,
        fleet: "fuzz".into(),
        sequence: CURRENT_SEQ,
        bundle: BundleRef {
            sha256: CURRENT_SHA.into(),
            size: 1,
        },
        locustfile: "locustfile.py".into(),
        master: MasterAddr {
            host: "127.0.0.1".into(),
            port: 5557,
        },
        master_epoch: 1,
        masters: vec![],
        worker_args: vec![],
        created: "2026-01-01T00:00:00Z".into(),
    }
}
