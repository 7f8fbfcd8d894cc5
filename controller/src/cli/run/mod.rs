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
//!    HTML report, judge the thresholds on `stats.csv`, and write `summary.json` and
//!    `summary.md`.
//!
//! A matrix repeats this for every node count (scaled with the chosen backend, as `fleet
//! scale` does) and user count, one directory per run, plus `matrix.csv` and `matrix.md`.
//! With `--junit FILE` the thresholds' verdicts are also written as JUnit XML after every run;
//! a broken threshold makes the command fail with [`THRESHOLDS_FAILED`]. See docs/run.md.

mod html;
mod junit;
mod locust;
mod report;
mod runner;
mod threshold;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use fleet_common::wire::{routes, MasterView};
use serde::Serialize;

pub use self::report::Summary;
use self::report::{matrix_csv, matrix_md, num, run_dir_name, summary_md, write};
use self::runner::{fresh, Runner};
use self::threshold::Threshold;
use super::api::Api;
use super::backends::BackendArg;
use super::remote::Operator;
use super::render::Output;
use super::scale::{check_nodes, scale};
use crate::backend::any::AnyBackend;
use crate::config::Fleet;

/// Locust caches `/stats/requests` for 2 s (docs/locust.md). A shorter run could be
/// summarised from an answer computed before its stats reset.
pub const MIN_DURATION: Duration = Duration::from_secs(3);

/// The exit code of a run that broke a threshold (k6 uses the same), so CI can tell a failed
/// gate from a run that could not be made (1).
pub const THRESHOLDS_FAILED: i32 = 99;

/// Run a test (or a matrix of tests) and write its reports: Locust's CSVs and HTML, summary.md/json.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Users for one run.
    #[arg(long, required_unless_present = "matrix", conflicts_with = "matrix")]
    users: Option<u64>,
    /// A matrix over user counts, e.g. `users=200,400,800` (one run per node count and user count).
    #[arg(long)]
    matrix: Option<String>,
    #[arg(long, default_value_t = 10.0)]
    spawn_rate: f64,
    /// How long each run lasts: `30s`, `5m`.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Duration,
    /// The results directory (default: results/<UTC timestamp>/ in the fleet directory, or in
    /// the current directory when the controller is remote).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Scale to this many nodes first (with --matrix: a list, e.g. 2,4).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    nodes: Vec<i64>,
    /// Default: `scale.backend` in fleet.toml, else local.
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Seconds to wait for the agents to check in after scaling.
    #[arg(long, default_value_t = 120)]
    wait: u64,
    /// Fail the run (exit 99) when this holds at the end, e.g. 'p95>500ms', 'failure_rate>1%',
    /// 'rps<100', 'GET /login: p99>1s'. Repeatable; replaces `[run] fail_on` of fleet.toml.
    #[arg(long = "fail-on", value_name = "THRESHOLD")]
    fail_on: Vec<String>,
    /// Write the thresholds' verdicts as JUnit XML to this file (one test case per threshold
    /// and run).
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
}

impl RunArgs {
    /// Checks the command line, makes the backend when the runs scale, and runs them (printing
    /// a line per run as it ends). Ctrl-C stops the test.
    pub async fn run(self, op: &Operator, output: Output) -> Result<RunReport> {
        // Scaling needs the fleet directory (and its backend); a run alone needs the controller.
        let fleet = match self.nodes.is_empty() {
            true => op.fleet(),
            false => Some(op.need_fleet("--nodes")?),
        };
        let plan = RunPlan::new(fleet, &self)?;
        let backend = match (plan.scales(), fleet) {
            (true, Some(fleet)) => Some(BackendArg::pick(self.backend, fleet).build(fleet).await?),
            _ => None,
        };
        run(fleet, op.api()?, &plan, backend.as_ref(), output).await
    }
}

