//! The core loop with real Locust: three local agents join a supervised master, a test runs,
//! the spec is edited and every agent hot-restarts onto it while the test keeps its users, and
//! a controller crash loses nothing.

use std::time::Duration;

use fleet_tests::{locustfile, start_target, wait_for, Fleet, Options};

const USERS: u64 = 6;

fn stats_names(stats: &serde_json::Value) -> Vec<(String, u64)> {
    stats["stats"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["name"].as_str().unwrap_or("").to_string(),
                        s["num_requests"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn requests_to(stats: &serde_json::Value, path: &str) -> u64 {
    stats_names(stats)
        .into_iter()
        .find(|(n, _)| n == path)
        .map(|(_, c)| c)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn spec_edits_reach_every_worker_and_the_test_keeps_running() {
    let (target, mut target_proc) = start_target();
    let mut f = Fleet::new(Options {
        agent_settings: vec![("stable_ms".into(), 3000.into())],
        ..Options::default()
    });
    f.write_spec(&locustfile(&target, "Web", &[("alpha", "/alpha")]));
    f.start_serve();
    let sha1 = wait_for("first publication", Duration::from_secs(20), || async {
        f.current_sha().await
    })
    .await;

    let out = f.cli(&["--output", "json", "scale", "--nodes", "3"]);
    assert!(
        out.status.success(),
        "scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["live"], 3);
    assert_eq!(report["connected"], 3);
    f.wait_all_running(3, &sha1, Duration::from_secs(30)).await;
    wait_for(
        "3 workers at the master",
        Duration::from_secs(30),
        || async { f.locust_stats().await.filter(|s| s["worker_count"] == 3) },
    )
    .await;

    let out = f.cli(&["swarm", "--users", &USERS.to_string(), "--spawn-rate", "6"]);
    assert!(
        out.status.success(),
        "swarm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "the test running /alpha",
        Duration::from_secs(30),
        || async {
            f.locust_stats().await.filter(|s| {
                s["state"] == "running" && s["user_count"] == USERS && requests_to(s, "/alpha") > 0
            })
        },
    )
    .await;

    // Rename the task's URL path: same user class, so the master keeps running.
    f.write_spec(&locustfile(&target, "Web", &[("alpha", "/beta")]));
    let sha2 = f.wait_new_sha(&sha1, Duration::from_secs(10)).await;
    let nodes = f.wait_all_running(3, &sha2, Duration::from_secs(30)).await;
    assert!(
        nodes
            .iter()
            .all(|n| n.heartbeat.running.as_ref().unwrap().sequence == 2),
        "{nodes:?}"
    );
    let stats = wait_for(
        "/beta requests with the same users",
        Duration::from_secs(40),
        || async {
            f.locust_stats().await.filter(|s| {
                s["state"] == "running"
                    && s["user_count"] == USERS
                    && s["worker_count"] == 3
                    && requests_to(s, "/beta") > 0
            })
        },
    )
    .await;
    let beta_before = requests_to(&stats, "/beta");
    let master = f.get_json("/api/master").await.unwrap();
    assert_eq!(
        master["epoch"], 1,
        "a renamed path must not restart the master: {master}"
    );

    // The controller crashes: the master and the agents keep going; a new controller adopts
    // the master and serves the same sequence, and the agents report to it again.
    f.kill_serve();
    tokio::time::sleep(Duration::from_secs(1)).await;
    f.start_serve();
    let view = wait_for(
        "the same publication after restart",
        Duration::from_secs(20),
        || async { f.spec().await },
    )
    .await;
    let cur = view.current.expect("current publication");
    assert_eq!(
        (cur.sequence, cur.sha256.as_str()),
        (2, sha2.as_str()),
        "restart must not republish"
    );
    let nodes = f.wait_all_running(3, &sha2, Duration::from_secs(30)).await;
    assert!(nodes.iter().all(|n| n.heartbeat_age_s < 5.0));
    let master = f.get_json("/api/master").await.unwrap();
    assert_eq!(
        master["epoch"], 1,
        "the running master is adopted, not replaced: {master}"
    );
    wait_for(
        "the test still running after the controller restart",
        Duration::from_secs(30),
        || async {
            f.locust_stats().await.filter(|s| {
                s["state"] == "running"
                    && s["user_count"] == USERS
                    && s["worker_count"] == 3
                    && requests_to(s, "/beta") > beta_before
            })
        },
    )
    .await;

    // An explicit stop stays stopped: the controller must not take Locust's stale (cached)
    // "running" for a test to adopt or restore.
    let out = f.cli(&["stop"]);
    assert!(
        out.status.success(),
        "stop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let master = f.get_json("/api/master").await.unwrap();
        assert!(
            master["swarm"].is_null(),
            "the stopped test came back: {master}"
        );
    }
    let stats = f.locust_stats().await.unwrap();
    assert_eq!(stats["state"], "stopped", "{}", stats["state"]);

    // The local backend converges down and up again by the same plan.
    let out = f.cli(&["--output", "json", "scale", "--nodes", "1"]);
    assert!(
        out.status.success(),
        "scale down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["terminated"].as_array().unwrap().len(), 2);
    assert_eq!(report["live"], 1);
    let out = f.cli(&["--output", "json", "status"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["running"], sha2.as_str());
    let out = f.cli(&["down"]);
    assert!(out.status.success());
    let _ = target_proc.kill();
    let _ = target_proc.wait();
}
