//! A controller that lost its `state/` (a new host, a restored backup) but kept its keys brings
//! every agent onto its spec with no manual step: it learns from their heartbeats how far the
//! sequence had counted, and counts on from above it.

use std::time::Duration;

use fleet_tests::{wait_for, Fleet, Options};

const AGENTS: usize = 20;

#[tokio::test(flavor = "multi_thread")]
async fn agents_follow_a_controller_that_lost_its_state() {
    let mut f = Fleet::new(Options {
        managed_master: false,
        worker_command: Some(vec!["sleep".into(), "3600".into()]),
        agent_settings: vec![
            ("join_grace_ms".into(), 100.into()),
            ("stable_ms".into(), 500.into()),
        ],
        ..Options::default()
    });
    // An earlier life of this controller had counted to 39: its first publication is 40.
    let manifests = f.path().join("state/published/manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join(".highest"), "39").unwrap();
    f.start_serve();
    let sha1 = wait_for("first publication", Duration::from_secs(20), || async {
        f.current_sha().await
    })
    .await;
    assert_eq!(f.spec().await.unwrap().current.unwrap().sequence, 40);
    let out = f.cli(&["scale", "--nodes", &AGENTS.to_string()]);
    assert!(
        out.status.success(),
        "scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nodes = f
        .wait_all_running(AGENTS, &sha1, Duration::from_secs(60))
        .await;
    assert!(nodes
        .iter()
        .all(|n| n.heartbeat.running.as_ref().unwrap().sequence == 40));

    // The state is lost; the keys and the agents stay.
    f.stop_serve();
    std::fs::remove_dir_all(f.path().join("state")).unwrap();
    f.start_serve();
    wait_for(
        "a publication after the restart",
        Duration::from_secs(20),
        || async { f.current_sha().await },
    )
    .await;
    f.write_spec("from locust import User, task\n\n\nclass Next(User):\n    @task\n    def t(self):\n        pass\n");
    let sha2 = f.wait_new_sha(&sha1, Duration::from_secs(20)).await;
    let nodes = f
        .wait_all_running(AGENTS, &sha2, Duration::from_secs(60))
        .await;
    let spec = f.spec().await.unwrap().current.unwrap();
    assert!(
        spec.sequence > 40,
        "the controller counts on from above what the agents had seen: {spec:?}"
    );
    assert!(nodes
        .iter()
        .all(|n| n.heartbeat.running.as_ref().unwrap().sequence > 40));
    assert!(
        f.serve_log().contains("an agent has seen sequence 40"),
        "the controller says why it skipped ahead:\n{}",
        f.serve_log()
    );
}
