//! `fleet run`: one test, or a matrix of tests, through the controller, and its reports.
//!
//! Everything goes through the controller with the operator token: `/api/swarm` and
//! `/api/stop` start and stop the test (so the controller records it, as for `fleet swarm`),
//! and Locust's own API is reached through the authenticated `/locust/*` proxy. One run:
//!
//! 1. check that no test is running (`/api/master`) and that workers are connected
//!    (`/locust/worker-count`: with none, Locust answers success and runs nothing);
//! 2. `POST /locust/stats/reset`, then `POST /api/swarm`;
//! 3. wait the duration, showing users, RPS, failures and workers every [`PROGRESS_EVERY`];
//! 4. fetch `/locust/stats/requests` once (saved as `stats.json`; the summary's numbers come
//!    from its `Aggregated` row), `/api/nodes` and `/api/spec`, then `POST /api/stop`;
//! 5. collect Locust's CSVs, its full stats history (cut to the run's time window) and its
//!    HTML report, and write `summary.json` and `summary.md`.
//!
//! A matrix repeats this for every node count (scaled with the chosen backend, as `fleet
//! scale` does) and user count, one directory per run, plus `matrix.csv` and `matrix.md`.
//! See docs/run.md.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use fleet_common::client::{Client, Response};
use fleet_common::wire::{routes, MasterView, NodeView, SpecView, SwarmRequest, WorkerState};
use hyper::Method;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::backend::any::AnyBackend;
use crate::config::Fleet;
use crate::ops::{self, Output, SILENT_AFTER_S};

/// Locust caches `/stats/requests` for 2 s (LOCUST.md). A shorter run could be summarised
/// from an answer computed before its stats reset.
pub const MIN_DURATION: Duration = Duration::from_secs(3);
/// How often the live progress reads `/locust/stats/requests` (its cache time anyway).
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How often the progress bar moves between two reads.
const TICK: Duration = Duration::from_millis(250);
/// Locust writes its history file every second but flushes it every 5 s: wait this long at
/// most for the rows of the run's last seconds to reach the disk.
const HISTORY_FLUSH_WAIT: Duration = Duration::from_secs(8);
/// After scaling, how long the workers get to join the master.
const WORKERS_WAIT: Duration = Duration::from_secs(60);
const TIMEOUT: Duration = Duration::from_secs(30);
/// The HTML report is ~1 MB and Locust renders it on demand.
const REPORT_TIMEOUT: Duration = Duration::from_secs(120);
const REPORT_LIMIT: usize = 64 << 20;
/// JSON and the per-request CSVs (at most 500 rows each in Locust).
const SMALL_LIMIT: usize = 16 << 20;
/// The history file grows for as long as the master runs (one row per entry per second).
const HISTORY_LIMIT: usize = 256 << 20;

/// The command line of `fleet run`, before validation.
#[derive(Debug, Clone)]
pub struct RunArgs {
    pub users: Option<u64>,
    /// `users=200,400,800`.
    pub matrix: Option<String>,
    pub spawn_rate: f64,
    pub duration: Duration,
    pub out: Option<PathBuf>,
    /// Node counts to scale to (one without `--matrix`); empty: leave the fleet as it is.
    pub nodes: Vec<i64>,
    /// How long `ops::scale` waits for the agents to check in.
    pub wait: Duration,
}

/// A validated `fleet run`: the runs to make and where their files go.
#[derive(Debug, Clone)]
pub struct Plan {
    pub matrix: bool,
    pub users: Vec<u64>,
    pub nodes: Vec<usize>,
    pub spawn_rate: f64,
    pub duration: Duration,
    pub out: PathBuf,
    pub wait: Duration,
}

impl Plan {
    /// Checks the command line; nothing is contacted yet.
    pub fn new(fleet: &Fleet, a: RunArgs) -> Result<Plan> {
        let (matrix, users) = match (&a.matrix, a.users) {
            (Some(m), None) => (true, parse_matrix(m)?),
            (None, Some(u)) => (false, vec![u]),
            (Some(_), Some(_)) => bail!("give either --users or --matrix users=..., not both"),
            (None, None) => bail!("give --users N (one run) or --matrix users=N,N,... (a matrix)"),
        };
        if users.contains(&0) {
            bail!("user counts must be at least 1");
        }
        if !(a.spawn_rate.is_finite() && a.spawn_rate > 0.0) {
            bail!("--spawn-rate must be a positive number of users per second");
        }
        if a.duration < MIN_DURATION {
            bail!(
                "--duration must be at least {} (Locust's stats lag up to 2 s)",
                humantime::format_duration(MIN_DURATION)
            );
        }
        if !matrix && a.nodes.len() > 1 {
            bail!("--nodes takes one count for a single run; use --matrix users=... to run several node counts");
        }
        let mut nodes = Vec::with_capacity(a.nodes.len());
        for n in &a.nodes {
            let n = ops::check_nodes(fleet, *n)?;
            if n == 0 {
                bail!("--nodes must be at least 1 for a run (there would be no workers)");
            }
            nodes.push(n);
        }
        let out = match a.out {
            Some(o) => o,
            None => default_out(&fleet.dir.join("results"), SystemTime::now()),
        };
        Ok(Plan {
            matrix,
            users,
            nodes,
            spawn_rate: a.spawn_rate,
            duration: a.duration,
            out,
            wait: a.wait,
        })
    }

