//! The supervised Locust master: a spec that changes the user classes restarts it, a crash
//! restarts it, and both times the agents follow the new master and the running test is
//! started again with the same users.

use std::time::Duration;

use fleet_tests::{locustfile, start_target, wait_for, Fleet, Options};

const USERS: u64 = 4;

fn requests_to(stats: &serde_json::Value, path: &str) -> u64 {
    stats["stats"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == path))
        .and_then(|s| s["num_requests"].as_u64())
        .unwrap_or(0)
}

async fn wait_test_running(f: &Fleet, path: &str, what: &str) {
    wait_for(what, Duration::from_secs(60), || async {
        f.locust_stats().await.filter(|s| {
            s["state"] == "running"
                && s["user_count"] == USERS
                && s["worker_count"] == 2
                && requests_to(s, path) > 0
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn master_restarts_keep_the_test_going() {
    let (target, mut target_proc) = start_target();
    let mut f = Fleet::new(Options::default());
    f.write_spec(&locustfile(&target, "Web", &[("alpha", "/alpha")]));
    f.start_serve();
    let sha1 = wait_for("first publication", Duration::from_secs(20), || async {
        f.current_sha().await
    })
    .await;
    let out = f.cli(&["scale", "--nodes", "2"]);
    assert!(
        out.status.success(),
        "scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    f.wait_all_running(2, &sha1, Duration::from_secs(30)).await;
    wait_for(
        "2 workers at the master",
        Duration::from_secs(30),
        || async { f.locust_stats().await.filter(|s| s["worker_count"] == 2) },
    )
    .await;
    let out = f.cli(&["swarm", "--users", &USERS.to_string(), "--spawn-rate", "4"]);
    assert!(
        out.status.success(),
        "swarm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_test_running(&f, "/alpha", "the test on /alpha").await;

    // A new user class: the master must restart to know it (docs/locust.md).
    f.write_spec(&locustfile(&target, "Api", &[("delta", "/delta")]));
    let sha2 = f.wait_new_sha(&sha1, Duration::from_secs(15)).await;
    let master = f.get_json("/api/master").await.unwrap();
    assert_eq!(master["epoch"], 2, "{master}");
    assert_eq!(master["user_classes"], serde_json::json!(["Api"]));
    let nodes = f.wait_all_running(2, &sha2, Duration::from_secs(30)).await;
    assert!(nodes
        .iter()
        .all(|n| n.heartbeat.running.as_ref().unwrap().master_epoch == 2));
    wait_test_running(&f, "/delta", "the test re-started on the new master").await;

    // The master crashes: it is restarted, agents follow the new epoch, the test goes on.
    let pid = master["pid"].as_i64().expect("master pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let master = wait_for("master restarted", Duration::from_secs(30), || async {
        f.get_json("/api/master")
            .await
            .filter(|m| m["epoch"] == 3 && m["pid"].as_i64().is_some())
    })
    .await;
    assert_ne!(master["pid"].as_i64().unwrap() as i32, pid);
    let spec = f.spec().await.unwrap();
    let cur = spec.current.unwrap();
    assert_eq!(
        (cur.sha256.as_str(), cur.master_epoch),
        (sha2.as_str(), 3),
        "same bundle, new epoch"
    );
    wait_for("agents on epoch 3", Duration::from_secs(30), || async {
        let n = f.nodes().await;
        (n.len() == 2
            && n.iter().all(|v| {
                v.heartbeat
                    .running
                    .as_ref()
                    .is_some_and(|r| r.master_epoch == 3)
            }))
        .then_some(())
    })
    .await;
    wait_test_running(&f, "/delta", "the test re-started after the master crash").await;
    assert!(
        f.serve_log().contains("re-started the test"),
        "{}",
        f.serve_log()
    );
    let _ = target_proc.kill();
    let _ = target_proc.wait();
}
