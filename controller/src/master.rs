//! The Locust master: run it, supervise it, and keep a running test going across restarts.
//!
//! Facts this builds on (LOCUST.md): workers of an old master never rejoin a new one, so every
//! master (re)start bumps the *epoch* and the controller republishes the manifest with it, which
//! makes agents restart their workers; the master fixes its user classes at start, so a spec
//! that renames or adds User classes needs a master restart; `--enable-rebalancing` spreads
//! users onto workers that join a running test; after a master restart the test must be started
//! again (`POST /swarm`) once the workers are back.
//!
//! The master runs in a process group of its own with its output in `state/master.log`, so it
//! outlives a controller that crashes: the next `fleet serve` adopts it (same epoch, the test
//! keeps running) instead of starting a second one. A clean `fleet serve` shutdown stops it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use fleet_common::wire::{MasterView, SwarmRequest};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::MasterConfig;

macro_rules! log {
    ($($arg:tt)*) => { crate::log(format_args!($($arg)*)) };
}

/// Restart delays after the master exits on its own: doubled from the first up to the cap.
const RESTART_INITIAL: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(30);
/// A master that ran this long resets the restart delay.
const RESTART_STABLE: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often the swarm keeper reads `/stats/requests` (Locust caches it ~2 s anyway).
const STATS_EVERY: Duration = Duration::from_secs(1);
/// After a master restart, how long to wait for the workers to come back before re-starting
/// the test with whatever joined.
const RESWARM_WAIT: Duration = Duration::from_secs(30);
/// How long a running test may have another user count than the one recorded before the
/// controller re-POSTs it (longer than Locust's ~2 s stats cache).
const DRIFT_GRACE: Duration = Duration::from_secs(3);
/// After the operator starts or stops a test, how long the keeper trusts that over Locust's
/// (cached, ~2 s old) stats: more than twice the cache plus one poll.
const OPERATOR_GRACE: Duration = Duration::from_secs(6);
/// Least time between two `/swarm` posts of the keeper.
const POST_COOLDOWN: Duration = Duration::from_secs(4);

/// User classes a spec defines, by a scan of its Python files: top-level `class Name(...)`
/// whose bases mention `User`. A change of this set needs a master restart.
pub fn user_classes(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    scan(dir, &mut out);
    out
}

fn scan(dir: &Path, out: &mut BTreeSet<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if fleet_common::bundle::is_ignored(&name) {
            continue;
        }
        let p = e.path();
        if p.is_dir() {
            scan(&p, out);
        } else if name.ends_with(".py") {
            let Ok(text) = std::fs::read_to_string(&p) else {
                continue;
            };
            for line in text.lines() {
                let Some(rest) = line.strip_prefix("class ") else {
                    continue;
                };
                let Some((cls, tail)) = rest.split_once('(') else {
                    continue;
                };
                let bases = tail.split(')').next().unwrap_or("");
                if bases.contains("User") {
                    out.insert(cls.trim().to_string());
                }
            }
        }
    }
}

/// Plain HTTP to the master's web API on loopback.
#[derive(Clone)]
pub struct LocustApi {
    base: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Stats {
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub user_count: u64,
    #[serde(default)]
    pub worker_count: u64,
    #[serde(default)]
    pub total_rps: f64,
    #[serde(default)]
    pub fail_ratio: f64,
}

impl LocustApi {
    pub fn new(base: &str) -> LocustApi {
        let http = Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        LocustApi {
            base: base.trim_end_matches('/').to_string(),
            http,
        }
    }

    pub fn client(&self) -> &Client<HttpConnector, Full<Bytes>> {
        &self.http
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        form: Option<String>,
    ) -> Result<(u16, Bytes)> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        let body = match form {
            Some(f) => {
                req = req.header("content-type", "application/x-www-form-urlencoded");
                Bytes::from(f)
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(body))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.http.request(req))
            .await
            .context("Locust master did not answer within 10 s")??;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    pub async fn stats(&self) -> Result<Stats> {
        let (s, b) = self
            .call(hyper::Method::GET, "/stats/requests", None)
            .await?;
        anyhow::ensure!(s == 200, "GET /stats/requests: HTTP {s}");
        Ok(serde_json::from_slice(&b)?)
    }

    pub async fn stats_raw(&self) -> Result<serde_json::Value> {
        let (s, b) = self
            .call(hyper::Method::GET, "/stats/requests", None)
            .await?;
        anyhow::ensure!(s == 200, "GET /stats/requests: HTTP {s}");
        Ok(serde_json::from_slice(&b)?)
    }