    /// Whether the plan scales the fleet (and so needs a backend).
    pub fn scales(&self) -> bool {
        !self.nodes.is_empty()
    }
}

/// `users=200,400,800` -> `[200, 400, 800]`.
pub fn parse_matrix(s: &str) -> Result<Vec<u64>> {
    let bad = || anyhow!("--matrix takes users=N,N,... (for example users=200,400,800), not {s:?}");
    let list = s.trim().strip_prefix("users=").ok_or_else(bad)?;
    let users: Vec<u64> = list
        .split(',')
        .map(|v| v.trim().parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    if users.is_empty() {
        return Err(bad());
    }
    Ok(users)
}

/// `results/<UTC timestamp>`, with a suffix when two runs start within the same second.
fn default_out(results: &Path, now: SystemTime) -> PathBuf {
    let stamp = humantime::format_rfc3339_seconds(now)
        .to_string()
        .replace(['-', ':'], "");
    let mut p = results.join(&stamp);
    let mut i = 2;
    while p.exists() {
        p = results.join(format!("{stamp}-{i}"));
        i += 1;
    }
    p
}

/// What `summary.json` holds for one run. The load numbers are copied from the `Aggregated`
/// row of `stats.json` (see docs/run.md for the exact keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub users: u64,
    pub spawn_rate: f64,
    pub duration_s: f64,
    /// Nodes whose agents heartbeat (`/api/nodes`, heartbeat younger than 15 s).
    pub nodes: usize,
    /// `worker_count` of `stats.json`.
    pub workers: u64,
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
}

/// The numbers of the `Aggregated` row of `/stats/requests` (locust 2.47 key names).
#[derive(Debug, Clone, Default, Deserialize)]
struct Aggregated {
    #[serde(default)]
    num_requests: u64,
    #[serde(default)]
    num_failures: u64,
    #[serde(default)]
    total_rps: Option<f64>,
    #[serde(default)]
    median_response_time: Option<f64>,
    #[serde(default, rename = "response_time_percentile_0.95")]
    p95: Option<f64>,
    #[serde(default, rename = "response_time_percentile_0.99")]
    p99: Option<f64>,
}

/// The top level of `/stats/requests`, as much as a run needs.
#[derive(Debug, Clone, Default, Deserialize)]
struct Live {
    #[serde(default)]
    state: String,
    #[serde(default)]
    user_count: u64,
    #[serde(default)]
    worker_count: u64,
    #[serde(default)]
    current_rps: Option<f64>,
    #[serde(default)]
    total_rps: f64,
    #[serde(default)]
    fail_ratio: f64,
}

fn aggregated(stats: &serde_json::Value) -> Result<Aggregated> {
    let row = stats["stats"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["name"] == "Aggregated"))
        .ok_or_else(|| {
            anyhow!("Locust's /stats/requests has no Aggregated row; is the master a Locust 2.x?")
        })?;
    Ok(serde_json::from_value(row.clone())?)
}

/// The controller, with the operator token.
struct Api {
    client: Client,
    url: String,
}