/// A validated `fleet run`: the runs to make and where their files go.
#[derive(Debug, Clone)]
pub struct RunPlan {
    pub matrix: bool,
    pub users: Vec<u64>,
    /// Node counts to scale to (one without `--matrix`); empty: leave the fleet as it is.
    pub nodes: Vec<usize>,
    pub spawn_rate: f64,
    pub duration: Duration,
    pub out: PathBuf,
    /// How long scaling waits for the agents to check in.
    pub wait: Duration,
    /// Judged after every run; any broken one fails the command.
    pub thresholds: Vec<Threshold>,
    pub junit: Option<PathBuf>,
}

impl RunPlan {
    /// Checks the command line; nothing is contacted yet. `fleet` is needed for `--nodes`.
    pub fn new(fleet: Option<&Fleet>, a: &RunArgs) -> Result<RunPlan> {
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
            let n = check_nodes(fleet.context("--nodes needs the fleet directory")?, *n)?;
            if n == 0 {
                bail!("--nodes must be at least 1 for a run (there would be no workers)");
            }
            nodes.push(n);
        }
        let thresholds = match a.fail_on.is_empty() {
            false => Threshold::parse_all(&a.fail_on).map_err(|e| anyhow!("--fail-on {e}"))?,
            // A remote run has no fleet.toml: its thresholds come from the command line only.
            true => match fleet {
                Some(f) => Threshold::parse_all(&f.config.run.fail_on)
                    .map_err(|e| anyhow!("fleet.toml: [run] fail_on {e}"))?,
                None => Vec::new(),
            },
        };
        if a.junit.is_some() && thresholds.is_empty() {
            bail!("--junit writes one test case per threshold: give at least one with --fail-on (or [run] fail_on in fleet.toml)");
        }
        let out = match &a.out {
            Some(o) => o.clone(),
            None => {
                let base = fleet.map(|f| f.dir.as_path()).unwrap_or(Path::new(""));
                default_out(&base.join("results"), SystemTime::now())
            }
        };
        Ok(RunPlan {
            matrix,
            users,
            nodes,
            spawn_rate: a.spawn_rate,
            duration: a.duration,
            out,
            wait: Duration::from_secs(a.wait),
            thresholds,
            junit: a.junit.clone(),
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

/// What `fleet run` prints at the end: with `--output json` the summary of the one run, or
/// the matrix's directory and runs; as text (each run has printed its line already) the
/// matrix's files.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum RunReport {
    One(Box<Summary>),
    Matrix { dir: PathBuf, runs: Vec<Summary> },
}

impl RunReport {
    fn runs(&self) -> &[Summary] {
        match self {
            RunReport::One(s) => std::slice::from_ref(s.as_ref()),
            RunReport::Matrix { runs, .. } => runs,
        }
    }

    /// `Err(ThresholdsFailed)` when a run broke a threshold.
    pub fn gate(&self) -> Result<()> {
        let broken: Vec<String> = self
            .runs()
            .iter()
            .flat_map(|r| {
                let cell = match self {
                    RunReport::Matrix { .. } => format!("{}: ", run_dir_name(r.nodes, r.users)),
                    RunReport::One(_) => String::new(),
                };
                r.broken()
                    .map(move |v| format!("{cell}{} ({})", v.threshold, v.detail()))
            })
            .collect();
        if broken.is_empty() {
            return Ok(());
        }
        let total: usize = self.runs().iter().map(|r| r.thresholds.len()).sum();
        let report = match self {
            RunReport::One(s) => s.dir.join("summary.md"),
            RunReport::Matrix { dir, .. } => dir.join("matrix.md"),
        };
        Err(ThresholdsFailed {
            line: format!(
                "{} of {total} threshold checks failed: {}; see {}",
                broken.len(),
                broken.join("; "),
                report.display()
            ),
        }
        .into())
    }
}

/// A run that was made but broke a threshold: the command exits [`THRESHOLDS_FAILED`].
#[derive(Debug)]
pub struct ThresholdsFailed {
    line: String,
}

impl fmt::Display for ThresholdsFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.line)
    }
}

impl std::error::Error for ThresholdsFailed {}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunReport::One(_) => Ok(()),
            RunReport::Matrix { dir, runs } => write!(
                f,
                "matrix of {} runs: {} and {}",
                runs.len(),
                dir.join("matrix.md").display(),
                dir.join("matrix.csv").display()
            ),
        }
    }
}

