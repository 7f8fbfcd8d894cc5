//! The test's merged view with real Locust: `GET /api/stats` and `/api/stats/csv` (what the
//! dashboard's `locust` event and `fleet run` read) against the managed master's own numbers.
//!
//! One master today, so the merged view must be that master's own view, exactly: `/api/stats`
//! is the merge of its plugin snapshot (`/locust/fleet/stats`) and has the rows of Locust's
//! `/stats/requests`; `/api/stats/csv` has the numbers of Locust's `/stats/requests/csv`,
//! percentiles included; and `fleet run` writes `stats.json` and a `stats.csv` in Locust's
//! columns from it. Several masters (shards) are tested where they are made.

use std::time::Duration;

use fleet::master::merge::{self, Report, Snapshot};
use fleet_tests::{locustfile, start_target, wait_for, Fleet, Options};

const T: Duration = Duration::from_secs(10);

async fn text(f: &Fleet, path: &str) -> Option<(String, Option<String>)> {
    let r = f.operator().get(path, T, 16 << 20).await.ok()?;
    if r.status != 200 {
        return None;
    }
    let source = r.header("x-fleet-stats").map(str::to_string);
    Some((String::from_utf8(r.body.to_vec()).ok()?, source))
}

/// A CSV's records, fields split on commas (no name here holds one).
fn records(csv: &str) -> Vec<Vec<String>> {
    csv.lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

/// Whether two CSVs hold the same records: fields equal as numbers where both are numbers
/// (Python writes `2.0` where fleet may write `2`), else as text.
fn same_numbers(a: &str, b: &str) -> Result<(), String> {
    let (ra, rb) = (records(a), records(b));
    if ra.len() != rb.len() {
        return Err(format!("{} records against {}", ra.len(), rb.len()));
    }
    for (x, y) in ra.iter().zip(&rb) {
        if x.len() != y.len() {
            return Err(format!("{x:?} against {y:?}"));
        }
        for (u, v) in x.iter().zip(y) {
            let same = match (u.parse::<f64>(), v.parse::<f64>()) {
                (Ok(p), Ok(q)) => p == q,
                _ => u == v,
            };
            if !same {
                return Err(format!("{u:?} against {v:?} in {x:?} / {y:?}"));
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_merged_view_of_one_master_is_its_own_and_fleet_run_writes_it() {
    let (target, mut target_proc) = start_target();
    let mut f = Fleet::new(Options::default());
    f.write_spec(&locustfile(
        &target,
        "Web",
        &[("a", "/a"), ("b", "/b"), ("bad", "/status/500")],
    ));
    f.start_serve();
    let sha = wait_for("first publication", Duration::from_secs(20), || async {
        f.current_sha().await
    })
    .await;
    // Before any test: the view answers, from the plugin, with no request.
    let (idle, source) = wait_for("/api/stats", Duration::from_secs(60), || async {
        text(&f, "/api/stats").await
    })
    .await;
    assert_eq!(source.as_deref(), Some("merged"));
    let idle: Report = serde_json::from_str(&idle).unwrap();
    assert_eq!((idle.masters, idle.stats.len()), (1, 1), "{idle:?}");

    let out = f.cli(&["scale", "--nodes", "2"]);
    assert!(out.status.success(), "{out:?}");
    f.wait_all_running(2, &sha, Duration::from_secs(30)).await;
    // The master's start republishes the spec with its epoch, and the agents then swap their
    // workers: wait until both run the current publication and the master counts them. Locust
    // caches its `/stats/requests` ~2 s; reading it on every poll keeps that answer stale when
    // the workers come, and the test starts at once: the controller must count workers fresh
    // (from the plugin), as the merged view does, or it refuses the test as having none.
    wait_for(
        "2 workers of the current publication in the merged view",
        Duration::from_secs(30),
        || async {
            let _ = f.locust_stats().await;
            let current = f.spec().await?.current?;
            let nodes = f.nodes().await;
            let on_it = nodes.len() == 2
                && nodes.iter().all(|n| {
                    n.heartbeat.running.as_ref().is_some_and(|r| {
                        (r.sequence, r.master_epoch) == (current.sequence, current.master_epoch)
                    })
                });
            let stats = f.get_json("/api/stats").await?;
            (on_it && stats["worker_count"] == 2).then_some(())
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = f.cli(&[
        "--output",
        "json",
        "run",
        "--users",
        "4",
        "--spawn-rate",
        "4",
        "--duration",
        "6s",
        "--out",
        dir.path().to_str().unwrap(),
        "--fail-on",
        "GET /a: p99>60s",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    // The run's numbers are the merged view's, taken before the stop.
    let stats: Report =
        serde_json::from_slice(&std::fs::read(dir.path().join("stats.json")).unwrap()).unwrap();
    let agg = stats.stats.last().unwrap();
    assert_eq!(agg.name, "Aggregated");
    assert!(agg.num_requests > 0, "{stats:?}");
    assert_eq!(summary["requests"], agg.num_requests);
    assert_eq!(summary["failures"], agg.num_failures);
    assert_eq!(summary["p95_ms"].as_f64().unwrap(), agg.p95 as f64);
    assert_eq!(summary["p99_ms"].as_f64().unwrap(), agg.p99 as f64);
    assert_eq!(
        summary["p50_ms"].as_f64().unwrap(),
        agg.median_response_time
    );
    assert_eq!(summary["rps"].as_f64().unwrap(), agg.total_rps);
    assert_eq!((summary["masters"].as_u64(), stats.masters), (Some(1), 1));
    assert_eq!(summary["workers"], 2);
    assert_eq!(summary["thresholds"][0]["passed"], true, "{summary}");
    // One master: Locust's own HTML report and history, as before.
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    assert!(html.contains("<html"));
    assert_eq!(summary["history"], true);

    // After the stop the numbers settle (the workers' last reports come in); then the merged
    // CSV is Locust's own, numbers and percentiles exactly.
    let locust_csv = wait_for(
        "/api/stats/csv to equal Locust's /stats/requests/csv",
        Duration::from_secs(30),
        || async {
            let (locust, _) = text(&f, "/locust/stats/requests/csv").await?;
            let (mine, _) = text(&f, "/api/stats/csv").await?;
            same_numbers(&mine, &locust).ok()?;
            Some(locust)
        },
    )
    .await;
    let header = locust_csv.lines().next().unwrap();
    let (mine, _) = text(&f, "/api/stats/csv").await.unwrap();
    assert_eq!(mine.lines().next().unwrap(), header, "Locust's columns");
    assert!(mine.contains("\r\nGET,/status/500,"), "{mine}");
    // The run's own stats.csv: the same columns and endpoints, counted after the stop.
    let run_csv = std::fs::read_to_string(dir.path().join("stats.csv")).unwrap();
    assert_eq!(run_csv.lines().next().unwrap(), header);
    let names = |csv: &str| -> Vec<String> {
        records(csv)
            .iter()
            .skip(1)
            .map(|r| format!("{} {}", r[0], r[1]))
            .collect()
    };
    assert_eq!(names(&run_csv), names(&locust_csv));
    let count = |csv: &str| -> u64 { records(csv).last().unwrap()[2].parse().unwrap() };
    assert!(count(&run_csv) >= agg.num_requests && count(&run_csv) <= count(&locust_csv));

    // /api/stats is the merge of the plugin's snapshot, and Locust's own rows (its answer is
    // cached ~2 s: wait for one computed after the numbers settled).
    let settled: Report = wait_for(
        "/api/stats to equal the merge of /locust/fleet/stats",
        Duration::from_secs(10),
        || async {
            let snap = f.get_json("/locust/fleet/stats").await?;
            let snap = Snapshot::from_json(snap.to_string().as_bytes()).ok()?;
            let api: Report = serde_json::from_value(f.get_json("/api/stats").await?).ok()?;
            (api == merge::merge(&[snap]).report()).then_some(api)
        },
    )
    .await;
    assert!(settled.errors.iter().any(|e| e.name == "/status/500"));
    wait_for(
        "Locust's /stats/requests rows to equal /api/stats's",
        Duration::from_secs(15),
        || async {
            let locust = f.locust_stats().await?;
            let rows: Vec<merge::Row> = serde_json::from_value(locust["stats"].clone()).ok()?;
            let api: Report = serde_json::from_value(f.get_json("/api/stats").await?).ok()?;
            (rows == api.stats && locust["worker_count"] == api.worker_count).then_some(())
        },
    )
    .await;

    let _ = target_proc.kill();
    let _ = target_proc.wait();
}