impl Api {
    fn new(fleet: &Fleet) -> Result<Api> {
        Ok(Api {
            client: fleet.operator_client()?,
            url: fleet.config.controller.url.clone(),
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        json: Option<serde_json::Value>,
        limit: usize,
        timeout: Duration,
    ) -> Result<Response> {
        let body = json.map(|v| ("application/json", v.to_string().into_bytes()));
        self.client
            .request(method.clone(), path, body, timeout, limit)
            .await
            .map_err(|e| match e {
                fleet_common::client::ClientError::Body { .. } => {
                    anyhow!("{method} {path}: answer over {limit} bytes")
                }
                e => anyhow!(
                    "controller {} unreachable ({e}); is `fleet serve` running?",
                    self.url
                ),
            })
    }

    /// A request that must answer 200.
    async fn ok(
        &self,
        method: Method,
        path: &str,
        json: Option<serde_json::Value>,
        limit: usize,
        timeout: Duration,
    ) -> Result<Response> {
        let r = self
            .call(method.clone(), path, json, limit, timeout)
            .await?;
        if r.status != 200 {
            return Err(refused(&r, &format!("{method} {path}")));
        }
        Ok(r)
    }

    async fn get(&self, path: &str, limit: usize) -> Result<Response> {
        self.ok(Method::GET, path, None, limit, TIMEOUT).await
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let r = self.get(path, SMALL_LIMIT).await?;
        serde_json::from_slice(&r.body)
            .with_context(|| format!("GET {path}: not the JSON expected"))
    }

    async fn worker_count(&self) -> Result<u64> {
        let v: serde_json::Value = self.get_json("/locust/worker-count").await?;
        Ok(v["worker_count"].as_u64().unwrap_or(0))
    }

    async fn stop(&self) -> Result<Response> {
        self.ok(
            Method::POST,
            routes::API_STOP,
            Some(serde_json::json!({})),
            1 << 20,
            TIMEOUT,
        )
        .await
        .map_err(|e| anyhow!("cannot stop the test ({e:#}); run `fleet stop`"))
    }
}

/// One line for a refused request, saying what to do.
fn refused(r: &Response, what: &str) -> anyhow::Error {
    let text = {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        match v.get("error").and_then(|e| e.as_str()) {
            Some(e) => e.to_string(),
            None => String::from_utf8_lossy(&r.body)
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .chars()
                .take(200)
                .collect(),
        }
    };
    let locust = what.contains(" /locust");
    match r.status {
        401 => anyhow!("the controller refused the operator token ({what}: HTTP 401); check secrets/operator.token"),
        429 => anyhow!("the controller refused the operator token, and this address has failed too often ({what}: HTTP 429); check secrets/operator.token"),
        502 if locust => anyhow!("the Locust master is not reachable behind the controller ({what}: HTTP 502); check state/master.log and retry"),
        s if locust => anyhow!("Locust refused {what}: HTTP {s} {text}"),
        s => anyhow!("the controller answered HTTP {s} to {what}: {text}"),
    }
}

/// Unix seconds from an HTTP `Date` header (`Wed, 25 Nov 2026 00:42:50 GMT`).
fn http_date(s: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let p: Vec<&str> = s.split_whitespace().collect();
    if p.len() != 6 || p[5] != "GMT" {
        return None;
    }
    let month = MONTHS.iter().position(|m| *m == p[2])? + 1;
    let day: u32 = p[1].parse().ok()?;
    let year: u32 = p[3].parse().ok()?;
    let t = humantime::parse_rfc3339(&format!("{year:04}-{month:02}-{day:02}T{}Z", p[4])).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_secs())
}

/// The controller host's clock (where the managed master runs), else ours.
fn server_time(r: &Response) -> u64 {
    r.header("date").and_then(http_date).unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    })
}

