//! An agent that starts while the controller is down runs its last good bundle from disk, and
//! reports to the controller once it is back.

use std::process::{Command, Stdio};
use std::time::Duration;

use fleet_tests::{bin, procfs, wait_for, Fleet, Options};

#[tokio::test(flavor = "multi_thread")]
async fn agent_starts_from_the_last_good_bundle_without_a_controller() {
    let marks = tempfile::tempdir().unwrap();
    let starts = marks.path().join("starts");
    let stub = format!(
        "echo {{bundle_dir}} >> {}; exec sleep 3600",
        starts.display()
    );
    let mut f = Fleet::new(Options {
        managed_master: false,
        worker_command: Some(vec!["sh".into(), "-c".into(), stub]),
        agent_settings: vec![
            ("stable_ms".into(), 500.into()),
            ("join_grace_ms".into(), 100.into()),
        ],
        ..Options::default()
    });
    f.start_serve();
    let sha = wait_for("first publication", Duration::from_secs(20), || async {
        f.current_sha().await
    })
    .await;
    let out = f.cli(&["scale", "--nodes", "1"]);
    assert!(
        out.status.success(),
        "scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the bundle proven", Duration::from_secs(20), || async {
        f.nodes()
            .await
            .into_iter()
            .find(|n| n.heartbeat.last_good.as_deref() == Some(sha.as_str()))
    })
    .await;

    // Controller down; the agent is stopped and started again, as after a reboot.
    f.stop_serve();
    let node = f.path().join("local/local-0001");
    let pid: i32 = std::fs::read_to_string(node.join("agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_for("the agent stopped", Duration::from_secs(10), || async {
        procfs::is_gone(pid as u32).then_some(())
    })
    .await;
    let before = std::fs::read_to_string(&starts).unwrap().lines().count();
    let log = std::fs::File::create(node.join("agent-offline.log")).unwrap();
    let mut agent = Command::new(bin("fleet-agent"))
        .arg("--config")
        .arg(node.join("agent.toml"))
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    // `fleet down` (the harness's cleanup) finds it by this file.
    std::fs::write(node.join("agent.pid"), agent.id().to_string()).unwrap();
    let line = wait_for(
        "a worker started offline",
        Duration::from_secs(10),
        || async {
            let text = std::fs::read_to_string(&starts).unwrap_or_default();
            text.lines().nth(before).map(str::to_string)
        },
    )
    .await;
    assert!(
        line.ends_with(&sha),
        "offline start ran {line}, not the last good {sha}"
    );
    let log = std::fs::read_to_string(node.join("agent-offline.log")).unwrap();
    assert!(log.contains("unreachable"), "{log}");

    // The controller comes back: the agent reports the bundle it runs.
    f.start_serve();
    let n = wait_for("the agent back", Duration::from_secs(20), || async {
        f.nodes().await.into_iter().find(|n| {
            n.heartbeat
                .running
                .as_ref()
                .is_some_and(|r| r.sha256 == sha)
        })
    })
    .await;
    assert_eq!(n.heartbeat.node_id, "local-0001");
    // SIGTERM: the agent stops its workers before it exits.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(agent.wait().unwrap().success());
}