/// One line per finished run.
fn run_line(s: &Summary, dir: &Path) -> String {
    format!(
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
    )
}

/// Runs the plan. `fleet` and `backend` are needed when the plan scales. Ctrl-C stops the test.
pub async fn run(
    fleet: Option<&Fleet>,
    api: Api,
    plan: &RunPlan,
    backend: Option<&AnyBackend>,
    output: Output,
) -> Result<RunReport> {
    let runner = Runner {
        fleet,
        api,
        plan,
        output,
    };
    tokio::select! {
        r = run_plan(&runner, backend) => r,
        _ = tokio::signal::ctrl_c() => {
            let stopped = runner.api.stop().await.is_ok();
            if stopped {
                bail!("interrupted; the test was stopped (files of finished runs are in {})", plan.out.display())
            }
            bail!("interrupted, and the test could not be stopped; run `fleet stop`")
        }
    }
}

async fn run_plan(runner: &Runner<'_>, backend: Option<&AnyBackend>) -> Result<RunReport> {
    let plan = runner.plan;
    // Fail early, before scaling anything, when the controller is not there.
    let _: MasterView = runner.api.get_json(routes::API_MASTER).await?;

    // `None`: leave the fleet as it is.
    let steps: Vec<Option<usize>> = if plan.nodes.is_empty() {
        vec![None]
    } else {
        plan.nodes.iter().copied().map(Some).collect()
    };
    let total = steps.len() * plan.users.len();
    let mut runs: Vec<Summary> = vec![];
    for step in steps {
        let scale_note = match step {
            Some(n) => scale_to(runner, backend, n).await?,
            None => None,
        };
        for &users in &plan.users {
            let dir = if plan.matrix {
                let nodes = match step {
                    Some(n) => n,
                    None => fresh(&runner.api.nodes().await?).count(),
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
            let mut s = runner.run_one(users, &label, &dir).await?;
            if let Some(n) = &scale_note {
                s.warnings.push(n.clone());
                write(&dir, "summary.json", serde_json::to_vec_pretty(&s)?)?;
                write(&dir, "summary.md", summary_md(&s))?;
            }
            if runner.output == Output::Text {
                println!("{}", run_line(&s, &dir));
                for v in &s.thresholds {
                    println!("  {v}");
                }
            }
            runs.push(s);
            if plan.matrix {
                // Written after every run, so an interrupted matrix keeps what it measured.
                write(&plan.out, "matrix.csv", matrix_csv(&runs))?;
                write(&plan.out, "matrix.md", matrix_md(plan, &runs))?;
            }
            if let Some(file) = &plan.junit {
                let xml = junit::junit_xml(&runs, plan.matrix);
                std::fs::write(file, xml)
                    .with_context(|| format!("cannot write the JUnit file {}", file.display()))?;
            }
        }
    }
    Ok(match plan.matrix {
        true => RunReport::Matrix {
            dir: plan.out.clone(),
            runs,
        },
        false => RunReport::One(Box::new(runs.remove(0))),
    })
}

/// Scales to `n` nodes as `fleet scale` does, then waits for their workers to join the master;
/// returns a note when the counts did not settle.
async fn scale_to(
    runner: &Runner<'_>,
    backend: Option<&AnyBackend>,
    n: usize,
) -> Result<Option<String>> {
    let be = backend.context("scaling needs a backend")?;
    let fleet = runner.fleet.context("scaling needs the fleet directory")?;
    runner.say(format_args!(
        "scaling to {n} nodes ({})",
        crate::backend::Backend::name(be)
    ));
    let plan = runner.plan;
    scale(fleet, be, n, false, plan.wait, runner.output).await?;
    runner.wait_workers().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn matrix_specs() {
        assert_eq!(parse_matrix("users=200,400,800").unwrap(), [200, 400, 800]);
        assert_eq!(parse_matrix(" users=5 ").unwrap(), [5]);
        assert!(parse_matrix("nodes=1,2").is_err());
        assert!(parse_matrix("users=").is_err());
        assert!(parse_matrix("users=1,x").is_err());
    }

    fn plan(run_section: &str, args: &[&str]) -> Result<RunPlan> {
        #[derive(clap::Parser)]
        struct Cmd {
            #[command(flatten)]
            run: RunArgs,
        }
        let toml = format!(
            "name = \"x\"\n[controller]\nlisten = \"127.0.0.1:8443\"\nurl = \"https://127.0.0.1:8443\"\ncert_names = [\"127.0.0.1\"]\n{run_section}"
        );
        let fleet = Fleet {
            dir: PathBuf::from("/f"),
            config: toml::from_str(&toml)?,
        };
        let mut argv = vec!["run", "--users", "2", "--duration", "5s", "--out", "/o"];
        argv.extend_from_slice(args);
        let cmd = <Cmd as clap::Parser>::try_parse_from(argv)?;
        RunPlan::new(Some(&fleet), &cmd.run)
    }

    #[test]
    fn thresholds_come_from_the_command_line_or_fleet_toml() {
        let p = plan("", &["--fail-on", "p95>500ms", "--fail-on", "rps<100"]).unwrap();
        assert_eq!(p.thresholds.len(), 2);
        let toml = "[run]\nfail_on = [\"failure_rate>1%\"]\n";
        let p = plan(toml, &[]).unwrap();
        assert_eq!(p.thresholds[0].text, "failure_rate>1%");
        // The command line replaces fleet.toml's list.
        let p = plan(toml, &["--fail-on", "p99>1s", "--junit", "/j.xml"]).unwrap();
        assert_eq!(p.thresholds.len(), 1);
        assert_eq!(p.junit, Some(PathBuf::from("/j.xml")));
        assert!(plan("", &[]).unwrap().thresholds.is_empty());
    }

    #[test]
    fn bad_thresholds_are_refused_before_anything_runs() {
        let e = plan("", &["--fail-on", "p95>500"]).unwrap_err().to_string();
        assert_eq!(
            e,
            "--fail-on \"p95>500\": p95 takes a time with its unit, e.g. p95>500ms or p95>1.5s, not \"500\""
        );
        let e = plan("[run]\nfail_on = [\"rps<\"]\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("fleet.toml: [run] fail_on \"rps<\": rps needs a number"),
            "{e}"
        );
        let e = plan("", &["--junit", "/j.xml"]).unwrap_err().to_string();
        assert!(
            e.starts_with("--junit writes one test case per threshold"),
            "{e}"
        );
    }

    #[test]
    fn a_broken_threshold_exits_99_and_names_it() {
        use self::locust::{Endpoint, AGGREGATED};
        let mut s = report::tests::summary();
        let agg = Endpoint {
            method: String::new(),
            name: AGGREGATED.into(),
            requests: 88,
            failures: 0,
            rps: 20.29,
            median: None,
            avg: None,
            min: None,
            max: None,
            avg_size: None,
            fail_rate: 0.0,
            percentiles: vec![],
        };
        let t = Threshold::parse_all(&["failures>0".into(), "rps<100".into()]).unwrap();
        s.thresholds = threshold::evaluate(&t, &[agg]);
        let e = RunReport::One(Box::new(s.clone())).gate().unwrap_err();
        assert_eq!(crate::cli::exit_code(&e), THRESHOLDS_FAILED);
        assert_eq!(
            e.to_string(),
            "1 of 2 threshold checks failed: rps<100 (rps 20.29 rps, fails when < 100 rps); see /r/summary.md"
        );
        let m = RunReport::Matrix {
            dir: PathBuf::from("/m"),
            runs: vec![s.clone(), s.clone()],
        };
        assert!(m.gate().unwrap_err().to_string().starts_with(
            "2 of 4 threshold checks failed: nodes-2-users-4: rps<100 (rps 20.29 rps"
        ));
        s.thresholds.pop();
        assert!(RunReport::One(Box::new(s)).gate().is_ok());
        assert_eq!(crate::cli::exit_code(&anyhow!("unreachable")), 1);
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
