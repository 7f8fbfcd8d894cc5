//! `master.shards = "auto"` grows while `fleet serve` runs, through the operator's real path:
//! with a capacity of 2 workers per master, `fleet scale --nodes 3` (one real Locust worker
//! per local agent) makes the controller start a second master without a restart. The manifest
//! then lists both masters, each agent's workers move to the master its node id hashes to
//! (only the node the new shard takes restarts its workers), and the test that was running on
//! the one master is split over both.

use std::time::Duration;

use fleet_common::shard::pick;
use fleet_tests::{locustfile, start_target, wait_for, Fleet, Options};

const USERS: u64 = 6;
const NODES: usize = 3;

fn scale(f: &Fleet, nodes: usize) -> serde_json::Value {
    let out = f.cli(&["--output", "json", "scale", "--nodes", &nodes.to_string()]);
    assert!(
        out.status.success(),
        "scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Each node's id and when its workers started, from the heartbeats.
async fn started(f: &Fleet) -> Vec<(String, u64)> {
    f.nodes()
        .await
        .into_iter()
        .map(|n| {
            let since = n.heartbeat.running.map_or(0, |r| r.since_ms);
            (n.heartbeat.node_id, since)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_starts_a_second_master_when_scaling_past_one_masters_capacity() {
    let (target, mut target_proc) = start_target();
    let mut f = Fleet::new(Options {
        workers: 1,
        agent_settings: vec![("stable_ms".into(), 3000.into())],
        ..Options::default()
    });
    f.write_spec(&locustfile(&target, "Web", &[("alpha", "/alpha")]));
    let zmq = f.use_shard_ports(2, "auto".into());
    let cfg_path = f.path().join("fleet.toml");
    let mut t: toml::Table = std::fs::read_to_string(&cfg_path).unwrap().parse().unwrap();
    t["master"]
        .as_table_mut()
        .unwrap()
        .insert("capacity".into(), 2.into());
    std::fs::write(&cfg_path, toml::to_string(&t).unwrap()).unwrap();
    f.start_serve();
    let serve_pid = f.serve_pid().unwrap();
    let sha = wait_for("first publication", Duration::from_secs(20), || async {
        f.current_sha().await
    })
    .await;

    // Two nodes of one worker: one master of 2 carries them.
    let report = scale(&f, 2);
    assert_eq!(report["connected"], 2, "{report}");
    assert!(report["capacity_warning"].is_null(), "{report}");
    f.wait_all_running(2, &sha, Duration::from_secs(30)).await;
    wait_for(
        "2 workers at the one master",
        Duration::from_secs(30),
        || async { f.locust_stats().await.filter(|s| s["worker_count"] == 2) },
    )
    .await;
    let out = f.cli(&["swarm", "--users", &USERS.to_string(), "--spawn-rate", "6"]);
    assert!(
        out.status.success(),
        "swarm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the test running", Duration::from_secs(30), || async {
        f.locust_stats()
            .await
            .filter(|s| s["state"] == "running" && s["user_count"] == USERS)
    })
    .await;
    let view = f.get_json("/api/master").await.unwrap();
    assert_eq!(view["shards"].as_array().unwrap().len(), 1, "{view}");
    let before = started(&f).await;

    // A third node: 3 workers expected over a capacity of 2 per master.
    let report = scale(&f, NODES);
    assert_eq!(report["connected"], NODES, "{report}");
    let warning = report["capacity_warning"].as_str().unwrap_or_default();
    assert!(
        warning.contains("\"auto\" starts 2"),
        "scale said what auto does: {report}"
    );
    let view = wait_for(
        "a second master running",
        Duration::from_secs(30),
        || async {
            let v = f.get_json("/api/master").await?;
            let shards = v["shards"].as_array()?;
            (shards.len() == 2 && shards.iter().all(|s| s["pid"].is_u64())).then_some(v)
        },
    )
    .await;
    assert_eq!(f.serve_pid(), Some(serve_pid));
    assert!(
        fleet_common::process::alive_as(serve_pid, |_| true),
        "the same `fleet serve` runs"
    );
    assert!(
        f.serve_log()
            .contains("starting shard 1: 3 workers expected, capacity 2 per master"),
        "{}",
        f.serve_log()
    );
    assert_eq!(view["shards"][1]["port"], zmq + 1);

    // The manifest lists both masters (it listed none: one master is `master` alone).
    let manifest = wait_for(
        "a manifest listing 2 masters",
        Duration::from_secs(20),
        || async {
            let m = f.manifest().await?;
            (m["masters"].as_array()?.len() == 2).then_some(m)
        },
    )
    .await;
    assert_eq!(manifest["masters"][0]["port"], zmq);
    assert_eq!(manifest["masters"][1]["port"], zmq + 1);
    assert_eq!(manifest["master"]["port"], zmq, "shard 0 for old agents");

    // Every node's worker joins the master its id hashes to.
    let ids: Vec<String> = started(&f).await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), NODES);
    let mut want = [0u64; 2];
    for id in &ids {
        want[pick(id, 2)] += 1;
    }
    assert!(
        want.iter().all(|w| *w > 0),
        "the nodes {ids:?} must hash to both shards for this test: {want:?}"
    );
    let per_shard = wait_for(
        "each master holding the workers that hash to it",
        Duration::from_secs(60),
        || async {
            let a = f.shard_stats(0).await?["worker_count"].as_u64()?;
            let b = f.shard_stats(1).await?["worker_count"].as_u64()?;
            ([a, b] == want).then_some([a, b])
        },
    )
    .await;
    assert_eq!(per_shard.iter().sum::<u64>(), NODES as u64);
    // Only the node the new shard takes restarted its workers.
    let after = started(&f).await;
    for (id, since) in &before {
        let now = after.iter().find(|(i, _)| i == id).unwrap().1;
        match pick(id, 2) {
            0 => assert_eq!(now, *since, "{id} stays on shard 0: its workers were kept"),
            _ => assert_ne!(now, *since, "{id} moved to shard 1: its workers restarted"),
        }
    }

    // The running test is split over both masters by their workers.
    let shares = [
        USERS * want[0] / NODES as u64,
        USERS - USERS * want[0] / NODES as u64,
    ];
    wait_for(
        "the test split over both masters",
        Duration::from_secs(60),
        || async {
            let mut got = vec![];
            for k in 0..2 {
                let s = f.shard_stats(k).await?;
                if s["state"] != "running" {
                    return None;
                }
                got.push(s["user_count"].as_u64()?);
            }
            (got == shares).then_some(got)
        },
    )
    .await;
    let view = f.get_json("/api/master").await.unwrap();
    assert_eq!(view["swarm"]["users"], USERS, "{view}");
    let recorded: Vec<u64> = view["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["swarm"]["users"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(recorded, shares, "{view}");
    // The merged view counts both masters.
    wait_for(
        "the merged view of 2 masters",
        Duration::from_secs(30),
        || async {
            let v = f.get_json("/api/stats").await?;
            (v["masters"] == 2 && v["worker_count"] == NODES && v["user_count"] == USERS)
                .then_some(v)
        },
    )
    .await;

    drop(f);
    let _ = target_proc.kill();
    let _ = target_proc.wait();
}
