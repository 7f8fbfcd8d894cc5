//! The merged view's foundation, with real Locust masters: fleet's stats plugin
//! (`GET <base>/fleet/stats`) and the merge of several masters' snapshots.
//!
//! Three masters run the pool's locustfile with the plugin. tests/support/merge_feed.py sends
//! the simulated pool's worker reports of feed A to masters 1 and 3 and those of feed B to
//! masters 2 and 3, so master 3 holds exactly the requests of the other two. Merging masters 1
//! and 2 must then give master 3's numbers: counts, histograms and percentiles exact. The two
//! feeds differ in size and response times, so averaging the two masters' percentiles (what a
//! merge without histograms would do) gives other numbers, which the test shows.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleet::master::merge::{self, Merged, Report, Row, Snapshot};
use fleet_tests::{free_port, locust, locustfile, wait_for, workspace_root, Fleet, Options};

const BASE: &str = "/locust";

/// A Locust master on the pool's locustfile with fleet's plugin, as the controller starts one.
struct Master {
    child: Child,
    zmq: u16,
    web: u16,
}

impl Master {
    fn start() -> Master {
        let (zmq, web) = (free_port(), free_port());
        let plugin = workspace_root().join("controller/src/master/fleet_merged_stats.py");
        let child = Command::new(locust())
            .arg("-f")
            .arg(format!("pool_locustfile.py,{}", plugin.display()))
            .args(["--master", "--master-bind-host", "127.0.0.1"])
            .args(["--master-bind-port", &zmq.to_string()])
            .args(["--web-host", "127.0.0.1", "--web-port", &web.to_string()])
            .args(["--web-base-path", BASE])
            .current_dir(workspace_root().join("tests/support"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("locust --master");
        Master { child, zmq, web }
    }

    /// `GET BASE + path` on the web UI: the status and body (HTTP/1.0, so the body ends with
    /// the connection).
    fn get(&self, path: &str) -> Option<(u16, Vec<u8>)> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.web)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "GET {BASE}{path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut buf = vec![];
        s.read_to_end(&mut buf).ok()?;
        let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
        let status = std::str::from_utf8(&buf[9..12]).ok()?.parse().ok()?;
        Some((status, buf[head_end + 4..].to_vec()))
    }

    fn snapshot(&self) -> Option<Snapshot> {
        match self.get(merge::PATH)? {
            (200, body) => Some(Snapshot::from_json(&body).expect("a format-1 snapshot")),
            _ => None,
        }
    }

    /// Locust's own `/stats/requests`.
    fn requests(&self) -> Option<serde_json::Value> {
        match self.get("/stats/requests")? {
            (200, body) => serde_json::from_slice(&body).ok(),
            _ => None,
        }
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a feed sent.
#[derive(Debug, serde::Deserialize)]
struct Fed {
    reports: u64,
    requests: u64,
    failures: u64,
}

fn feed(masters: &[&Master], args: &[&str]) -> Fed {
    let python = locust().with_file_name("python");
    let list: Vec<String> = masters
        .iter()
        .map(|m| format!("127.0.0.1:{}", m.zmq))
        .collect();
    let out = Command::new(python)
        .arg("merge_feed.py")
        .args(["--masters", &list.join(",")])
        .args(args)
        .current_dir(workspace_root().join("tests/support"))
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "merge_feed.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("merge_feed.py's line")
}

async fn settled(m: &Master, requests: u64, what: &str) -> Snapshot {
    wait_for(what, Duration::from_secs(30), || async {
        m.snapshot().filter(|s| s.total.num_requests == requests)
    })
    .await
}

/// Locust's rows by (name, method).
fn rows(requests: &serde_json::Value) -> Vec<Row> {
    serde_json::from_value(requests["stats"].clone()).expect("Locust's rows")
}

fn row<'a>(rows: &'a [Row], name: &str) -> Option<&'a Row> {
    rows.iter().find(|r| r.name == name)
}

/// The merged entries with the per-second counts cut to the seconds every master still sends
/// (the plugin sends the last 20 before each master's own last request).
fn comparable(m: &Merged) -> Merged {
    let from = m.clock.last_request_timestamp.expect("requests").trunc() as i64 - 20;
    let mut m = m.clone();
    for e in m.entries.values_mut().chain([&mut m.total]) {
        e.reqs_per_sec.0.retain(|t, _| *t >= from);
        e.fails_per_sec.0.retain(|t, _| *t >= from);
    }
    m
}

