//! No agent left behind: bundle downloads that are reset or stall on the way are retried until
//! they succeed, without a second publication, and the agents say they are retrying meanwhile.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fleet_common::wire::UpdateState;
use fleet_tests::proxy::{Fault, FaultyProxy};
use fleet_tests::{free_port, wait_for, Fleet, Options};

const AGENTS: usize = 4;

#[tokio::test(flavor = "multi_thread")]
async fn reset_and_stalled_bundle_downloads_are_retried_until_every_agent_runs_the_new_spec() {
    let proxy_port = free_port();
    let mut f = Fleet::new(Options {
        managed_master: false,
        worker_command: Some(vec!["sleep".into(), "3600".into()]),
        agent_settings: vec![
            ("join_grace_ms".into(), 100.into()),
            ("stable_ms".into(), 500.into()),
        ],
        // The agents (and the CLI) reach the controller through the proxy.
        controller_settings: vec![(
            "url".into(),
            format!("https://127.0.0.1:{proxy_port}").into(),
        )],
        ..Options::default()
    });
    f.start_serve();
    let upstream: SocketAddr = format!("127.0.0.1:{}", f.port).parse().unwrap();
    // Manifests and heartbeat answers are far below 256 KiB; the 2 MiB bundle is far above.
    let faults = vec![Fault::Reset, Fault::Stall, Fault::Reset, Fault::Stall];
    let proxy = FaultyProxy::start(
        format!("127.0.0.1:{proxy_port}").parse().unwrap(),
        upstream,
        256 << 10,
        faults.clone(),
    )
    .await;
    let sha1 = wait_for("first publication", Duration::from_secs(20), || async {
        f.current_sha().await
    })
    .await;
    let out = f.cli(&["scale", "--nodes", &AGENTS.to_string()]);
    assert!(
        out.status.success(),
        "scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    f.wait_all_running(AGENTS, &sha1, Duration::from_secs(30))
        .await;
    assert_eq!(
        proxy.injected(),
        0,
        "the small first bundle passed untouched"
    );

    // A new spec with 2 MiB of incompressible data: every download of it is a big burst.
    let mut data = vec![0u8; 2 << 20];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut data).unwrap();
    std::fs::write(f.path().join("spec/data.bin"), &data).unwrap();
    let sha2 = f.wait_new_sha(&sha1, Duration::from_secs(20)).await;
    let seq2 = f.spec().await.unwrap().current.unwrap().sequence;

    // While the faults play out, some agent says it is retrying that very sequence.
    let mut retrying = HashSet::new();
    let t = Instant::now();
    loop {
        let nodes = f.nodes().await;
        for n in &nodes {
            if let Some(u) = &n.heartbeat.update {
                assert_ne!(
                    u.state,
                    UpdateState::Refused,
                    "a transient failure used up the sequence: {u:?}"
                );
                if u.sequence == seq2 && u.state == UpdateState::Retrying {
                    retrying.insert(n.heartbeat.node_id.clone());
                }
            }
        }
        let done = nodes.len() == AGENTS
            && nodes.iter().all(|n| {
                n.heartbeat.running.as_ref().map(|r| r.sha256.as_str()) == Some(&sha2)
                    && n.heartbeat.update.is_none()
            });
        if done {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "not every agent runs the new bundle after 90 s: {nodes:#?}\n{}",
            f.serve_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        proxy.injected(),
        faults.len(),
        "every planned fault hit a download"
    );
    assert!(
        !retrying.is_empty(),
        "no agent ever reported retrying the download"
    );
    let spec = f.spec().await.unwrap();
    assert_eq!(
        spec.current.unwrap().sequence,
        seq2,
        "no second publication was needed"
    );
}
