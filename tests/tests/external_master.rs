//! With an external (unmanaged) master, spec edits still reach every agent: the controller
//! only publishes, and agents restart their (stub) workers on each new bundle.

use std::time::Duration;

use fleet_tests::{wait_for, Fleet, Options};

#[tokio::test(flavor = "multi_thread")]
async fn edits_reach_every_agent_without_a_managed_master() {
    let mut f = Fleet::new(Options {
        managed_master: false,
        worker_command: Some(vec!["sleep".into(), "3600".into()]),
        agent_settings: vec![("join_grace_ms".into(), 100.into())],
        ..Options::default()
    });
    f.start_serve();
    let mut sha = wait_for("first publication", Duration::from_secs(20), || async {
        f.current_sha().await
    })
    .await;
    let out = f.cli(&["scale", "--nodes", "3"]);
    assert!(
        out.status.success(),
        "scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    f.wait_all_running(3, &sha, Duration::from_secs(20)).await;
    let base = std::fs::read_to_string(f.spec_file()).unwrap();
    for round in 1..=3u64 {
        f.write_spec(&format!("{base}\n# edit {round}\n"));
        sha = f.wait_new_sha(&sha, Duration::from_secs(10)).await;
        let nodes = f.wait_all_running(3, &sha, Duration::from_secs(20)).await;
        assert!(nodes
            .iter()
            .all(|n| n.heartbeat.running.as_ref().unwrap().sequence == 1 + round));
    }
    let master = f.get_json("/api/master").await.unwrap();
    assert_eq!(master["managed"], false);
    assert_eq!(master["epoch"], 0);
}