    /// Starts (or re-sizes) the test. Locust answers errors as HTTP 200 with `success: false`.
    pub async fn swarm(&self, s: &SwarmRequest) -> Result<()> {
        let form = format!("user_count={}&spawn_rate={}", s.users, s.spawn_rate);
        let (st, b) = self.call(hyper::Method::POST, "/swarm", Some(form)).await?;
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
        if st != 200 || v.get("success") == Some(&serde_json::Value::Bool(false)) {
            anyhow::bail!(
                "Locust refused the swarm: {}",
                v.get("message")
                    .and_then(|m| m.as_str())
                    .unwrap_or("no reason given")
            );
        }
        Ok(())
    }

    pub async fn stop(&self) -> Result<()> {
        let (st, _) = self.call(hyper::Method::POST, "/stop", None).await?;
        anyhow::ensure!(st == 200, "stop: HTTP {st}");
        Ok(())
    }
}

/// What survives a controller restart.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Saved {
    pid: Option<u32>,
    epoch: u64,
    classes: BTreeSet<String>,
    dir: Option<PathBuf>,
    swarm: Option<SwarmRequest>,
}

#[derive(Debug, Clone, Default)]
struct Status {
    pid: Option<u32>,
    epoch: u64,
    restarts: u64,
    classes: BTreeSet<String>,
    dir: Option<PathBuf>,
    swarm: Option<SwarmRequest>,
    /// When a test started with a `run_time` ends: it is not re-started after that.
    swarm_until: Option<Instant>,
    /// When the operator last started or stopped a test. Locust's stats lag ~2 s behind
    /// (cached), so for a while after that the keeper neither adopts a test it still sees
    /// running nor re-posts one it still sees idle.
    swarm_set_at: Option<Instant>,
    stats: Option<Stats>,
    /// Worker count seen while the test last ran, to know when they are all back.
    workers_seen: u64,
}

enum Cmd {
    /// Run on this spec directory (restarts only when the user classes changed or no master runs).
    Ensure {
        dir: PathBuf,
        reply: oneshot::Sender<Result<u64>>,
    },
    Stop {
        reply: oneshot::Sender<()>,
    },
}

/// A handle on the supervised master.
#[derive(Clone)]
pub struct Master {
    cfg: MasterConfig,
    locustfile: String,
    state_file: PathBuf,
    status: Arc<Mutex<Status>>,
    cmds: mpsc::Sender<Cmd>,
    epoch_rx: watch::Receiver<u64>,
    pub api: LocustApi,
}

fn alive_master(pid: u32) -> bool {
    crate::procfs::live_process(pid, |args| args.iter().any(|a| *a == b"--master"))
}

