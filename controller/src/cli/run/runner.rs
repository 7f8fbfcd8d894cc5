//! One run, start to files: preflight, reset and start, watch, take the numbers, stop, collect
//! Locust's files and write the summary. Every call goes through the one operator API client.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use fleet_common::client::Response;
use fleet_common::wire::{routes, MasterView, NodeView, SpecView, SwarmRequest, WorkerState};
use hyper::Method;

use super::html::report_html;
use super::locust::{
    aggregated, csv_requests, endpoints, history_window, live_message, server_time, Aggregated,
    Live,
};
use super::report::{
    failures_csv, several_masters_note, summary_md, write, Summary, EXCEPTIONS_HEADER,
};
use super::threshold::evaluate;
use super::RunPlan;
use crate::cli::api::{Api, SMALL_LIMIT, TIMEOUT};
use crate::cli::render::{self, Output};
use crate::config::Fleet;
use crate::daemon::SILENT_AFTER_S;
use crate::master::merge::Report;
use crate::master::view::report_from_requests;

/// How often the live progress reads the test's stats (Locust's cache time of
/// `/stats/requests`).
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How often the progress bar moves between two reads.
const TICK: Duration = Duration::from_millis(250);
/// Locust writes its history file every second but flushes it every 5 s: wait this long at
/// most for the rows of the run's last seconds to reach the disk.
const HISTORY_FLUSH_WAIT: Duration = Duration::from_secs(8);
/// After scaling, how long the workers get to join the master.
const WORKERS_WAIT: Duration = Duration::from_secs(60);
/// The HTML report is ~1 MB and Locust renders it on demand.
const REPORT_TIMEOUT: Duration = Duration::from_secs(120);
const REPORT_LIMIT: usize = 64 << 20;
/// The history file grows for as long as the master runs (one row per entry per second).
const HISTORY_LIMIT: usize = 256 << 20;
const NO_WORKERS: &str = "no Locust worker is connected to the master, so Locust would run nothing; start agents with `fleet scale --nodes N` (or `fleet run --nodes N`)";

/// Nodes whose agents heartbeat (not silent).
pub(super) fn fresh(views: &[NodeView]) -> impl Iterator<Item = &NodeView> {
    views.iter().filter(|v| v.heartbeat_age_s < SILENT_AFTER_S)
}

/// Locust workers the agents report running.
fn workers_reported(views: &[NodeView]) -> u64 {
    fresh(views)
        .filter(|v| v.heartbeat.running.is_some())
        .map(|v| {
            v.heartbeat
                .workers
                .iter()
                .filter(|w| w.state == WorkerState::Running)
                .count() as u64
        })
        .sum()
}

/// What the end of a run fetched, before the summary is made of it.
struct End {
    /// The test's numbers (`stats.json`).
    report: Report,
    live: Live,
    agg: Aggregated,
    views: Vec<NodeView>,
    spec: SpecView,
    master: MasterView,
    /// The stop's answer: its failure is reported after the files are written.
    stop: Result<Response>,
    ended: SystemTime,
    /// Why there is no stats history, if there is none.
    history: Option<String>,
}

pub(super) struct Runner<'a> {
    /// The fleet directory, when the controller is its own (`None` remotely).
    pub(super) fleet: Option<&'a Fleet>,
    pub(super) api: Api,
    pub(super) plan: &'a RunPlan,
    pub(super) output: Output,
}

