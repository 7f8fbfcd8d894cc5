//! `fleet run` with real Locust: a refused run without workers, one run whose files and
//! summary are checked against the `/stats/requests` answer it saved, and a 2×2 matrix that
//! scales the local fleet between its rows.

use std::path::Path;
use std::time::{Duration, Instant};

use fleet_tests::{locustfile, start_target, wait_for, Fleet, Options};

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()))
}

fn json(dir: &Path, name: &str) -> serde_json::Value {
    serde_json::from_str(&read(dir, name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The value of a `| key | value |` row of a Markdown table.
fn md_value(md: &str, key: &str) -> String {
    let prefix = format!("| {key} | ");
    md.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.strip_suffix(" |"))
        .unwrap_or_else(|| panic!("no row {key:?} in summary.md:\n{md}"))
        .to_string()
}

fn md_number(md: &str, key: &str) -> f64 {
    md_value(md, key)
        .parse()
        .unwrap_or_else(|e| panic!("{key}: {e}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 0.005 + 1e-9
}

fn ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Checks one run directory; returns its summary. The end-of-run numbers lag the workers by up
/// to ~5 s (3 s worker reports, 2 s cache): only a long enough run must have requests in them.
fn check_run(dir: &Path, users: u64, nodes: u64, long: bool) -> serde_json::Value {
    for f in ["stats.csv", "failures.csv", "exceptions.csv", "report.html"] {
        assert!(
            !read(dir, f).is_empty(),
            "{} is empty",
            dir.join(f).display()
        );
    }
    assert!(read(dir, "stats.csv").contains("Aggregated"));
    assert!(read(dir, "failures.csv").starts_with("Method,Name,Error"));
    assert!(read(dir, "exceptions.csv").starts_with("Count,Message"));
    assert!(read(dir, "report.html").contains("<html"));
    // The managed master runs with --csv-full-history: the history is there, cut to the run.
    let history = read(dir, "stats_history.csv");
    assert!(history.starts_with("Timestamp,User Count"), "{history}");
    assert!(
        history.lines().skip(1).any(|l| l.contains(",Aggregated,")),
        "no history rows: {history}"
    );

    let stats = json(dir, "stats.json");
    let summary = json(dir, "summary.json");
    let agg = stats["stats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "Aggregated")
        .expect("Aggregated row")
        .clone();
    let requests = agg["num_requests"].as_u64().unwrap();
    assert!(!long || requests > 0, "no requests: {stats}");
    let after_stop = summary["requests_after_stop"].as_u64().unwrap();
    assert!(after_stop > 0 && after_stop >= requests, "{summary}");
    assert_eq!(summary["requests"], requests);
    assert_eq!(summary["failures"], agg["num_failures"]);
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    assert_eq!(f(&summary["rps"]), f(&agg["total_rps"]));
    assert_eq!(f(&summary["p50_ms"]), f(&agg["median_response_time"]));
    assert_eq!(
        f(&summary["p95_ms"]),
        f(&agg["response_time_percentile_0.95"])
    );
    assert_eq!(
        f(&summary["p99_ms"]),
        f(&agg["response_time_percentile_0.99"])
    );
    // No request yet in the end-of-run numbers (short matrix runs): 0 %, not NaN.
    let pct = if requests == 0 {
        0.0
    } else {
        f(&agg["num_failures"]) * 100.0 / requests as f64
    };
    assert_eq!(f(&summary["failure_pct"]), pct);
    assert_eq!(summary["workers"], stats["worker_count"]);
    assert_eq!(summary["workers"], nodes, "{summary}");
    assert_eq!(summary["nodes"], nodes, "{summary}");
    assert_eq!(summary["users"], users);
    assert_eq!(summary["history"], true);
    assert_eq!(stats["state"], "running", "numbers taken before the stop");

    let md = read(dir, "summary.md");
    assert_eq!(md_number(&md, "requests") as u64, requests);
    assert!(close(md_number(&md, "RPS"), f(&summary["rps"])), "{md}");
    for (k, j) in [
        ("p50 (ms)", "p50_ms"),
        ("p95 (ms)", "p95_ms"),
        ("p99 (ms)", "p99_ms"),
        ("failure %", "failure_pct"),
    ] {
        assert!(close(md_number(&md, k), f(&summary[j])), "{k}: {md}");
    }
    assert_eq!(md_number(&md, "workers") as u64, nodes);
    summary
}

#[tokio::test(flavor = "multi_thread")]
async fn run_writes_reports_and_a_matrix() {
    let t0 = Instant::now();
    let (target, mut target_proc) = start_target();
    let mut f = Fleet::new(Options::default());
    f.write_spec(&locustfile(&target, "Web", &[("a", "/a")]));
    f.start_serve();
    let sha = wait_for("first publication", Duration::from_secs(20), || async {
        f.current_sha().await
    })
    .await;
    wait_for(
        "the Locust master answering",
        Duration::from_secs(30),
        || async { f.locust_stats().await },
    )
    .await;
    let results = tempfile::tempdir().unwrap();

    // No worker yet: one line that says what to do, and no test left behind.
    let out = f.cli(&[
        "run",
        "--users",
        "1",
        "--duration",
        "3s",
        "--out",
        results.path().join("refused").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("no Locust worker") && err.contains("fleet scale"),
        "{err}"
    );
    assert!(f.get_json("/api/master").await.unwrap()["swarm"].is_null());

    ok(
        &f.cli(&["--output", "json", "scale", "--nodes", "2"]),
        "scale",
    );
    f.wait_all_running(2, &sha, Duration::from_secs(30)).await;
    wait_for(
        "2 workers at the master",
        Duration::from_secs(30),
        || async { f.locust_stats().await.filter(|s| s["worker_count"] == 2) },
    )
    .await;

    // One run.
    let one = results.path().join("one");
    let t = Instant::now();
    let out = f.cli(&[
        "--output",
        "json",
        "run",
        "--users",
        "4",
        "--spawn-rate",
        "4",
        "--duration",
        "8s",
        "--out",
        one.to_str().unwrap(),
    ]);
    ok(&out, "run");
    eprintln!("single run took {:.1} s", t.elapsed().as_secs_f64());
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let summary = check_run(&one, 4, 2, true);
    assert_eq!(printed, summary, "stdout is summary.json");
    assert_eq!(summary["spec_sha256"], sha.as_str());
    assert_eq!(summary["spec_sequence"], 1);
    assert_eq!(summary["spawn_rate"], 4.0);
    assert_eq!(summary["duration_s"], 8.0);
    // The test was stopped and forgotten.
    assert!(f.get_json("/api/master").await.unwrap()["swarm"].is_null());
    wait_for("Locust stopped", Duration::from_secs(10), || async {
        f.locust_stats().await.filter(|s| s["state"] == "stopped")
    })
    .await;

    // A matrix: node counts 1 and 2, user counts 2 and 4.
    let m = results.path().join("matrix");
    let t = Instant::now();
    let out = f.cli(&[
        "--output",
        "json",
        "run",
        "--matrix",
        "users=2,4",
        "--nodes",
        "1,2",
        "--duration",
        "4s",
        "--out",
        m.to_str().unwrap(),
    ]);
    ok(&out, "matrix");
    eprintln!("matrix took {:.1} s", t.elapsed().as_secs_f64());
    let csv = read(&m, "matrix.csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "nodes,users,workers,rps,p50_ms,p95_ms,p99_ms,failure_pct,requests"
    );
    assert_eq!(lines.len(), 5, "{csv}");
    let mut seen = vec![];
    for line in &lines[1..] {
        let cols: Vec<&str> = line.split(',').collect();
        let (nodes, users): (u64, u64) = (cols[0].parse().unwrap(), cols[1].parse().unwrap());
        seen.push((nodes, users));
        let s = check_run(
            &m.join(format!("nodes-{nodes}-users-{users}")),
            users,
            nodes,
            false,
        );
        assert_eq!(cols[2], s["workers"].to_string(), "{line}");
        assert_eq!(cols[8], s["requests"].to_string(), "{line}");
        assert!(close(cols[3].parse().unwrap(), s["rps"].as_f64().unwrap()));
    }
    assert_eq!(seen, [(1, 2), (1, 4), (2, 2), (2, 4)]);
    let md = read(&m, "matrix.md");
    assert_eq!(
        md.lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| nodes"))
            .count(),
        4,
        "{md}"
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["runs"].as_array().unwrap().len(), 4);

    let _ = target_proc.kill();
    let _ = target_proc.wait();
    eprintln!("whole test {:.1} s", t0.elapsed().as_secs_f64());
}