/// Keeps the header and the rows of Locust's history CSV stamped within `[from, to]`.
/// Returns the text, the number of rows kept, and whether the file already holds a complete
/// row after `to` (then everything up to `to` has been flushed).
fn history_window(csv: &str, from: u64, to: u64) -> (String, usize, bool) {
    let mut out = String::new();
    let mut kept = 0;
    let mut past = false;
    let mut keep = true;
    // A last line without its newline is still being written.
    let complete = match csv.rfind('\n') {
        Some(i) => &csv[..=i],
        None => "",
    };
    for (i, line) in complete.lines().enumerate() {
        if i == 0 {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        // The timestamp is the first field; a line without one continues a quoted field.
        if let Some(ts) = line
            .split_once(',')
            .and_then(|(t, _)| t.parse::<u64>().ok())
        {
            keep = ts >= from && ts <= to;
            past |= ts > to;
            if keep {
                kept += 1;
            }
        }
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    (out, kept, past)
}

/// The `Request Count` of the Aggregated row of Locust's `/stats/requests/csv`.
fn csv_requests(csv: &str) -> Option<u64> {
    let row = csv.lines().find(|l| l.starts_with(",Aggregated,"))?;
    row.split(',').nth(2)?.parse().ok()
}

/// A number as the Markdown shows it: whole numbers bare, others with two decimals.
fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn summary_md(s: &Summary) -> String {
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
    let rows: Vec<(&str, String)> = vec![
        ("users", s.users.to_string()),
        ("spawn rate (users/s)", num(s.spawn_rate)),
        ("duration (s)", num(s.duration_s)),
        ("nodes", s.nodes.to_string()),
        ("workers", s.workers.to_string()),
        ("requests", s.requests.to_string()),
        ("failures", s.failures.to_string()),
        ("RPS", format!("{:.2}", s.rps)),
        ("p50 (ms)", num(s.p50_ms)),
        ("p95 (ms)", num(s.p95_ms)),
        ("p99 (ms)", num(s.p99_ms)),
        ("failure %", format!("{:.2}", s.failure_pct)),
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
    ];
    m.push_str("| | |\n|---|---|\n");
    for (k, v) in rows {
        let _ = writeln!(m, "| {k} | {v} |");
    }
    m.push_str(
        "\nThe load numbers are the `Aggregated` row of Locust's `/stats/requests` (saved as \
         `stats.json`), taken at the end of the run before the test was stopped: `num_requests`, \
         `num_failures`, `total_rps`, `median_response_time` (p50), \
         `response_time_percentile_0.95` and `response_time_percentile_0.99`. Workers is its \
         `worker_count`; nodes are the agents heartbeating in `/api/nodes`.\n\n\
         Files: `stats.csv`, `failures.csv`, `exceptions.csv` (Locust's CSVs after the stop), \
         `stats_history.csv` (Locust's full history cut to this run), `report.html` (Locust's \
         HTML report), `stats.json`, `summary.json`.\n",
    );
    if !s.warnings.is_empty() {
        m.push_str("\n## Warnings\n\n");
        for w in &s.warnings {
            let _ = writeln!(m, "- {w}");
        }
    }
    m
}

const MATRIX_HEADER: &str = "nodes,users,workers,rps,p50_ms,p95_ms,p99_ms,failure_pct,requests";

fn matrix_csv(runs: &[Summary]) -> String {
    let mut s = format!("{MATRIX_HEADER}\n");
    for r in runs {
        let _ = writeln!(
            s,
            "{},{},{},{:.2},{},{},{},{:.2},{}",
            r.nodes,
            r.users,
            r.workers,
            r.rps,
            num(r.p50_ms),
            num(r.p95_ms),
            num(r.p99_ms),
            r.failure_pct,
            r.requests
        );
    }
    s
}

fn matrix_md(plan: &Plan, runs: &[Summary]) -> String {
    let mut m = String::from("# fleet run: matrix\n\n");
    let _ = writeln!(
        m,
        "Spawn rate {}/s, {} per run, {} runs.\n",
        num(plan.spawn_rate),
        humantime::format_duration(plan.duration),
        runs.len()
    );
    m.push_str("| nodes | users | workers | RPS | p50 (ms) | p95 (ms) | p99 (ms) | failure % | requests | spec seq | results |\n");
    m.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for r in runs {
        let _ = writeln!(
            m,
            "| {} | {} | {} | {:.2} | {} | {} | {} | {:.2} | {} | {} | `{}` |",
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

fn run_dir_name(nodes: usize, users: u64) -> String {
    format!("nodes-{nodes}-users-{users}")
}

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, bytes).with_context(|| format!("cannot write {}", p.display()))
}

fn progress_bar(output: Output, duration: Duration, prefix: String) -> ProgressBar {
    if output == Output::Json {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(duration.as_millis() as u64);
    pb.set_style(
        ProgressStyle::with_template("{spinner} {prefix} [{bar:16}] {elapsed:>3} {wide_msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_prefix(prefix);
    pb.set_message("starting");
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// `running 6/6 users, 12.3 rps, 0.00% fail, 2 workers`. Locust's `current_rps` (its last
/// ~10 s) is 0 for the first seconds of a test; its `total_rps` is shown until then.
fn live_message(l: &Live, users: u64) -> String {
    format!(
        "{} {}/{users} users, {:.1} rps, {:.2}% fail, {} workers",
        l.state,
        l.user_count,
        l.current_rps.filter(|r| *r > 0.0).unwrap_or(l.total_rps),
        l.fail_ratio * 100.0,
        l.worker_count
    )
}

/// Nodes whose agents heartbeat (not silent).
fn fresh(views: &[NodeView]) -> impl Iterator<Item = &NodeView> {
    views.iter().filter(|v| v.heartbeat_age_s < SILENT_AFTER_S)
}

struct Ctx<'a> {
    fleet: &'a Fleet,
    api: Api,
    plan: &'a Plan,
    output: Output,
}

impl Ctx<'_> {
    fn say(&self, line: impl std::fmt::Display) {
        if self.output == Output::Text {
            eprintln!("{line}");
        }
    }

    /// Waits until the master counts as many workers as the agents report running.
    async fn wait_workers(&self) -> Result<Option<String>> {
        let t = Instant::now();
        let mut stable = 0;
        let last = loop {
            let views = ops::controller_nodes(self.fleet).await?;
            let expected: u64 = fresh(&views)
                .filter(|v| v.heartbeat.running.is_some())
                .map(|v| {
                    v.heartbeat
                        .workers
                        .iter()
                        .filter(|w| w.state == WorkerState::Running)
                        .count() as u64
                })
                .sum();
            let got = self.api.worker_count().await?;
            if expected > 0 && got == expected {
                stable += 1;
                if stable >= 2 {
                    return Ok(None);
                }
            } else {
                stable = 0;
            }
            if t.elapsed() >= WORKERS_WAIT {
                break (got, expected);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        if last.0 == 0 {
            bail!(
                "no Locust worker joined the master within {}s of scaling; see the agents' logs (local nodes: {}/<node>/agent.log)",
                WORKERS_WAIT.as_secs(),
                self.fleet.local_dir().display()
            );
        }
        Ok(Some(format!(
            "{} workers at the master, {} reported by the agents, after waiting {}s",
            last.0,
            last.1,
            WORKERS_WAIT.as_secs()
        )))
    }

    /// One run into `dir`.
    async fn run_one(&self, users: u64, label: &str, dir: &Path) -> Result<Summary> {
        let plan = self.plan;
        let mut warnings = vec![];

        // Preflight: the controller answers, no test runs, workers are connected.
        let master: MasterView = self.api.get_json(routes::API_MASTER).await?;
        if let Some(sw) = master.swarm {
            bail!(
                "a test is already running ({} users); stop it with `fleet stop` first",
                sw.users
            );
        }
        if self.api.worker_count().await? == 0 {
            bail!("no Locust worker is connected to the master, so Locust would run nothing; start agents with `fleet scale --nodes N` (or `fleet run --nodes N`)");
        }

        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let reset = self
            .api
            .ok(Method::POST, "/locust/stats/reset", None, 1 << 20, TIMEOUT)
            .await?;
        let from = server_time(&reset);
        let swarm = SwarmRequest {
            users,
            spawn_rate: plan.spawn_rate,
        };
        let r = self
            .api
            .call(
                Method::POST,
                routes::API_SWARM,
                Some(serde_json::to_value(swarm)?),
                1 << 20,
                TIMEOUT,
            )
            .await?;
        match r.status {
            200 => {}
            409 => bail!("no Locust worker is connected to the master, so Locust would run nothing; start agents with `fleet scale --nodes N` (or `fleet run --nodes N`)"),
            502 => {
                let e = refused(&r, "POST /api/swarm");
                bail!("Locust refused the test ({e:#}); check state/master.log")
            }
            _ => return Err(refused(&r, "POST /api/swarm")),
        }
        let started = SystemTime::now();
        let t0 = Instant::now();

        // The run: a bar over the duration, with Locust's numbers every PROGRESS_EVERY.
        let pb = progress_bar(
            self.output,
            plan.duration,
            format!("{label}{}", humantime::format_duration(plan.duration)),
        );
        // Locust's answer is cached ~2 s: the first read after that shows the new test.
        let mut next_read = Instant::now() + PROGRESS_EVERY;
        while t0.elapsed() < plan.duration {
            if Instant::now() >= next_read {
                next_read = Instant::now() + PROGRESS_EVERY;
                match self.api.get("/locust/stats/requests", SMALL_LIMIT).await {
                    Ok(r) => match serde_json::from_slice::<Live>(&r.body) {
                        Ok(l) => pb.set_message(live_message(&l, users)),
                        Err(_) => pb.set_message("stats unreadable"),
                    },
                    Err(_) => pb.set_message("stats unavailable (retrying)"),
                }
            }
            pb.set_position(t0.elapsed().as_millis().min(plan.duration.as_millis()) as u64);
            let left = plan.duration.saturating_sub(t0.elapsed());
            tokio::time::sleep(left.min(TICK)).await;
        }
        pb.finish_and_clear();

        // The numbers, once, before the stop (the same bytes are saved as stats.json).
        let fetched = self.api.get("/locust/stats/requests", SMALL_LIMIT).await;
        let stats_body = match fetched {
            Ok(r) => r.body,
            Err(e) => {
                let _ = self.api.stop().await;
                return Err(e.context("the test was stopped"));
            }
        };
        write(dir, "stats.json", &stats_body)?;
        let stats: serde_json::Value =
            serde_json::from_slice(&stats_body).context("Locust's /stats/requests is not JSON")?;
        let live: Live = serde_json::from_value(stats.clone()).unwrap_or_default();
        let agg = aggregated(&stats);
        let views = ops::controller_nodes(self.fleet).await;
        let spec: Result<SpecView> = self.api.get_json(routes::API_SPEC).await;
        let master_end: Result<MasterView> = self.api.get_json(routes::API_MASTER).await;

        let stop = self.api.stop().await;
        let ended = SystemTime::now();
        let to = match &stop {
            Ok(r) => server_time(r),
            Err(_) => server_time(&reset) + plan.duration.as_secs() + 1,
        };
        let agg = agg?;
        let views = views?;
        let spec = spec?;
        let master_end = master_end?;

        // Locust's files, after the stop so they hold the whole run. (The controller holds
        // the stop itself: it does not take Locust's cached "running" for a test to restore.)
        let history = self.collect(dir, from, to).await?;
        if let Some(note) = &history {
            warnings.push(format!("no stats history: {note}"));
        }

        if master_end.epoch != master.epoch {
            warnings.push(format!(
                "the Locust master restarted during the run (epoch {} -> {}): the numbers cover only the time since",
                master.epoch, master_end.epoch
            ));
        }
        if live.user_count < users {
            warnings.push(format!(
                "only {} of {users} users were running at the end; raise --spawn-rate or --duration",
                live.user_count
            ));
        }
        let after_stop = std::fs::read_to_string(dir.join("stats.csv"))
            .ok()
            .and_then(|c| csv_requests(&c));
        match (agg.num_requests, after_stop) {
            (0, Some(n)) if n > 0 => warnings.push(format!(
                "Locust's end-of-run numbers had no requests yet (workers report every 3 s and the answer is cached 2 s), though stats.csv counts {n} after the stop; use a longer --duration"
            )),
            (0, _) => warnings
                .push("no requests were made; check the locustfile's host and the target".into()),
            _ => {}
        }
        let failure_pct = if agg.num_requests > 0 {
            agg.num_failures as f64 * 100.0 / agg.num_requests as f64
        } else {
            0.0
        };
        let current = spec.current;
        let summary = Summary {
            users,
            spawn_rate: plan.spawn_rate,
            duration_s: plan.duration.as_secs_f64(),
            nodes: fresh(&views).count(),
            workers: live.worker_count,
            requests: agg.num_requests,
            failures: agg.num_failures,
            rps: agg.total_rps.unwrap_or(0.0),
            p50_ms: agg.median_response_time.unwrap_or(0.0),
            p95_ms: agg.p95.unwrap_or(0.0),
            p99_ms: agg.p99.unwrap_or(0.0),
            failure_pct,
            state: live.state,
            user_count: live.user_count,
            spec_sha256: current.as_ref().map(|c| c.sha256.clone()),
            spec_sequence: current.as_ref().map(|c| c.sequence),
            master_epoch: master_end.epoch,
            started: humantime::format_rfc3339_seconds(started).to_string(),
            ended: humantime::format_rfc3339_seconds(ended).to_string(),
            dir: dir.to_path_buf(),
            history: history.is_none(),
            requests_after_stop: after_stop,
            warnings,
        };
        write(
            dir,
            "summary.json",
            serde_json::to_vec_pretty(&summary).expect("serialises"),
        )?;
        write(dir, "summary.md", summary_md(&summary))?;
        stop?;
        for w in &summary.warnings {
            self.say(format_args!("warning: {w}"));
        }
        Ok(summary)
    }

    /// Writes Locust's CSVs, its HTML report and the history; returns the history's note.
    async fn collect(&self, dir: &Path, from: u64, to: u64) -> Result<Option<String>> {
        for (path, name) in [
            ("/locust/stats/requests/csv", "stats.csv"),
            ("/locust/stats/failures/csv", "failures.csv"),
            ("/locust/exceptions/csv", "exceptions.csv"),
        ] {
            let r = self.api.get(path, SMALL_LIMIT).await?;
            write(dir, name, &r.body)?;
        }
        let report = self
            .api
            .ok(
                Method::GET,
                "/locust/stats/report",
                None,
                REPORT_LIMIT,
                REPORT_TIMEOUT,
            )
            .await?;
        write(dir, "report.html", &report.body)?;
        self.history(dir, from, to).await
    }

    /// Writes `stats_history.csv`: Locust's full history cut to `[from, to]` (server clock),
    /// or a one-line note saying why there is none. Returns the note.
    async fn history(&self, dir: &Path, from: u64, to: u64) -> Result<Option<String>> {
        let t = Instant::now();
        let note = loop {
            let r = match self
                .api
                .call(
                    Method::GET,
                    "/locust/stats/requests_full_history/csv",
                    None,
                    HISTORY_LIMIT,
                    REPORT_TIMEOUT,
                )
                .await
            {
                Ok(r) => r,
                Err(e) => break format!("{e:#}"),
            };
            if r.status == 404 {
                break "the Locust master runs without --csv and --csv-full-history (Locust answered 404); a master started by this version of `fleet serve` has them".to_string();
            }
            if r.status != 200 {
                break format!(
                    "{:#}",
                    refused(&r, "GET /locust/stats/requests_full_history/csv")
                );
            }
            let text = String::from_utf8_lossy(&r.body);
            let (cut, _rows, past) = history_window(&text, from, to);
            if past || t.elapsed() >= HISTORY_FLUSH_WAIT {
                write(dir, "stats_history.csv", cut)?;
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        write(dir, "stats_history.csv", format!("# {note}\n"))?;
        Ok(Some(note))
    }
}

/// What one command prints with `--output json`.
#[derive(Debug, Serialize)]
struct MatrixReport<'a> {
    dir: &'a Path,
    runs: &'a [Summary],
}

/// Runs the plan. `backend` is needed when the plan scales. Ctrl-C stops the test.
pub async fn run(
    fleet: &Fleet,
    plan: &Plan,
    backend: Option<&AnyBackend>,
    output: Output,
) -> Result<()> {
    let ctx = Ctx {
        fleet,
        api: Api::new(fleet)?,
        plan,
        output,
    };
    tokio::select! {
        r = run_plan(&ctx, backend) => r,
        _ = tokio::signal::ctrl_c() => {
            let stopped = ctx.api.stop().await.is_ok();
            if stopped {
                bail!("interrupted; the test was stopped (files of finished runs are in {})", plan.out.display())
            }
            bail!("interrupted, and the test could not be stopped; run `fleet stop`")
        }
    }
}

async fn run_plan(ctx: &Ctx<'_>, backend: Option<&AnyBackend>) -> Result<()> {
    let plan = ctx.plan;
    // Fail early, before scaling anything, when the controller is not there.
    let _: MasterView = ctx.api.get_json(routes::API_MASTER).await?;

    // `None`: leave the fleet as it is.
    let steps: Vec<Option<usize>> = if plan.nodes.is_empty() {
        vec![None]
    } else {
        plan.nodes.iter().copied().map(Some).collect()
    };
    let total = steps.len() * plan.users.len();
    let mut runs: Vec<Summary> = vec![];
    for step in steps {
        let mut scale_note = None;
        if let Some(n) = step {
            let be = backend.context("scaling needs a backend")?;
            ctx.say(format_args!(
                "scaling to {n} nodes ({})",
                crate::backend::Backend::name(be)
            ));
            ops::scale(ctx.fleet, be, n, false, plan.wait, ctx.output).await?;
            scale_note = ctx.wait_workers().await?;
        }
        for &users in &plan.users {
            let dir = if plan.matrix {
                let nodes = match step {
                    Some(n) => n,
                    None => fresh(&ops::controller_nodes(ctx.fleet).await?).count(),
                };
                plan.out.join(run_dir_name(nodes, users))
            } else {
                plan.out.clone()
            };
            let label = if total > 1 {
                format!("run {}/{total} ({} users): ", runs.len() + 1, users)
            } else {
                String::new()
            };
            let mut s = ctx.run_one(users, &label, &dir).await?;
            if let Some(n) = &scale_note {
                s.warnings.push(n.clone());
                write(&dir, "summary.json", serde_json::to_vec_pretty(&s)?)?;
                write(&dir, "summary.md", summary_md(&s))?;
            }
            if ctx.output == Output::Text {
                println!(
                    "{} users on {} nodes ({} workers): {} requests, {:.2} rps, p50 {} ms, p95 {} ms, p99 {} ms, {:.2}% failures -> {}",
                    s.users,
                    s.nodes,
                    s.workers,
                    s.requests,
                    s.rps,
                    num(s.p50_ms),
                    num(s.p95_ms),
                    num(s.p99_ms),
                    s.failure_pct,
                    dir.display()
                );
            }
            runs.push(s);
            if plan.matrix {
                // Written after every run, so an interrupted matrix keeps what it measured.
                write(&plan.out, "matrix.csv", matrix_csv(&runs))?;
                write(&plan.out, "matrix.md", matrix_md(plan, &runs))?;
            }
        }
    }
    if ctx.output == Output::Json {
        let v = if plan.matrix {
            serde_json::to_string_pretty(&MatrixReport {
                dir: &plan.out,
                runs: &runs,
            })?
        } else {
            serde_json::to_string_pretty(&runs[0])?
        };
        println!("{v}");
    } else if plan.matrix {
        println!(
            "matrix of {} runs: {} and {}",
            runs.len(),
            plan.out.join("matrix.md").display(),
            plan.out.join("matrix.csv").display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATS: &str = r#"{"current_rps": 14.6, "fail_ratio": 0.4886, "state": "running",
      "stats": [
        {"name": "/a", "num_requests": 45, "num_failures": 0, "total_rps": 10.3,
         "median_response_time": 2, "response_time_percentile_0.95": 4,
         "response_time_percentile_0.99": 6},
        {"method": "", "name": "Aggregated", "num_requests": 88, "num_failures": 43,
         "total_rps": 20.29351370704754, "median_response_time": 2,
         "response_time_percentile_0.95": 5, "response_time_percentile_0.99": 6.0}
      ],
      "total_rps": 20.29351370704754, "user_count": 4, "worker_count": 1}"#;

    #[test]
    fn the_aggregated_row_gives_the_numbers() {
        let v: serde_json::Value = serde_json::from_str(STATS).unwrap();
        let a = aggregated(&v).unwrap();
        assert_eq!((a.num_requests, a.num_failures), (88, 43));
        assert_eq!(a.total_rps, Some(20.29351370704754));
        assert_eq!(
            (a.median_response_time, a.p95, a.p99),
            (Some(2.0), Some(5.0), Some(6.0))
        );
        let l: Live = serde_json::from_value(v).unwrap();
        assert_eq!((l.user_count, l.worker_count), (4, 1));
        let none = serde_json::json!({"stats": [{"name": "/a"}]});
        assert!(aggregated(&none).is_err());
    }

    #[test]
    fn matrix_specs() {
        assert_eq!(parse_matrix("users=200,400,800").unwrap(), [200, 400, 800]);
        assert_eq!(parse_matrix(" users=5 ").unwrap(), [5]);
        assert!(parse_matrix("nodes=1,2").is_err());
        assert!(parse_matrix("users=").is_err());
        assert!(parse_matrix("users=1,x").is_err());
    }

    #[test]
    fn http_dates() {
        assert_eq!(http_date("Thu, 01 Jan 1970 00:00:10 GMT"), Some(10));
        assert_eq!(
            http_date("Wed, 25 Nov 2026 00:42:50 GMT"),
            Some(1_795_567_370)
        );
        assert_eq!(http_date("yesterday"), None);
    }

    #[test]
    fn history_is_cut_to_the_run() {
        let csv = "Timestamp,User Count,Type,Name\n\
                   100,0,,Aggregated\n\
                   105,4,GET,/a\n\
                   105,4,,Aggregated\n\
                   106,4,GET,\"a\nb\"\n\
                   110,0,,Aggregated\n\
                   111,0,,Aggre";
        let (out, kept, past) = history_window(csv, 105, 106);
        assert_eq!(
            out,
            "Timestamp,User Count,Type,Name\n105,4,GET,/a\n105,4,,Aggregated\n106,4,GET,\"a\nb\"\n"
        );
        assert_eq!(kept, 3);
        assert!(past);
        assert_eq!(
            csv_requests("Type,Name,Request Count\nGET,/a,3,0\n,Aggregated,37,0,1.07\n"),
            Some(37)
        );
        // Nothing flushed past the end yet; the partial last line is not counted.
        let (_, _, past) = history_window("T\n105,x\n107,partial", 105, 106);
        assert!(!past);
    }

    #[test]
    fn numbers_and_tables() {
        assert_eq!(num(2.0), "2");
        assert_eq!(num(2.345), "2.35");
        let s = Summary {
            users: 4,
            spawn_rate: 4.0,
            duration_s: 8.0,
            nodes: 2,
            workers: 2,
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
            started: "s".into(),
            ended: "e".into(),
            dir: PathBuf::from("/r"),
            history: true,
            requests_after_stop: Some(90),
            warnings: vec![],
        };
        let md = summary_md(&s);
        assert!(md.contains("| RPS | 20.29 |"), "{md}");
        assert!(md.contains("| requests | 88 |"));
        assert!(md.contains("| p95 (ms) | 5 |"));
        let csv = matrix_csv(&[s]);
        assert_eq!(
            csv.lines().nth(1),
            Some("2,4,2,20.29,2,5,6,48.86,88"),
            "{csv}"
        );
    }

    #[test]
    fn default_dirs_do_not_collide() {
        let d = tempfile::tempdir().unwrap();
        let t = UNIX_EPOCH + Duration::from_secs(1_795_567_370);
        let a = default_out(d.path(), t);
        assert_eq!(a.file_name().unwrap(), "20261125T004250Z");
        std::fs::create_dir_all(&a).unwrap();
        assert_eq!(
            default_out(d.path(), t).file_name().unwrap(),
            "20261125T004250Z-2"
        );
    }
}