impl Runner<'_> {
    pub(super) fn say(&self, line: impl std::fmt::Display) {
        render::say(self.output, line);
    }

    /// Waits until the master counts as many workers as the agents report running.
    pub(super) async fn wait_workers(&self) -> Result<Option<String>> {
        let t = Instant::now();
        let mut stable = 0;
        let (got, expected) = loop {
            let expected = workers_reported(&self.api.nodes().await?);
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
        if got == 0 {
            bail!(
                "no Locust worker joined the master within {}s of scaling; see the agents' logs (local nodes: {}/<node>/agent.log)",
                WORKERS_WAIT.as_secs(),
                self.fleet.map(|f| f.local_dir()).unwrap_or_default().display()
            );
        }
        Ok(Some(format!(
            "{got} workers at the master, {expected} reported by the agents, after waiting {}s",
            WORKERS_WAIT.as_secs()
        )))
    }

    /// One run into `dir`.
    pub(super) async fn run_one(&self, users: u64, label: &str, dir: &Path) -> Result<Summary> {
        let master = self.preflight().await?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let from = self.start(users).await?;
        let started = SystemTime::now();
        self.watch(users, label).await;
        let end = self.end(dir, from).await?;
        let stats_csv = std::fs::read_to_string(dir.join("stats.csv")).unwrap_or_default();
        let after_stop = csv_requests(&stats_csv);
        // The final numbers (every worker's last report in); unreadable: no rows, so every
        // threshold fails and says so.
        let rows = endpoints(&stats_csv).unwrap_or_default();
        let warnings = warnings(&master, &end, users, after_stop);
        let plan = self.plan;
        let summary = Summary {
            users,
            spawn_rate: plan.spawn_rate,
            duration_s: plan.duration.as_secs_f64(),
            nodes: fresh(&end.views).count(),
            masters: end.report.masters,
            workers: end.live.worker_count,
            requests: end.agg.num_requests,
            failures: end.agg.num_failures,
            rps: end.agg.total_rps.unwrap_or(0.0),
            p50_ms: end.agg.median_response_time.unwrap_or(0.0),
            p95_ms: end.agg.p95.unwrap_or(0.0),
            p99_ms: end.agg.p99.unwrap_or(0.0),
            failure_pct: failure_pct(&end.agg),
            state: end.live.state,
            user_count: end.live.user_count,
            spec_sha256: end.spec.current.as_ref().map(|c| c.sha256.clone()),
            spec_sequence: end.spec.current.as_ref().map(|c| c.sequence),
            master_epoch: end.master.epoch,
            started: humantime::format_rfc3339_seconds(started).to_string(),
            ended: humantime::format_rfc3339_seconds(end.ended).to_string(),
            dir: dir.to_path_buf(),
            history: end.history.is_none(),
            requests_after_stop: after_stop,
            warnings,
            thresholds: evaluate(&plan.thresholds, &rows),
        };
        write(dir, "summary.json", serde_json::to_vec_pretty(&summary)?)?;
        write(dir, "summary.md", summary_md(&summary))?;
        if end.report.masters > 1 {
            write(
                dir,
                "report.html",
                report_html(&summary, &end.report, &rows),
            )?;
        }
        end.stop?;
        for w in &summary.warnings {
            self.say(format_args!("warning: {w}"));
        }
        Ok(summary)
    }

    /// The controller answers, no test runs, workers are connected.
    async fn preflight(&self) -> Result<MasterView> {
        let master: MasterView = self.api.get_json(routes::API_MASTER).await?;
        if let Some(sw) = master.swarm {
            bail!(
                "a test is already running ({} users); stop it with `fleet stop` first",
                sw.users
            );
        }
        if self.api.worker_count().await? == 0 {
            bail!("{NO_WORKERS}");
        }
        Ok(master)
    }

    /// Resets Locust's stats and starts the test; returns the reset's time (server clock).
    async fn start(&self, users: u64) -> Result<u64> {
        let reset = self
            .api
            .ok(Method::POST, "/locust/stats/reset", None, 1 << 20, TIMEOUT)
            .await?;
        let swarm = SwarmRequest {
            users,
            spawn_rate: self.plan.spawn_rate,
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
            200 => Ok(server_time(&reset)),
            409 => bail!("{NO_WORKERS}"),
            502 => {
                let e = self.api.refused(&r, "POST /api/swarm");
                bail!("Locust refused the test ({e:#}); check state/master.log")
            }
            _ => Err(self.api.refused(&r, "POST /api/swarm")),
        }
    }

    /// The run: a bar over the duration, with Locust's numbers every PROGRESS_EVERY.
    async fn watch(&self, users: u64, label: &str) {
        let duration = self.plan.duration;
        let t0 = Instant::now();
        let pb = render::timer(
            self.output,
            duration,
            format!("{label}{}", humantime::format_duration(duration)),
        );
        // Locust's answer is cached ~2 s: the first read after that shows the new test.
        let mut next_read = Instant::now() + PROGRESS_EVERY;
        while t0.elapsed() < duration {
            if Instant::now() >= next_read {
                next_read = Instant::now() + PROGRESS_EVERY;
                match self.api.test_stats(false).await {
                    Ok(r) => match serde_json::from_slice::<Live>(&r.body) {
                        Ok(l) => pb.set_message(live_message(&l, users)),
                        Err(_) => pb.set_message("stats unreadable"),
                    },
                    Err(_) => pb.set_message("stats unavailable (retrying)"),
                }
            }
            pb.set_position(t0.elapsed().as_millis().min(duration.as_millis()) as u64);
            let left = duration.saturating_sub(t0.elapsed());
            tokio::time::sleep(left.min(TICK)).await;
        }
        pb.finish_and_clear();
    }

    /// Takes the test's numbers once, merged over its masters, before the stop (the same bytes
    /// are saved as stats.json), the nodes, the spec and the master; stops the test; then
    /// collects the files.
    async fn end(&self, dir: &Path, from: u64) -> Result<End> {
        let stats_body = match self.api.test_stats(false).await {
            Ok(r) => r.body,
            Err(e) => {
                let _ = self.api.stop().await;
                return Err(e.context("the test was stopped"));
            }
        };
        write(dir, "stats.json", &stats_body)?;
        let stats: serde_json::Value =
            serde_json::from_slice(&stats_body).context("the test's stats are not JSON")?;
        let live: Live = serde_json::from_value(stats.clone()).unwrap_or_default();
        let agg = aggregated(&stats);
        let mut report =
            report_from_requests(&stats_body).context("the test's stats are not JSON")?;
        // Locust's own answer (a controller older than /api/stats) is one master's.
        report.masters = stats["masters"].as_u64().unwrap_or(1) as usize;
        let views = self.api.nodes().await;
        let spec: Result<SpecView> = self.api.get_json(routes::API_SPEC).await;
        let master: Result<MasterView> = self.api.get_json(routes::API_MASTER).await;

        let stop = self.api.stop().await;
        let ended = SystemTime::now();
        let to = match &stop {
            Ok(r) => server_time(r),
            Err(_) => from + self.plan.duration.as_secs() + 1,
        };
        let (agg, views, spec, master) = (agg?, views?, spec?, master?);
        // Locust's files, after the stop so they hold the whole run. (The controller holds
        // the stop itself: it does not take Locust's cached "running" for a test to restore.)
        let history = self.collect(dir, from, to, &report).await?;
        Ok(End {
            report,
            live,
            agg,
            views,
            spec,
            master,
            stop,
            ended,
            history,
        })
    }

    /// Writes the CSVs, the HTML report of one master and the history; returns the history's
    /// note. `stats.csv` is the test's, merged over its masters (exact, so thresholds judged
    /// on it are too). With one master the other files are Locust's own; with several, fleet
    /// writes `failures.csv` from the merged errors (and `report.html` once the summary is
    /// made), and the history and exceptions, which Locust keeps per master, are left to
    /// each master's UI.
    async fn collect(
        &self,
        dir: &Path,
        from: u64,
        to: u64,
        report: &Report,
    ) -> Result<Option<String>> {
        let csv = self.api.test_stats(true).await?;
        write(dir, "stats.csv", &csv.body)?;
        if report.masters > 1 {
            write(dir, "failures.csv", failures_csv(&report.errors))?;
            write(dir, "exceptions.csv", EXCEPTIONS_HEADER)?;
            let note = several_masters_note(report.masters);
            write(dir, "stats_history.csv", format!("# {note}\n"))?;
            return Ok(Some(note));
        }
        for (path, name) in [
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
        const PATH: &str = "/locust/stats/requests_full_history/csv";
        let t = Instant::now();
        let note = loop {
            let r = match self
                .api
                .call(Method::GET, PATH, None, HISTORY_LIMIT, REPORT_TIMEOUT)
                .await
            {
                Ok(r) => r,
                Err(e) => break format!("{e:#}"),
            };
            if r.status == 404 {
                break "the Locust master runs without --csv and --csv-full-history (Locust answered 404); a master started by this version of `fleet serve` has them".to_string();
            }
            if r.status != 200 {
                break format!("{:#}", self.api.refused(&r, &format!("GET {PATH}")));
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

/// 100 × failures / requests of the Aggregated row (0 without requests).
fn failure_pct(agg: &Aggregated) -> f64 {
    if agg.num_requests > 0 {
        agg.num_failures as f64 * 100.0 / agg.num_requests as f64
    } else {
        0.0
    }
}

/// What the summary warns about: no history, a master restart, users short of the target,
/// no requests.
fn warnings(start: &MasterView, end: &End, users: u64, after_stop: Option<u64>) -> Vec<String> {
    let mut w = vec![];
    if let Some(note) = &end.history {
        w.push(format!("no stats history: {note}"));
    }
    if end.master.epoch != start.epoch {
        w.push(format!(
            "the Locust master restarted during the run (epoch {} -> {}): the numbers cover only the time since",
            start.epoch, end.master.epoch
        ));
    }
    if end.live.user_count < users {
        w.push(format!(
            "only {} of {users} users were running at the end; raise --spawn-rate or --duration",
            end.live.user_count
        ));
    }
    match (end.agg.num_requests, after_stop) {
        (0, Some(n)) if n > 0 => w.push(format!(
            "Locust's end-of-run numbers had no requests yet (workers report every 3 s and the answer is cached 2 s), though stats.csv counts {n} after the stop; use a longer --duration"
        )),
        (0, _) => w.push("no requests were made; check the locustfile's host and the target".into()),
        _ => {}
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master(epoch: u64) -> MasterView {
        MasterView {
            managed: true,
            pid: None,
            epoch,
            restarts: 0,
            user_classes: vec![],
            web_url: String::new(),
            swarm: None,
            shards: vec![],
            capacity_warning: None,
        }
    }

    fn end(epoch: u64, user_count: u64, requests: u64) -> End {
        End {
            report: report_from_requests(b"{}").unwrap(),
            live: Live {
                user_count,
                ..Default::default()
            },
            agg: Aggregated {
                num_requests: requests,
                ..Default::default()
            },
            views: vec![],
            spec: SpecView::default(),
            master: master(epoch),
            stop: Err(anyhow::anyhow!("not stopped")),
            ended: SystemTime::UNIX_EPOCH,
            history: None,
        }
    }

    #[test]
    fn a_clean_run_has_no_warnings() {
        assert!(warnings(&master(1), &end(1, 4, 10), 4, Some(12)).is_empty());
    }

    #[test]
    fn restarts_missing_users_and_missing_requests_are_warned_about() {
        let mut e = end(2, 3, 0);
        e.history = Some("no history".into());
        let w = warnings(&master(1), &e, 4, Some(5));
        assert_eq!(w.len(), 4, "{w:?}");
        assert!(w[0].starts_with("no stats history: no history"));
        assert!(w[1].contains("epoch 1 -> 2"));
        assert!(w[2].starts_with("only 3 of 4 users"));
        assert!(w[3].contains("stats.csv counts 5 after the stop"));
        let w = warnings(&master(1), &end(1, 4, 0), 4, None);
        assert_eq!(
            w,
            ["no requests were made; check the locustfile's host and the target"]
        );
    }
}
