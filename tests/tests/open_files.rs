//! `fleet serve` under a low open-files limit, with more connections than the limit allows:
//! it raises its soft limit to the hard one, serves what fits under its connection cap, sheds
//! the rest with a fast answer clients back off from, never loops on a failing `accept`, keeps
//! `/healthz` fast, and agents converge.

use std::time::{Duration, Instant};

use fleet_common::client::Client;
use fleet_tests::{wait_for, Fleet, Options};
use tokio::task::JoinSet;

const CONNECTIONS: usize = 1100;

fn stub_fleet() -> Fleet {
    Fleet::new(Options {
        managed_master: false,
        worker_command: Some(vec!["sleep".into(), "3600".into()]),
        agent_settings: vec![
            ("stable_ms".into(), 300.into()),
            ("join_grace_ms".into(), 100.into()),
        ],
        ..Options::default()
    })
}

/// The test process itself needs a descriptor per connection it holds.
fn raise_own_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let want = (CONNECTIONS as u64 + 512).min(hard);
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard).unwrap();
    }
    assert!(
        want >= CONNECTIONS as u64 + 256,
        "this test needs a hard open-files limit over {}",
        CONNECTIONS + 256
    );
}

/// `n` clients, each holding its own connection after one request to `path`; returns every
/// client with the status it got (or `None` when it could not connect).
async fn open_clients(f: &Fleet, n: usize, path: &str) -> Vec<(Client, Option<u16>)> {
    let mut set = JoinSet::new();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let c = f.agent();
        let path = path.to_string();
        set.spawn(async move {
            let r = c.get(&path, Duration::from_secs(30), 1 << 20).await;
            (c, r.ok().map(|r| r.status))
        });
        // Batches of 100 in flight: a thousand handshakes at once is not what is tested.
        if i % 100 == 99 {
            while let Some(r) = set.join_next().await {
                out.push(r.unwrap());
            }
        }
    }
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap());
    }
    out
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The slowest of five `/healthz` requests, each on a new connection.
async fn slowest_health(f: &Fleet) -> Duration {
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        let r = f
            .client_with(None)
            .get("/healthz", Duration::from_secs(10), 1024)
            .await
            .expect("health check answered");
        assert_eq!(r.status, 200, "health check: {:?}", r.body);
        worst = worst.max(t.elapsed());
    }
    worst
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

async fn scale(f: &Fleet, n: usize) {
    let out = f.cli(&["scale", "--nodes", &n.to_string(), "--wait", "0"]);
    assert!(
        out.status.success(),
        "scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every one of `n` nodes reports `sha` as running.
async fn converge(f: &Fleet, n: usize, sha: &str, timeout: Duration) {
    wait_for(&format!("{n} agents on {sha}"), timeout, || async {
        let nodes = f.nodes().await;
        let on = nodes
            .iter()
            .filter(|v| {
                v.heartbeat
                    .running
                    .as_ref()
                    .is_some_and(|r| r.sha256 == sha)
            })
            .count();
        (on == n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn under_a_soft_limit_of_1024_the_controller_raises_it_and_serves_1100_connections() {
    raise_own_nofile();
    let mut f = stub_fleet();
    f.start_serve_with_nofile(1024, None);
    let sha = wait_for("first publication", Duration::from_secs(20), || async {
        f.current_sha().await
    })
    .await;
    let log = f.serve_log();
    assert!(
        log.contains("open files: soft limit raised from 1024 to"),
        "the raise is logged: {log}"
    );

    let held = open_clients(&f, CONNECTIONS, "/v1/manifest").await;
    let ok = held.iter().filter(|(_, s)| *s == Some(200)).count();
    assert_eq!(ok, CONNECTIONS, "every connection served");
    let pid = f.serve_pid().unwrap();
    let fds = open_fds(pid);
    assert!(
        fds > CONNECTIONS,
        "the {CONNECTIONS} connections are held at once ({fds} descriptors open)"
    );
    let worst = slowest_health(&f).await;
    assert!(
        worst < Duration::from_millis(500),
        "/healthz took {worst:?} with {CONNECTIONS} connections open"
    );

    scale(&f, 3).await;
    converge(&f, 3, &sha, Duration::from_secs(60)).await;
    f.write_spec("from locust import User\n\n\nclass Stub(User):\n    pass\n# edited\n");
    let new = f.wait_new_sha(&sha, Duration::from_secs(20)).await;
    converge(&f, 3, &new, Duration::from_secs(60)).await;
    // The 1100 connections were in use all along.
    assert!(open_fds(pid) > CONNECTIONS);
    drop(held);

    let log = f.serve_log();
    assert_eq!(count(&log, "accept failed"), 0, "{log}");
    assert_eq!(count(&log, "at the cap"), 0, "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_low_hard_limit_the_excess_is_shed_and_agents_get_in_once_there_is_room() {
    raise_own_nofile();
    let mut f = stub_fleet();
    f.start_serve_with_nofile(1024, Some(1024));
    let sha = wait_for("first publication", Duration::from_secs(20), || async {
        f.current_sha().await
    })
    .await;
    let log = f.serve_log();
    assert!(
        log.contains("open files: soft limit 1024 (hard 1024); serving at most 768 connections"),
        "{log}"
    );

    let held = open_clients(&f, CONNECTIONS, "/v1/manifest").await;
    let served = held.iter().filter(|(_, s)| *s == Some(200)).count();
    let told_to_wait = held.iter().filter(|(_, s)| *s == Some(503)).count();
    let closed = held.iter().filter(|(_, s)| s.is_none()).count();
    eprintln!("{served} served, {told_to_wait} answered 503, {closed} closed");
    assert_eq!(
        served + told_to_wait + closed,
        CONNECTIONS,
        "only 200, 503 or a closed connection"
    );
    assert!(
        (700..=768).contains(&served),
        "served up to the cap of 768 ({served}; 503: {told_to_wait}, closed: {closed})"
    );
    assert!(
        told_to_wait > 0,
        "the excess is answered 503 ({closed} closed)"
    );
    let pid = f.serve_pid().unwrap();
    assert!(open_fds(pid) <= 1024);

    // A shed answer tells clients when to come back.
    let shed = f
        .agent()
        .get("/v1/manifest", Duration::from_secs(10), 1 << 20)
        .await
        .expect("answered");
    assert_eq!(shed.status, 503);
    assert_eq!(shed.header("retry-after"), Some("5"));
    let worst = slowest_health(&f).await;
    assert!(
        worst < Duration::from_millis(500),
        "/healthz took {worst:?} at the connection cap"
    );

    // Agents started at the cap are shed and back off; once connections are released they
    // get in.
    scale(&f, 3).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(held);
    converge(&f, 3, &sha, Duration::from_secs(60)).await;

    let log = f.serve_log();
    assert_eq!(count(&log, "accept failed"), 0, "{log}");
    let cap_lines = count(&log, "at the cap of 768 connections");
    assert!(
        (1..=4).contains(&cap_lines),
        "shedding is logged, once per 10 s at most ({cap_lines} lines): {log}"
    );
}