/// A report without the rates over the whole run (each master's stats began at its own start)
/// and without the count of masters merged.
fn without_run_rates(r: &Report) -> Report {
    let mut r = r.clone();
    r.masters = 0;
    r.total_rps = 0.0;
    r.total_fail_per_sec = 0.0;
    for row in &mut r.stats {
        row.total_rps = 0.0;
        row.total_fail_per_sec = 0.0;
    }
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn two_merged_masters_equal_one_master_fed_the_same_samples() {
    let (m1, m2, m3) = (Master::start(), Master::start(), Master::start());
    for m in [&m1, &m2, &m3] {
        wait_for(
            "a master's /fleet/stats",
            Duration::from_secs(30),
            || async { m.snapshot() },
        )
        .await;
    }
    // A: many requests around 60 ms. B: few, with other response times and more failures.
    let a = feed(
        &[&m1, &m3],
        &[
            "--seed",
            "11",
            "--workers",
            "6",
            "--users",
            "5",
            "--spread",
            "30",
        ],
    );
    let b = feed(
        &[&m2, &m3],
        &[
            "--seed",
            "12",
            "--workers",
            "2",
            "--users",
            "3",
            "--spread",
            "6",
            "--fail-ratio",
            "0.2",
        ],
    );
    assert!(a.reports > 0 && b.reports > 0 && a.failures > 0 && b.failures > 0);
    let s1 = settled(&m1, a.requests, "master 1 to hold feed A").await;
    let s2 = settled(&m2, b.requests, "master 2 to hold feed B").await;
    let s3 = settled(&m3, a.requests + b.requests, "master 3 to hold both").await;

    // The raw numbers: every endpoint, histogram and error of master 3, exactly.
    let merged = merge::merge(&[s1, s2]);
    let one = merge::merge(&[s3]);
    assert_eq!(merged.total.num_failures, a.failures + b.failures);
    assert_eq!(comparable(&merged).total, comparable(&one).total);
    assert_eq!(comparable(&merged).entries, comparable(&one).entries);
    assert_eq!(merged.errors, one.errors);
    assert_eq!(
        merged.clock.last_request_timestamp,
        one.clock.last_request_timestamp
    );

    // The numbers shown: master 3's own `/stats/requests`, percentiles and current RPS
    // included, computed by the Rust port from master 3's snapshot, and from the merge.
    let r1 = wait_for(
        "master 1's /stats/requests",
        Duration::from_secs(10),
        || async { m1.requests() },
    )
    .await;
    let r2 = m2.requests().expect("master 2's /stats/requests");
    let r3 = wait_for(
        "master 3's /stats/requests with both feeds",
        Duration::from_secs(10),
        || async {
            m3.requests().filter(|r| {
                row(&rows(r), "Aggregated")
                    .is_some_and(|t| t.num_requests == a.requests + b.requests)
            })
        },
    )
    .await;
    let locust3 = rows(&r3);
    let mine3 = one.report();
    assert_eq!(mine3.stats, locust3, "the Rust port of Locust's rows");
    assert_eq!(mine3.current_rps, r3["current_rps"].as_f64().unwrap());
    assert_eq!(mine3.fail_ratio, r3["fail_ratio"].as_f64().unwrap());
    let report = merged.report();
    assert_eq!(without_run_rates(&report), without_run_rates(&mine3));
    assert!(report.current_rps > 0.0 && report.masters == 2);

    // The merged totals are the sum of the shards' own `/stats/requests`.
    let (locust1, locust2) = (rows(&r1), rows(&r2));
    for r in &report.stats {
        let of =
            |rows: &[Row]| row(rows, &r.name).map_or((0, 0), |x| (x.num_requests, x.num_failures));
        let ((n1, f1), (n2, f2)) = (of(&locust1), of(&locust2));
        assert_eq!(
            (r.num_requests, r.num_failures),
            (n1 + n2, f1 + f2),
            "{}",
            r.name
        );
    }

    // What averaging the shards' percentiles would have said instead.
    let total = |rows: &[Row]| row(rows, "Aggregated").unwrap().clone();
    let (t1, t2, t3) = (total(&locust1), total(&locust2), total(&locust3));
    let merged_total = total(&report.stats);
    assert_eq!(
        (
            merged_total.median_response_time,
            merged_total.p95,
            merged_total.p99
        ),
        (t3.median_response_time, t3.p95, t3.p99)
    );
    let averaged = (
        (t1.p95 + t2.p95) as f64 / 2.0,
        (t1.p99 + t2.p99) as f64 / 2.0,
    );
    assert_ne!(averaged.0, t3.p95 as f64, "{t1:?} {t2:?} {t3:?}");
    assert_ne!(averaged.1, t3.p99 as f64, "{t1:?} {t2:?} {t3:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_managed_master_serves_its_snapshot_and_only_the_specs_user_classes() {
    let mut f = Fleet::new(Options::default());
    f.write_spec(&locustfile(
        "http://127.0.0.1:1",
        "Web",
        &[("alpha", "/alpha")],
    ));
    f.start_serve();
    let snap = wait_for(
        "the managed master's /fleet/stats through the proxy",
        Duration::from_secs(60),
        || async { f.get_json(&format!("{BASE}{}", merge::PATH)).await },
    )
    .await;
    let snap = Snapshot::from_json(snap.to_string().as_bytes()).expect("a format-1 snapshot");
    assert_eq!((snap.state.as_str(), snap.total.num_requests), ("ready", 0));
    assert!(snap.entries.is_empty() && snap.errors.is_empty());
    // The plugin is a second locustfile: Locust offers the spec's classes and no other.
    let tasks = f.get_json(&format!("{BASE}/tasks")).await.expect("/tasks");
    let classes: Vec<&String> = tasks["per_class"]
        .as_object()
        .expect("per_class")
        .keys()
        .collect();
    assert_eq!(classes, ["Web"]);
}