/// Stops a master's process group: SIGTERM, up to [`STOP_GRACE`] for it to exit (our own
/// child is waited for, an adopted one watched in /proc), then SIGKILL to whatever is left.
async fn stop_group(p: u32, child: Option<&mut tokio::process::Child>) {
    let group = Pid::from_raw(p as i32);
    let _ = killpg(group, Signal::SIGTERM);
    match child {
        Some(c) => {
            if tokio::time::timeout(STOP_GRACE, c.wait()).await.is_err() {
                let _ = killpg(group, Signal::SIGKILL);
                let _ = c.wait().await;
            }
        }
        None => {
            let t = Instant::now();
            while alive_master(p) && t.elapsed() < STOP_GRACE {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let _ = killpg(group, Signal::SIGKILL);
}

impl Master {
    /// Starts the supervisor. `state_dir` keeps `master.json` and `master.log`.
    pub fn start(cfg: MasterConfig, locustfile: &str, state_dir: &Path) -> Master {
        let state_file = state_dir.join("master.json");
        let saved: Saved = std::fs::read(&state_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let status = Arc::new(Mutex::new(Status {
            epoch: saved.epoch,
            classes: saved.classes.clone(),
            dir: saved.dir.clone(),
            swarm: saved.swarm,
            ..Default::default()
        }));
        let (cmds, rx) = mpsc::channel(8);
        let (epoch_tx, epoch_rx) = watch::channel(saved.epoch);
        let m = Master {
            api: LocustApi::new(&cfg.web_url),
            cfg,
            locustfile: locustfile.to_string(),
            state_file,
            status,
            cmds,
            epoch_rx,
        };
        if m.cfg.managed {
            tokio::spawn(m.clone().supervise(
                rx,
                saved.pid.filter(|p| alive_master(*p)),
                epoch_tx,
                state_dir.join("master.log"),
            ));
        } else {
            // An external master: nothing to supervise; epoch stays 0 unless the operator
            // restarts it and tells agents with `fleet serve` restarted.
            drop(rx);
        }
        tokio::spawn(m.clone().keep_swarm());
        m
    }

    pub fn managed(&self) -> bool {
        self.cfg.managed
    }

    pub fn epoch(&self) -> watch::Receiver<u64> {
        self.epoch_rx.clone()
    }

    /// Makes sure a master runs on `dir`'s user classes; returns the epoch to publish.
    pub async fn ensure(&self, dir: PathBuf) -> Result<u64> {
        if !self.cfg.managed {
            return Ok(*self.epoch_rx.borrow());
        }
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Ensure { dir, reply })
            .await
            .context("master supervisor stopped")?;
        rx.await.context("master supervisor stopped")?
    }

    pub async fn stop(&self) {
        let (reply, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Stop { reply }).await.is_ok() {
            let _ = rx.await;
        }
    }

    pub fn view(&self) -> MasterView {
        let s = self.status.lock().unwrap();
        MasterView {
            managed: self.cfg.managed,
            pid: s.pid,
            epoch: s.epoch,
            restarts: s.restarts,
            user_classes: s.classes.iter().cloned().collect(),
            web_url: self.cfg.web_url.clone(),
            swarm: s.swarm,
        }
    }

    pub fn stats(&self) -> Option<Stats> {
        self.status.lock().unwrap().stats.clone()
    }

    /// Records the test the operator started, so it is re-started after a master restart.
    pub fn set_swarm(&self, s: Option<SwarmRequest>) {
        self.set_swarm_until(s, None);
    }

    /// Like [`Master::set_swarm`] for a test that Locust ends by itself after `run_time`.
    pub fn set_swarm_until(&self, s: Option<SwarmRequest>, run_time: Option<Duration>) {
        {
            let mut st = self.status.lock().unwrap();
            st.swarm = s;
            st.swarm_until = run_time.map(|d| Instant::now() + d);
            st.swarm_set_at = Some(Instant::now());
        }
        self.save();
    }

    fn save(&self) {
        let s = self.status.lock().unwrap().clone();
        let saved = Saved {
            pid: s.pid,
            epoch: s.epoch,
            classes: s.classes,
            dir: s.dir,
            swarm: s.swarm,
        };
        let tmp = self.state_file.with_extension("tmp");
        if std::fs::write(&tmp, serde_json::to_vec(&saved).expect("serialises")).is_ok() {
            let _ = std::fs::rename(&tmp, &self.state_file);
        }
    }

    fn spawn(&self, dir: &Path, log_path: &Path) -> Result<tokio::process::Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)?;
        let web = self.cfg.web_url.trim_start_matches("http://");
        let (hostport, base) = match web.split_once('/') {
            Some((h, b)) => (h, format!("/{b}")),
            None => (web, String::new()),
        };
        let (web_host, web_port) = hostport.rsplit_once(':').unwrap_or((hostport, "8089"));
        let mut c = tokio::process::Command::new(&self.cfg.locust);
        c.arg("-f")
            .arg(dir.join(&self.locustfile))
            .args(["--master", "--master-bind-host", &self.cfg.bind_host])
            .args(["--master-bind-port", &self.cfg.port.to_string()])
            .args(["--web-host", web_host, "--web-port", web_port])
            .arg("--enable-rebalancing");
        if !base.is_empty() {
            c.args(["--web-base-path", &base]);
        }
        // `fleet run` saves the full stats history, which Locust serves
        // (`/stats/requests_full_history/csv`) only with `--csv` and `--csv-full-history`
        // (LOCUST.md). The files sit in the state dir and are rewritten at each master start;
        // the history grows by one row per request name per second while the master runs.
        let csv_given = self
            .cfg
            .args
            .iter()
            .any(|a| a == "--csv" || a.starts_with("--csv="));
        if let (false, Some(state_dir)) = (csv_given, log_path.parent()) {
            c.arg("--csv")
                .arg(state_dir.join("locust-csv/run"))
                .arg("--csv-full-history");
        }
        c.args(&self.cfg.args)
            .current_dir(dir)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(false);
        c.spawn().with_context(|| format!("cannot start the Locust master ({}); run the setup or set master.locust in fleet.toml", self.cfg.locust))
    }

    async fn supervise(
        self,
        mut cmds: mpsc::Receiver<Cmd>,
        adopted: Option<u32>,
        epoch_tx: watch::Sender<u64>,
        log_path: PathBuf,
    ) {
        let mut child: Option<tokio::process::Child> = None;
        let mut pid = adopted;
        if let Some(p) = adopted {
            log!(
                "adopting the running Locust master (pid {p}, epoch {})",
                self.status.lock().unwrap().epoch
            );
            self.status.lock().unwrap().pid = Some(p);
        }
        let mut started = Instant::now();
        let mut delay = RESTART_INITIAL;
        let mut restart_at: Option<tokio::time::Instant> = None;
        loop {
            let dir = self.status.lock().unwrap().dir.clone();
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    None => return,
                    Some(Cmd::Stop { reply }) => {
                        if let Some(p) = pid.take() {
                            log!("stopping the Locust master (pid {p})");
                            stop_group(p, child.as_mut()).await;
                        }
                        self.status.lock().unwrap().pid = None;
                        self.save();
                        let _ = reply.send(());
                        return;
                    }
                    Some(Cmd::Ensure { dir: new_dir, reply }) => {
                        let classes = user_classes(&new_dir);
                        let same = {
                            let s = self.status.lock().unwrap();
                            pid.is_some() && s.classes == classes
                        };
                        self.status.lock().unwrap().dir = Some(new_dir.clone());
                        if same {
                            let _ = reply.send(Ok(self.status.lock().unwrap().epoch));
                            self.save();
                            continue;
                        }
                        if let Some(p) = pid.take() {
                            log!("user classes changed ({:?}): restarting the Locust master", classes);
                            stop_group(p, child.as_mut()).await;
                            self.status.lock().unwrap().restarts += 1;
                        }
                        let res = match self.spawn(&new_dir, &log_path) {
                            Ok(c) => {
                                let epoch = {
                                    let mut s = self.status.lock().unwrap();
                                    s.epoch += 1;
                                    s.pid = c.id();
                                    s.classes = classes;
                                    s.epoch
                                };
                                pid = c.id();
                                child = Some(c);
                                started = Instant::now();
                                restart_at = None;
                                self.save();
                                epoch_tx.send_replace(epoch);
                                log!("Locust master started (pid {}, epoch {epoch})", pid.unwrap_or(0));
                                Ok(epoch)
                            }
                            Err(e) => Err(e),
                        };
                        let _ = reply.send(res);
                    }
                },
                st = async {
                    match child.as_mut() {
                        Some(c) => c.wait().await.ok().map(|s| s.to_string()),
                        None => loop {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            if let Some(p) = pid { if !alive_master(p) { return Some("exited".to_string()); } }
                        },
                    }
                }, if pid.is_some() => {
                    log!("Locust master exited ({}); restarting in {:?}", st.unwrap_or_default(), delay);
                    if let Some(p) = pid.take() {
                        let _ = killpg(Pid::from_raw(p as i32), Signal::SIGKILL);
                    }
                    child = None;
                    self.status.lock().unwrap().pid = None;
                    if started.elapsed() >= RESTART_STABLE {
                        delay = RESTART_INITIAL;
                    }
                    restart_at = Some(tokio::time::Instant::now() + delay);
                    delay = (delay * 2).min(RESTART_MAX);
                }
                _ = async { tokio::time::sleep_until(restart_at.expect("guarded")).await }, if restart_at.is_some() && dir.is_some() => {
                    restart_at = None;
                    match self.spawn(dir.as_deref().expect("guarded"), &log_path) {
                        Ok(c) => {
                            let epoch = {
                                let mut s = self.status.lock().unwrap();
                                s.epoch += 1;
                                s.restarts += 1;
                                s.pid = c.id();
                                s.epoch
                            };
                            pid = c.id();
                            child = Some(c);
                            started = Instant::now();
                            self.save();
                            epoch_tx.send_replace(epoch);
                            log!("Locust master restarted (pid {}, epoch {epoch})", pid.unwrap_or(0));
                        }
                        Err(e) => {
                            log!("{e:#}");
                            restart_at = Some(tokio::time::Instant::now() + delay);
                            delay = (delay * 2).min(RESTART_MAX);
                        }
                    }
                }
            }
        }
    }

    /// Follows the master's state and keeps the recorded test going.
    ///
    /// The recorded test (`swarm`) is what the operator asked for; only an explicit stop (or
    /// the end of its `run_time`) clears it. Locust itself also goes idle without being asked:
    /// a restarted master starts `ready`, and a master whose last worker quit stops the test
    /// (`stopped`), as happens when every worker is swapped in a hot restart. In both cases
    /// the test is started again once the workers are back (the count seen while it ran,
    /// stable for one poll) or after [`RESWARM_WAIT`] with whatever joined. A running test
    /// whose user count drifts is re-posted too: Locust re-dispatches the users of a quitting
    /// worker only for the first of several quitting at once (measured with locust 2.47:
    /// swapping three workers left 3 of 6 users), and `/swarm` with the same numbers restores
    /// them (LOCUST.md).
    async fn keep_swarm(self) {
        let mut idle_since: Option<Instant> = None;
        let mut drift_since: Option<Instant> = None;
        let mut last_post: Option<Instant> = None;
        let mut last_workers = 0;
        loop {
            tokio::time::sleep(STATS_EVERY).await;
            let Ok(stats) = self.api.stats().await else {
                // A master that does not answer has no numbers: never show stale ones.
                self.status.lock().unwrap().stats = None;
                continue;
            };
            let idle = matches!(stats.state.as_str(), "ready" | "stopped");
            let (swarm, want_workers, recorded, settled) = {
                let mut s = self.status.lock().unwrap();
                let settled = s.swarm_set_at.is_none_or(|t| t.elapsed() >= OPERATOR_GRACE);
                s.stats = Some(stats.clone());
                let mut recorded = false;
                if s.swarm_until.is_some_and(|t| Instant::now() >= t) {
                    s.swarm = None;
                    s.swarm_until = None;
                    recorded = true;
                }
                if stats.state == "running" {
                    s.workers_seen = stats.worker_count;
                    // A test started on the master directly is adopted as it is.
                    if s.swarm.is_none() && stats.user_count > 0 && settled {
                        s.swarm = Some(SwarmRequest {
                            users: stats.user_count,
                            spawn_rate: stats.user_count as f64,
                        });
                        recorded = true;
                    }
                }
                (s.swarm, s.workers_seen.max(1), recorded, settled)
            };
            if recorded {
                self.save();
            }
            // Locust's stats are cached ~2 s: give a POST time to show before another.
            let cooled = settled && last_post.is_none_or(|t| t.elapsed() >= POST_COOLDOWN);
            if let (true, Some(sw)) = (idle, swarm) {
                let since = *idle_since.get_or_insert_with(Instant::now);
                let back = stats.worker_count >= want_workers && stats.worker_count == last_workers;
                if cooled && stats.worker_count > 0 && (back || since.elapsed() >= RESWARM_WAIT) {
                    last_post = Some(Instant::now());
                    match self.api.swarm(&sw).await {
                        Ok(()) => log!(
                            "re-started the test: {} users at {}/s on {} workers",
                            sw.users,
                            sw.spawn_rate,
                            stats.worker_count
                        ),
                        Err(e) => log!("cannot re-start the test: {e:#}"),
                    }
                }
            } else {
                idle_since = None;
            }
            match swarm {
                Some(sw)
                    if stats.state == "running"
                        && stats.worker_count > 0
                        && stats.user_count != sw.users =>
                {
                    let since = *drift_since.get_or_insert_with(Instant::now);
                    if cooled && since.elapsed() >= DRIFT_GRACE {
                        last_post = Some(Instant::now());
                        match self.api.swarm(&sw).await {
                            Ok(()) => log!(
                                "restored the test to {} users (it had {})",
                                sw.users,
                                stats.user_count
                            ),
                            Err(e) => log!("cannot restore the test's users: {e:#}"),
                        }
                        drift_since = None;
                    }
                }
                _ => drift_since = None,
            }
            last_workers = stats.worker_count;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_classes_are_found_by_their_bases() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("lib")).unwrap();
        std::fs::write(
            d.path().join("locustfile.py"),
            "from locust import HttpUser\nclass Web(HttpUser):\n    pass\nclass Helper(object):\n    class Inner(HttpUser): pass\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("lib/more.py"),
            "class Api(FastHttpUser):\n    pass\n",
        )
        .unwrap();
        let c = user_classes(d.path());
        assert_eq!(
            c.into_iter().collect::<Vec<_>>(),
            vec!["Api".to_string(), "Web".to_string()]
        );
    }
}
