//! The files a run leaves: `summary.json` and `summary.md` per run, `matrix.csv` and
//! `matrix.md` for a matrix (docs/run.md).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::threshold::Verdict;
use super::RunPlan;
use crate::master::merge::ErrorRow;

/// What `summary.json` holds for one run. The load numbers are copied from the `Aggregated`
/// row of `stats.json`, the test's stats merged over its masters (see docs/run.md for the
/// exact keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub users: u64,
    pub spawn_rate: f64,
    pub duration_s: f64,
    /// Nodes whose agents heartbeat (`/api/nodes`, heartbeat younger than 15 s).
    pub nodes: usize,
    /// `worker_count` of `stats.json`.
    pub workers: u64,
    /// The Locust masters whose numbers were merged (`masters` of `stats.json`).
    #[serde(default = "one")]
    pub masters: usize,
    /// Aggregated `num_requests`.
    pub requests: u64,
    /// Aggregated `num_failures`.
    pub failures: u64,
    /// Aggregated `total_rps`: requests over the time since the stats reset.
    pub rps: f64,
    /// Aggregated `median_response_time`.
    pub p50_ms: f64,
    /// Aggregated `response_time_percentile_0.95`.
    pub p95_ms: f64,
    /// Aggregated `response_time_percentile_0.99`.
    pub p99_ms: f64,
    /// 100 × `num_failures` / `num_requests` of the Aggregated row (0 without requests).
    pub failure_pct: f64,
    /// Locust's `state` and `user_count` when the numbers were taken.
    pub state: String,
    pub user_count: u64,
    pub spec_sha256: Option<String>,
    pub spec_sequence: Option<u64>,
    pub master_epoch: u64,
    /// RFC 3339 UTC: the swarm was started, and stopped.
    pub started: String,
    pub ended: String,
    pub dir: PathBuf,
    /// Whether `stats_history.csv` holds Locust's history (else a one-line note).
    pub history: bool,
    /// The Aggregated request count of `stats.csv`, fetched after the stop (the workers' last
    /// reports included): at least `requests`.
    pub requests_after_stop: Option<u64>,
    pub warnings: Vec<String>,
    /// The verdict of each threshold (`--fail-on`, `[run] fail_on`), judged on `stats.csv`.
    #[serde(default)]
    pub thresholds: Vec<Verdict>,
}

fn one() -> usize {
    1
}

impl Summary {
    /// The thresholds this run broke.
    pub fn broken(&self) -> impl Iterator<Item = &Verdict> {
        self.thresholds.iter().filter(|v| !v.passed)
    }
}

