//! `fleet run` with real Locust: a refused run without workers, one run whose files and
//! summary are checked against the `/stats/requests` answer it saved, and a 2×2 matrix that
//! scales the local fleet between its rows. Thresholds (`--fail-on`, `[run] fail_on`): the run
//! passes them (exit 0), a second run breaks some (exit 99), the matrix breaks one in every
//! cell; each writes a JUnit file that `tests/support/junit.xsd` must accept (xmllint, from
//! Debian's libxml2-utils: `./run.sh setup` installs it).

use std::path::Path;
use std::process::Command;
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

/// Checks a JUnit file against tests/support/junit.xsd with xmllint; returns the numbers of
/// `<testsuite>`, `<testcase>` and `<failure>` elements.
fn junit(file: &Path) -> (usize, usize, usize) {
    let out = xmllint(file);
    assert!(
        out.status.success(),
        "{} is not valid JUnit XML: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let x = std::fs::read_to_string(file).unwrap();
    (
        x.matches("<testsuite ").count(),
        x.matches("<testcase ").count(),
        x.matches("<failure ").count(),
    )
}

fn xmllint(file: &Path) -> std::process::Output {
    let xsd = Path::new(env!("CARGO_MANIFEST_DIR")).join("support/junit.xsd");
    Command::new("xmllint")
        .args(["--noout", "--schema"])
        .arg(xsd)
        .arg(file)
        .output()
        .expect("xmllint is missing: install libxml2-utils (./run.sh setup does)")
}

/// The schema check is not a formality: it refuses what CI systems would misread.
#[test]
fn the_junit_schema_refuses_malformed_reports() {
    let d = tempfile::tempdir().unwrap();
    let suite = |case: &str| {
        format!(
            "<testsuites><testsuite name=\"s\" tests=\"1\" timestamp=\"2026-11-25T00:42:50\">{case}</testsuite></testsuites>"
        )
    };
    let cases = [
        ("ok", suite("<testcase name=\"a\" time=\"0\"><failure message=\"m\">t</failure></testcase>"), true),
        ("no-name", suite("<testcase time=\"0\"/>"), false),
        ("bad-time", suite("<testcase name=\"a\" time=\"soon\"/>"), false),
        ("unknown", suite("<testcase name=\"a\"><failed/></testcase>"), false),
        (
            "zone",
            "<testsuites><testsuite name=\"s\" tests=\"0\" timestamp=\"2026-11-25T00:42:50Z\"/></testsuites>".to_string(),
            false,
        ),
    ];
    for (name, xml, valid) in cases {
        let f = d.path().join(format!("{name}.xml"));
        std::fs::write(&f, xml).unwrap();
        assert_eq!(xmllint(&f).status.success(), valid, "{name}");
    }
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
    f.write_spec(&locustfile(
        &target,
        "Web",
        &[("a", "/a"), ("bad", "/status/500")],
    ));
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
    // A threshold that cannot be read: refused at once, in one line, before anything runs.
    let out = f.cli(&[
        "run",
        "--users",
        "1",
        "--duration",
        "3s",
        "--fail-on",
        "p95>500",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        "fleet: --fail-on \"p95>500\": p95 takes a time with its unit, e.g. p95>500ms or p95>1.5s, not \"500\""
    );

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

    // One run, whose thresholds all pass (the edge: /status/500 fails 100 %, which is not < 100 %).
    let one = results.path().join("one");
    let one_xml = results.path().join("one.xml");
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
        "--fail-on",
        "failure_rate>=90%",
        "--fail-on",
        "p95>10s",
        "--fail-on",
        "requests<1",
        "--fail-on",
        "GET /a: failures>0",
        "--fail-on",
        "GET /status/500: failure_rate<100%",
        "--junit",
        one_xml.to_str().unwrap(),
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
    let verdicts = summary["thresholds"].as_array().unwrap();
    assert_eq!(verdicts.len(), 5);
    assert!(verdicts.iter().all(|v| v["passed"] == true), "{summary}");
    assert_eq!(verdicts[4]["endpoint"], "GET /status/500");
    assert_eq!(verdicts[4]["observed"], 100.0);
    assert!(read(&one, "summary.md").contains("## Thresholds: passed\n\n5 of 5 passed"));
    assert_eq!(junit(&one_xml), (1, 5, 0));
    // The test was stopped and forgotten.
    assert!(f.get_json("/api/master").await.unwrap()["swarm"].is_null());
    wait_for("Locust stopped", Duration::from_secs(10), || async {
        f.locust_stats().await.filter(|s| s["state"] == "stopped")
    })
    .await;

    // A run that breaks two of fleet.toml's thresholds, in text mode: exit 99, one line on
    // stderr naming them, every verdict on stdout, in the summaries and in the JUnit file.
    let toml = f.path().join("fleet.toml");
    let mut config = std::fs::read_to_string(&toml).unwrap();
    config.push_str(
        "\n[run]\nfail_on = [\"rps<100000\", \"p95>10s\", \"GET /nothing: failures>0\"]\n",
    );
    std::fs::write(&toml, config).unwrap();
    let two = results.path().join("two");
    let two_xml = results.path().join("two.xml");
    let out = f.cli(&[
        "run",
        "--users",
        "2",
        "--spawn-rate",
        "2",
        "--duration",
        "4s",
        "--out",
        two.to_str().unwrap(),
        "--junit",
        two_xml.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(99), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.trim().lines().last().unwrap();
    assert!(
        last.starts_with("fleet: 2 of 3 threshold checks failed: rps<100000 (rps ")
            && last.contains("; GET /nothing: failures>0 (no request named \"GET /nothing\" in stats.csv; fails when > 0)")
            && last.ends_with(&format!("see {}", two.join("summary.md").display())),
        "{err}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("\n  FAIL rps<100000: rps "), "{stdout}");
    assert!(stdout.contains("\n  pass p95>10s: p95 "), "{stdout}");
    let summary = json(&two, "summary.json");
    let passed: Vec<bool> = summary["thresholds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["passed"].as_bool().unwrap())
        .collect();
    assert_eq!(passed, [false, true, false]);
    assert_eq!(summary["thresholds"][0]["limit"], 100000.0);
    assert_eq!(
        summary["thresholds"][2]["observed"],
        serde_json::Value::Null
    );
    assert!(read(&two, "summary.md").contains("## Thresholds: FAILED\n\n1 of 3 passed"));
    assert_eq!(junit(&two_xml), (1, 3, 2));
    let x = read(results.path(), "two.xml");
    assert!(
        x.contains("<failure message=\"rps ") && x.contains(" rps, fails when &lt; 100000 rps\""),
        "{x}"
    );
    assert!(f.get_json("/api/master").await.unwrap()["swarm"].is_null());

    // A matrix: node counts 1 and 2, user counts 2 and 4; the command line's thresholds replace
    // fleet.toml's, and one of them breaks in every cell.
    let m = results.path().join("matrix");
    let m_xml = results.path().join("matrix.xml");
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
        "--fail-on",
        "rps>=0",
        "--fail-on",
        "p99>60s",
        "--junit",
        m_xml.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(99), "{out:?}");
    eprintln!("matrix took {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(junit(&m_xml), (4, 8, 4));
    let x = read(results.path(), "matrix.xml");
    assert!(
        x.contains("<testsuite name=\"fleet run nodes-2-users-4\" tests=\"2\" failures=\"1\""),
        "{x}"
    );
    assert!(x.contains("classname=\"fleet.run.nodes-1-users-2\""), "{x}");
    let csv = read(&m, "matrix.csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "nodes,users,workers,rps,p50_ms,p95_ms,p99_ms,failure_pct,requests,thresholds_failed"
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
        assert_eq!(cols[9], "1", "{line}");
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
