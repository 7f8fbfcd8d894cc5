//! A spec whose workers crash-loop is rolled back to the last good one, with real Locust, and
//! the agents say so; a fixed spec is then taken up normally.

use std::time::Duration;

use fleet_common::wire::{NodeStatus, WorkerState};
use fleet_tests::{locustfile, start_target, wait_for, Fleet, Options};

#[tokio::test(flavor = "multi_thread")]
async fn crash_looping_spec_is_rolled_back_to_the_last_good_one() {
    let (target, mut target_proc) = start_target();
    let mut f = Fleet::new(Options {
        agent_settings: vec![
            ("stable_ms".into(), 6000.into()),
            ("crash_loop_exits".into(), 3.into()),
        ],
        // The spec below fails on the nodes only as far as this test is concerned: the gate
        // would refuse it before any agent saw it (tests/tests/spec.rs), so it is off here.
        spec_settings: vec![("validate".into(), false.into())],
        ..Options::default()
    });
    let good = locustfile(&target, "Web", &[("alpha", "/alpha")]);
    f.write_spec(&good);
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
    // Wait until the first bundle is proven (the agents' last good one).
    wait_for(
        "sha1 promoted to last good",
        Duration::from_secs(40),
        || async {
            let n = f.nodes().await;
            (n.len() == 2
                && n.iter()
                    .all(|v| v.heartbeat.last_good.as_deref() == Some(sha1.as_str())))
            .then_some(())
        },
    )
    .await;

    // Same user class (no master restart), but the module raises at import: every worker exits.
    f.write_spec(&format!(
        "{good}\nraise RuntimeError(\"broken on purpose\")\n"
    ));
    let sha2 = f.wait_new_sha(&sha1, Duration::from_secs(10)).await;
    let nodes = wait_for(
        "both agents rolled back",
        Duration::from_secs(60),
        || async {
            let n = f.nodes().await;
            let done = n.len() == 2
                && n.iter().all(|v| {
                    let hb = &v.heartbeat;
                    hb.status == NodeStatus::RolledBack
                        && hb.rejected.as_deref() == Some(sha2.as_str())
                        && hb.running.as_ref().is_some_and(|r| r.sha256 == sha1)
                        && hb.workers.iter().all(|w| w.state == WorkerState::Running)
                });
            done.then_some(n)
        },
    )
    .await;
    for n in &nodes {
        let e = n.heartbeat.last_error.as_deref().unwrap_or("");
        assert!(e.contains("crash-looped") || e.contains("exited"), "{e}");
    }
    // Workers of the good bundle run at the master again.
    wait_for(
        "workers back at the master",
        Duration::from_secs(30),
        || async { f.locust_stats().await.filter(|s| s["worker_count"] == 2) },
    )
    .await;

    // A fixed spec is taken up as usual.
    f.write_spec(&locustfile(&target, "Web", &[("alpha", "/gamma")]));
    let sha3 = f.wait_new_sha(&sha2, Duration::from_secs(10)).await;
    let nodes = f.wait_all_running(2, &sha3, Duration::from_secs(30)).await;
    assert!(
        nodes.iter().all(|n| n.heartbeat.rejected.is_none()),
        "{nodes:?}"
    );
    let _ = target_proc.kill();
    let _ = target_proc.wait();
}