/// A number as the Markdown shows it: whole numbers bare, others with two decimals.
pub(super) fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The run's size and load numbers, as `summary.md` and fleet's own `report.html` show them.
pub(super) fn load_rows(s: &Summary) -> [(&'static str, String); 10] {
    [
        ("nodes", s.nodes.to_string()),
        ("workers", s.workers.to_string()),
        ("Locust masters", s.masters.to_string()),
        ("requests", s.requests.to_string()),
        ("failures", s.failures.to_string()),
        ("RPS", format!("{:.2}", s.rps)),
        ("p50 (ms)", num(s.p50_ms)),
        ("p95 (ms)", num(s.p95_ms)),
        ("p99 (ms)", num(s.p99_ms)),
        ("failure %", format!("{:.2}", s.failure_pct)),
    ]
}

pub(super) fn summary_md(s: &Summary) -> String {
    let mut m = String::new();
    let _ = writeln!(
        m,
        "# fleet run: {} users for {}\n",
        s.users,
        humantime::format_duration(Duration::from_secs_f64(s.duration_s))
    );
    let spec = match (&s.spec_sha256, s.spec_sequence) {
        (Some(h), Some(q)) => format!("`{h}` (sequence {q})"),
        _ => "-".into(),
    };
    let mut rows: Vec<(&str, String)> = vec![
        ("users", s.users.to_string()),
        ("spawn rate (users/s)", num(s.spawn_rate)),
        ("duration (s)", num(s.duration_s)),
    ];
    rows.extend(load_rows(s));
    rows.extend([
        ("users running at the end", s.user_count.to_string()),
        (
            "requests in stats.csv (after the stop)",
            s.requests_after_stop
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        ("spec", spec),
        ("master epoch", s.master_epoch.to_string()),
        ("started", s.started.clone()),
        ("ended", s.ended.clone()),
    ]);
    m.push_str("| | |\n|---|---|\n");
    for (k, v) in rows {
        let _ = writeln!(m, "| {k} | {v} |");
    }
    m.push_str(
        "\nThe load numbers are the `Aggregated` row of the test's stats (saved as `stats.json`: \
         the controller's `/api/stats`, every Locust master's numbers merged exactly, in the \
         shape of Locust's `/stats/requests`), taken at the end of the run before the test was \
         stopped: `num_requests`, `num_failures`, `total_rps`, `median_response_time` (p50), \
         `response_time_percentile_0.95` and `response_time_percentile_0.99`. Workers is its \
         `worker_count`; nodes are the agents heartbeating in `/api/nodes`.\n\n",
    );
    m.push_str(if s.masters > 1 {
        "Files: `stats.csv` (the merged stats after the stop, in Locust's columns), \
         `failures.csv` (the merged errors), `report.html` (fleet's summary of the merged \
         test), `stats.json`, `summary.json`; Locust keeps the stats history and exceptions \
         per master, in each master's own UI.\n"
    } else {
        "Files: `stats.csv` (the merged stats after the stop, in Locust's columns), \
         `failures.csv`, `exceptions.csv` (Locust's CSVs after the stop), `stats_history.csv` \
         (Locust's full history cut to this run), `report.html` (Locust's HTML report), \
         `stats.json`, `summary.json`.\n"
    });
    if !s.thresholds.is_empty() {
        let failed = s.broken().count();
        let _ = writeln!(
            m,
            "\n## Thresholds: {}\n\n{} of {} passed, judged on `stats.csv` (the test's numbers after the stop).\n",
            if failed == 0 { "passed" } else { "FAILED" },
            s.thresholds.len() - failed,
            s.thresholds.len()
        );
        m.push_str("| threshold | checked on | observed | result |\n|---|---|---|---|\n");
        for v in &s.thresholds {
            let _ = writeln!(
                m,
                "| `{}` | {} | {} | {} |",
                v.threshold.replace('|', "\\|"),
                v.endpoint.replace('|', "\\|"),
                v.detail().replace('|', "\\|"),
                if v.passed { "pass" } else { "**FAIL**" }
            );
        }
    }
    if !s.warnings.is_empty() {
        m.push_str("\n## Warnings\n\n");
        for w in &s.warnings {
            let _ = writeln!(m, "- {w}");
        }
    }
    m
}

const MATRIX_HEADER: &str =
    "nodes,users,workers,rps,p50_ms,p95_ms,p99_ms,failure_pct,requests,thresholds_failed";

/// How many thresholds a run broke; empty when none were given.
fn failed_count(r: &Summary) -> String {
    match r.thresholds.is_empty() {
        true => String::new(),
        false => r.broken().count().to_string(),
    }
}

pub(super) fn matrix_csv(runs: &[Summary]) -> String {
    let mut s = format!("{MATRIX_HEADER}\n");
    for r in runs {
        let _ = writeln!(
            s,
            "{},{},{},{:.2},{},{},{},{:.2},{},{}",
            r.nodes,
            r.users,
            r.workers,
            r.rps,
            num(r.p50_ms),
            num(r.p95_ms),
            num(r.p99_ms),
            r.failure_pct,
            r.requests,
            failed_count(r)
        );
    }
    s
}

pub(super) fn matrix_md(plan: &RunPlan, runs: &[Summary]) -> String {
    let mut m = String::from("# fleet run: matrix\n\n");
    let _ = writeln!(
        m,
        "Spawn rate {}/s, {} per run, {} runs.\n",
        num(plan.spawn_rate),
        humantime::format_duration(plan.duration),
        runs.len()
    );
    m.push_str("| nodes | users | workers | RPS | p50 (ms) | p95 (ms) | p99 (ms) | failure % | requests | spec seq | thresholds failed | results |\n");
    m.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for r in runs {
        let _ = writeln!(
            m,
            "| {} | {} | {} | {:.2} | {} | {} | {} | {:.2} | {} | {} | {} | `{}` |",
            r.nodes,
            r.users,
            r.workers,
            r.rps,
            num(r.p50_ms),
            num(r.p95_ms),
            num(r.p99_ms),
            r.failure_pct,
            r.requests,
            r.spec_sequence
                .map(|q| q.to_string())
                .unwrap_or_else(|| "-".into()),
            match failed_count(r).as_str() {
                "" => "-".to_string(),
                n => n.to_string(),
            },
            run_dir_name(r.nodes, r.users)
        );
    }
    if let Some(best) = runs.iter().max_by(|a, b| {
        a.rps
            .partial_cmp(&b.rps)
            .unwrap_or(std::cmp::Ordering::Equal)
    }) {
        let _ = writeln!(
            m,
            "\nHighest throughput: {:.2} RPS with {} nodes and {} users (p95 {} ms, {:.2}% failures).",
            best.rps,
            best.nodes,
            best.users,
            num(best.p95_ms),
            best.failure_pct
        );
    }
    let broken: Vec<&Summary> = runs
        .iter()
        .filter(|r| r.broken().next().is_some())
        .collect();
    if !broken.is_empty() {
        m.push_str("\n## Broken thresholds\n\n");
        for r in broken {
            for v in r.broken() {
                let _ = writeln!(m, "- nodes {} users {}: {v}", r.nodes, r.users);
            }
        }
    }
    let warned: Vec<&Summary> = runs.iter().filter(|r| !r.warnings.is_empty()).collect();
    if !warned.is_empty() {
        m.push_str("\n## Warnings\n\n");
        for r in warned {
            for w in &r.warnings {
                let _ = writeln!(m, "- nodes {} users {}: {w}", r.nodes, r.users);
            }
        }
    }
    m.push_str(
        "\nEach row is the `summary.json` of its run directory: the `Aggregated` row of Locust's \
         `/stats/requests` at the end of the run (see docs/run.md).\n",
    );
    m
}

/// The header of Locust's `exceptions.csv`.
pub(super) const EXCEPTIONS_HEADER: &str = "Count,Message,Traceback,Nodes\r\n";

/// Why a test over several masters has no `stats_history.csv` and no exceptions.
pub(super) fn several_masters_note(masters: usize) -> String {
    format!(
        "the test ran on {masters} Locust masters: Locust keeps the full stats history and the exceptions per master (see each master's UI under /locust/); stats.csv, failures.csv, stats.json and report.html are the merged test"
    )
}

/// A field as Python's `csv` module writes it (minimal quoting).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Unix seconds as Locust's `failures.csv` writes them (`format_utc_timestamp`).
fn utc(t: Option<f64>) -> String {
    t.filter(|t| t.is_finite() && *t >= 0.0)
        .map(|t| {
            let at = std::time::UNIX_EPOCH + Duration::from_secs(t as u64);
            humantime::format_rfc3339_seconds(at).to_string()
        })
        .unwrap_or_default()
}

/// The merged errors as Locust's `failures.csv` (its columns; sorted by method, name and
/// error, where Locust sorts by a hash of them).
pub(super) fn failures_csv(errors: &[ErrorRow]) -> String {
    let mut rows: Vec<&ErrorRow> = errors.iter().collect();
    rows.sort_by(|a, b| (&a.method, &a.name, &a.error).cmp(&(&b.method, &b.name, &b.error)));
    let mut s = String::from("Method,Name,Error,Occurrences,First Seen,Last Seen\r\n");
    for e in rows {
        let _ = write!(
            s,
            "{},{},{},{},{},{}\r\n",
            csv_field(&e.method),
            csv_field(&e.name),
            csv_field(&e.error),
            e.occurrences,
            utc(e.first_seen),
            utc(e.last_seen)
        );
    }
    s
}

pub(super) fn run_dir_name(nodes: usize, users: u64) -> String {
    format!("nodes-{nodes}-users-{users}")
}

pub(super) fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, bytes).with_context(|| format!("cannot write {}", p.display()))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A run's summary as the tests start from.
    pub(in crate::cli::run) fn summary() -> Summary {
        Summary {
            users: 4,
            spawn_rate: 4.0,
            duration_s: 8.0,
            nodes: 2,
            workers: 2,
            masters: 1,
            requests: 88,
            failures: 43,
            rps: 20.29351370704754,
            p50_ms: 2.0,
            p95_ms: 5.0,
            p99_ms: 6.0,
            failure_pct: 48.86,
            state: "running".into(),
            user_count: 4,
            spec_sha256: Some("ab".into()),
            spec_sequence: Some(1),
            master_epoch: 1,
            started: "2026-11-25T00:42:50Z".into(),
            ended: "2026-11-25T00:42:58Z".into(),
            dir: PathBuf::from("/r"),
            history: true,
            requests_after_stop: Some(90),
            warnings: vec![],
            thresholds: vec![],
        }
    }

    #[test]
    fn numbers_and_tables() {
        assert_eq!(num(2.0), "2");
        assert_eq!(num(2.345), "2.35");
        let s = summary();
        let md = summary_md(&s);
        assert!(md.contains("| RPS | 20.29 |"), "{md}");
        assert!(md.contains("| requests | 88 |"));
        assert!(md.contains("| p95 (ms) | 5 |"));
        let csv = matrix_csv(&[s]);
        assert_eq!(
            csv.lines().nth(1),
            Some("2,4,2,20.29,2,5,6,48.86,88,"),
            "{csv}"
        );
        assert!(!md.contains("Thresholds"));
    }

    #[test]
    fn merged_errors_are_written_in_locusts_failures_csv_columns() {
        let err = |name: &str, error: &str, n, first| ErrorRow {
            method: "GET".into(),
            name: name.into(),
            error: error.into(),
            occurrences: n,
            first_seen: first,
            last_seen: first.map(|t| t + 61.0),
        };
        let csv = failures_csv(&[
            err("/b", "HTTPError('500, \"x\"')", 3, Some(1_795_567_370.7)),
            err("/a", "500", 1, None),
        ]);
        assert_eq!(
            csv,
            "Method,Name,Error,Occurrences,First Seen,Last Seen\r\n\
             GET,/a,500,1,,\r\n\
             GET,/b,\"HTTPError('500, \"\"x\"\"')\",3,2026-11-25T00:42:50Z,2026-11-25T00:43:51Z\r\n"
        );
        let mut s = summary();
        s.masters = 2;
        let md = summary_md(&s);
        assert!(md.contains("| Locust masters | 2 |"), "{md}");
        assert!(md.contains("fleet's summary of the merged test"), "{md}");
        assert!(several_masters_note(2).starts_with("the test ran on 2 Locust masters"));
    }

    #[test]
    fn thresholds_show_in_every_table() {
        use crate::cli::run::locust::{Endpoint, AGGREGATED};
        use crate::cli::run::threshold::{evaluate, Threshold};
        let mut s = summary();
        let agg = Endpoint {
            method: String::new(),
            name: AGGREGATED.into(),
            requests: 88,
            failures: 43,
            rps: 20.29,
            median: Some(2.0),
            avg: None,
            min: None,
            max: None,
            avg_size: None,
            fail_rate: 0.0,
            percentiles: vec![("95".into(), Some(5.0))],
        };
        let t = Threshold::parse_all(&["p95>500ms".into(), "rps<100".into()]).unwrap();
        s.thresholds = evaluate(&t, &[agg]);
        let md = summary_md(&s);
        assert!(
            md.contains("## Thresholds: FAILED\n\n1 of 2 passed"),
            "{md}"
        );
        assert!(
            md.contains("| `p95>500ms` | Aggregated | p95 5 ms, fails when > 500 ms | pass |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| `rps<100` | Aggregated | rps 20.29 rps, fails when < 100 rps | **FAIL** |"
            ),
            "{md}"
        );
        let csv = matrix_csv(std::slice::from_ref(&s));
        assert!(csv.lines().nth(1).unwrap().ends_with(",88,1"), "{csv}");
        let plan = RunPlan {
            matrix: true,
            users: vec![4],
            nodes: vec![2],
            spawn_rate: 4.0,
            duration: Duration::from_secs(8),
            out: PathBuf::from("/r"),
            wait: Duration::ZERO,
            thresholds: t,
            junit: None,
        };
        let plan_md = matrix_md(&plan, &[s]);
        assert!(plan_md.contains("| 1 | `nodes-2-users-4` |"), "{plan_md}");
        assert!(
            plan_md
                .contains("- nodes 2 users 4: FAIL rps<100: rps 20.29 rps, fails when < 100 rps"),
            "{plan_md}"
        );
    }
}
