//! Runs the managed Locust master: starts it on a spec, restarts it when it exits (with a
//! doubling delay) or when the spec's user classes change, adopts one a previous controller
//! left running, and stops its process group on shutdown.
//!
//! Every start bumps the *epoch*: workers of an old master never rejoin a new one, so the
//! controller republishes the manifest with the new epoch and agents restart their workers
//! (docs/locust.md, "Heartbeats, failures and restarts"). The master runs in a process group of
//! its own with its output in `state/master.log`, so it outlives a controller that crashes.
//!
//! The decisions ([`plan_ensure`], [`Backoff`], [`adoptable`], [`master_args`]) are pure; the
//! [`Supervisor`] actor carries them out and is the only writer of the process state.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_common::child_env;
use fleet_common::process::{self, signal_group, Signal};
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot, watch};

use super::classes::user_classes;
use super::{confine, plugin, MasterError, Shared};
use crate::config::MasterConfig;

/// Restart delays after the master exits on its own: doubled from the first up to the cap.
const RESTART_INITIAL: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(30);
/// A master that ran this long resets the restart delay.
const RESTART_STABLE: Duration = Duration::from_secs(30);
/// How long a stopped master may take to exit before its group is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often an adopted master (not our child, so not waitable) is looked up in /proc.
const ADOPTED_POLL: Duration = Duration::from_millis(500);
/// The web port Locust uses when `master.web_url` names none.
pub(super) const DEFAULT_WEB_PORT: u16 = 8089;

/// What the [`super::Master`] handle asks of the supervisor.
pub enum Cmd {
    /// Run on this spec directory (restarts only when the user classes changed or no master
    /// runs); answers the epoch to publish.
    Ensure {
        dir: PathBuf,
        reply: oneshot::Sender<Result<u64, MasterError>>,
    },
    /// Stop the master's process group and end.
    Stop { reply: oneshot::Sender<()> },
}

/// What to do about a spec the controller is about to publish.
#[derive(Debug, PartialEq, Eq)]
pub enum Ensure {
    /// A master runs with the same user classes: it takes the new spec's workers as it is.
    Keep,
    /// No master runs: start one.
    Start,
    /// The user classes changed: a master fixes them at start, so stop it and start another.
    Restart,
}

pub fn plan_ensure(running: bool, current: &BTreeSet<String>, wanted: &BTreeSet<String>) -> Ensure {
    match (running, current == wanted) {
        (true, true) => Ensure::Keep,
        (true, false) => Ensure::Restart,
        (false, _) => Ensure::Start,
    }
}

/// The master a previous controller recorded, if it still runs: adopted with its epoch, so
/// the running test and its workers carry on. A dead or reused pid means starting a new one.
pub fn adoptable(saved: Option<u32>, alive: impl Fn(u32) -> bool) -> Option<u32> {
    saved.filter(|p| alive(*p))
}

/// The delay before restarting a master that exited on its own.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            next: RESTART_INITIAL,
        }
    }
}

impl Backoff {
    /// After a master that ran for `ran` exited: a master that ran [`RESTART_STABLE`] starts
    /// the doubling over.
    pub fn after_exit(&mut self, ran: Duration) -> Duration {
        if ran >= RESTART_STABLE {
            self.next = RESTART_INITIAL;
        }
        self.retry()
    }

    /// After a restart that failed to start the process.
    pub fn retry(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(RESTART_MAX);
        d
    }
}

/// The master's arguments (after the `locust` program) for the spec in `dir`, with its CSV
/// files at `csv` (a path prefix).
pub fn master_args(
    cfg: &MasterConfig,
    locustfile: &str,
    dir: &Path,
    csv: &Path,
) -> Result<Vec<OsString>, MasterError> {
    let bad_url = || MasterError::WebUrl(cfg.web_url.clone());
    let uri: hyper::Uri = cfg.web_url.parse().map_err(|_| bad_url())?;
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(bad_url)?;
    let port = uri.port_u16().unwrap_or(DEFAULT_WEB_PORT).to_string();
    let base = uri.path().trim_end_matches('/');
    let mut a: Vec<OsString> = vec!["-f".into(), dir.join(locustfile).into()];
    let port_arg = cfg.port.to_string();
    for s in ["--master", "--master-bind-host", &cfg.bind_host] {
        a.push(s.into());
    }
    for s in [
        "--master-bind-port",
        &port_arg,
        "--web-host",
        host,
        "--web-port",
        &port,
    ] {
        a.push(s.into());
    }
    a.push("--enable-rebalancing".into());
    if !base.is_empty() {
        a.extend(["--web-base-path".into(), base.into()]);
    }
    // `fleet run` saves the full stats history, which Locust serves
    // (`/stats/requests_full_history/csv`) only with `--csv` and `--csv-full-history`
    // (docs/locust.md). The files sit in the master's workspace (confine.rs) and are rewritten
    // at each master start; the history grows by one row per request name per second while the
    // master runs.
    let csv_given = cfg
        .args
        .iter()
        .any(|a| a == "--csv" || a.starts_with("--csv="));
    if !csv_given {
        a.push("--csv".into());
        a.push(csv.into());
        a.push("--csv-full-history".into());
    }
    a.extend(cfg.args.iter().map(OsString::from));
    Ok(a)
}

/// Whether `pid` is a live Locust master (pids are reused: the command line must say so).
pub fn alive_master(pid: u32) -> bool {
    process::alive_as(pid, |args| args.iter().any(|a| a == "--master"))
}

/// Stops a master's process group: SIGTERM, up to [`STOP_GRACE`] for it to exit (our own
/// child is waited for, an adopted one watched in /proc), then SIGKILL to whatever is left.
async fn stop_group(p: u32, child: Option<&mut Child>) {
    match child {
        Some(c) => drop(process::stop_child(c, p, STOP_GRACE).await),
        None => process::stop_groups(&[p], STOP_GRACE, alive_master).await,
    }
}

/// Resolves when the master exits: our child is waited for, an adopted one polled in /proc.
async fn exited(child: Option<&mut Child>, pid: u32) -> String {
    match child {
        Some(c) => match c.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => e.to_string(),
        },
        None => loop {
            tokio::time::sleep(ADOPTED_POLL).await;
            if !alive_master(pid) {
                return "exited".to_string();
            }
        },
    }
}

/// The actor that owns the master process.
pub struct Supervisor {
    cfg: MasterConfig,
    locustfile: String,
    state_dir: PathBuf,
    /// Which shard this master is (0 for a fleet of one).
    index: u32,
    shared: Arc<Shared>,
    /// The epochs the controller publishes, one per shard (this one writes its own);
    /// dropped with the supervisors, so the publisher knows no restart will come any more.
    epoch_tx: Arc<watch::Sender<Vec<u64>>>,
    child: Option<Child>,
    pid: Option<u32>,
    started: Instant,
    backoff: Backoff,
    restart_at: Option<tokio::time::Instant>,
}

impl Supervisor {
    pub fn new(
        cfg: MasterConfig,
        locustfile: &str,
        state_dir: &Path,
        index: u32,
        shared: Arc<Shared>,
        epoch_tx: Arc<watch::Sender<Vec<u64>>>,
        adopted: Option<u32>,
    ) -> Supervisor {
        Supervisor {
            cfg,
            locustfile: locustfile.to_string(),
            state_dir: state_dir.to_path_buf(),
            index,
            shared,
            epoch_tx,
            child: None,
            pid: adopted,
            started: Instant::now(),
            backoff: Backoff::default(),
            restart_at: None,
        }
    }

    /// Serves commands and restarts the master until [`Cmd::Stop`] or every handle is gone.
    pub async fn run(mut self, mut cmds: mpsc::Receiver<Cmd>) {
        if let Some(p) = self.pid {
            log!(
                "adopting the running {} (pid {p}, epoch {})",
                self.label(),
                self.shared.proc.borrow().epoch
            );
            self.shared.proc.send_modify(|s| s.pid = Some(p));
        }
        loop {
            let dir = self.shared.proc.borrow().dir.clone();
            let restart_at = self.restart_at.filter(|_| dir.is_some());
            let pid = self.pid;
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    None => return,
                    Some(Cmd::Stop { reply }) => {
                        self.stop().await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(Cmd::Ensure { dir, reply }) => {
                        let _ = reply.send(self.ensure(dir).await);
                    }
                },
                status = exited(self.child.as_mut(), pid.unwrap_or(0)), if pid.is_some() => {
                    self.on_exit(&status);
                }
                _ = tokio::time::sleep_until(restart_at.unwrap_or_else(tokio::time::Instant::now)),
                    if restart_at.is_some() =>
                {
                    self.restart(dir.as_deref().expect("guarded by restart_at"));
                }
            }
        }
    }

    async fn ensure(&mut self, dir: PathBuf) -> Result<u64, MasterError> {
        let classes = user_classes(&dir);
        let plan = plan_ensure(
            self.pid.is_some(),
            &self.shared.proc.borrow().classes,
            &classes,
        );
        self.shared.proc.send_modify(|s| s.dir = Some(dir.clone()));
        match plan {
            Ensure::Keep => {
                self.shared.save();
                return Ok(self.shared.proc.borrow().epoch);
            }
            Ensure::Restart => {
                log!(
                    "user classes changed ({classes:?}): restarting the {}",
                    self.label()
                );
                self.stop().await;
                self.shared.proc.send_modify(|s| s.restarts += 1);
            }
            Ensure::Start => {}
        }
        let child = self.spawn(&dir)?;
        let epoch = self.launched(child, false, Some(classes));
        self.restart_at = None;
        log!(
            "{} started (pid {}, epoch {epoch})",
            self.label(),
            self.pid.unwrap_or(0)
        );
        Ok(epoch)
    }

    fn on_exit(&mut self, status: &str) {
        if let Some(p) = self.pid.take() {
            signal_group(p, Signal::SIGKILL);
        }
        self.child = None;
        self.shared.proc.send_modify(|s| s.pid = None);
        self.shared.save();
        let delay = self.backoff.after_exit(self.started.elapsed());
        log!(
            "{} exited ({status}); restarting in {delay:?}",
            self.label()
        );
        self.restart_at = Some(tokio::time::Instant::now() + delay);
    }

    fn restart(&mut self, dir: &Path) {
        self.restart_at = None;
        match self.spawn(dir) {
            Ok(child) => {
                let epoch = self.launched(child, true, None);
                log!(
                    "{} restarted (pid {}, epoch {epoch})",
                    self.label(),
                    self.pid.unwrap_or(0)
                );
            }
            Err(e) => {
                let delay = self.backoff.retry();
                log!("{e}; trying again in {delay:?}");
                self.restart_at = Some(tokio::time::Instant::now() + delay);
            }
        }
    }

    /// Takes over a freshly started master: a new epoch, recorded and published.
    fn launched(&mut self, child: Child, restart: bool, classes: Option<BTreeSet<String>>) -> u64 {
        let pid = child.id();
        self.pid = pid;
        self.child = Some(child);
        self.started = Instant::now();
        let mut epoch = 0;
        self.shared.proc.send_modify(|s| {
            s.epoch += 1;
            s.pid = pid;
            s.restarts += u64::from(restart);
            if let Some(c) = classes {
                s.classes = c;
            }
            epoch = s.epoch;
        });
        self.shared.save();
        let i = self.index as usize;
        self.epoch_tx.send_modify(|v| {
            // A shard added while serving has no epoch listed until its first start.
            if v.len() <= i {
                v.resize(i + 1, 0);
            }
            v[i] = epoch;
        });
        epoch
    }

    async fn stop(&mut self) {
        if let Some(p) = self.pid.take() {
            log!("stopping the {} (pid {p})", self.label());
            stop_group(p, self.child.as_mut()).await;
        }
        self.child = None;
        self.shared.proc.send_modify(|s| s.pid = None);
        self.shared.save();
    }

    /// "Locust master", or "Locust master N" for shard N > 0, in log lines.
    fn label(&self) -> String {
        match self.index {
            0 => "Locust master".to_string(),
            k => format!("Locust master {k}"),
        }
    }

    fn spawn(&self, dir: &Path) -> Result<Child, MasterError> {
        let log_path = self
            .state_dir
            .join(super::shard_file(self.index, "master", "log"));
        let log_err = |source| MasterError::Log {
            path: log_path.clone(),
            source,
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(log_err)?;
        let stderr = log.try_clone().map_err(log_err)?;
        let not_found = || MasterError::Spawn {
            locust: self.cfg.locust.clone(),
            source: std::io::ErrorKind::NotFound.into(),
        };
        let path_var = std::env::var_os("PATH");
        let locust = confine::which(&self.cfg.locust, path_var.as_ref()).ok_or_else(not_found)?;
        let (decision, user) =
            confine::who(self.cfg.confine, &self.cfg.user, confine::Powers::current())?;
        let fleet_dir = self.state_dir.parent().unwrap_or(&self.state_dir);
        let mut workspace = confine::Workspace::for_fleet(fleet_dir);
        if self.index > 0 {
            // Each shard its own workspace: a start empties its scratch and CSV directories.
            let mut root = workspace.root.into_os_string();
            root.push(format!("-{}", self.index));
            workspace.root = root.into();
        }
        let ws = workspace.prepare(dir, user)?;
        let inputs = confine::Inputs {
            decision,
            user: &self.cfg.user,
            fleet_dir,
            locust: &locust,
            workspace: &workspace,
        };
        let mut args = master_args(&self.cfg, &self.locustfile, &ws.spec, &ws.csv)?;
        plugin::add_to_args(&mut args, &plugin::install(&workspace.root)?)?;
        let mut cmd = confine::command(&confine::plan(&inputs, user)?, &locust)?;
        cmd.args(args);
        cmd.current_dir(&ws.spec)
            .env_clear()
            .envs(child_env::inherited(
                std::env::vars_os(),
                &self.cfg.env_allow,
            ))
            .env("HOME", &ws.home)
            .env("TMPDIR", &ws.tmp)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| MasterError::Spawn {
                locust: self.cfg.locust.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_running_master_is_kept_unless_the_user_classes_changed() {
        let web = set(&["Web"]);
        assert_eq!(plan_ensure(true, &web, &set(&["Web"])), Ensure::Keep);
        assert_eq!(
            plan_ensure(true, &web, &set(&["Web", "Api"])),
            Ensure::Restart
        );
        assert_eq!(plan_ensure(false, &web, &set(&["Web"])), Ensure::Start);
        // An adopted master carries the classes recorded with it: same spec, same master.
        assert_eq!(plan_ensure(true, &set(&[]), &set(&[])), Ensure::Keep);
    }

    #[test]
    fn a_recorded_master_is_adopted_only_while_it_is_alive() {
        assert_eq!(adoptable(Some(42), |p| p == 42), Some(42));
        assert_eq!(adoptable(Some(42), |_| false), None);
        assert_eq!(adoptable(None, |_| true), None);
        // This test process is alive but no Locust master: a reused pid is not adopted.
        assert!(!alive_master(std::process::id()));
    }

    #[test]
    fn restart_delays_double_up_to_the_cap_and_start_over_after_a_stable_run() {
        let mut b = Backoff::default();
        let quick = Duration::from_secs(2);
        let got: Vec<u64> = (0..7).map(|_| b.after_exit(quick).as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(b.after_exit(RESTART_STABLE), RESTART_INITIAL);
        assert_eq!(
            b.retry(),
            Duration::from_secs(2),
            "a failed start doubles on"
        );
    }

    fn args(cfg: &MasterConfig) -> Vec<String> {
        master_args(
            cfg,
            "locustfile.py",
            Path::new("/spec"),
            Path::new("/ws/csv/run"),
        )
        .unwrap()
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect()
    }

    fn config(web_url: &str, extra: &[&str]) -> MasterConfig {
        MasterConfig {
            web_url: web_url.into(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            ..MasterConfig::default()
        }
    }

    #[test]
    fn the_master_command_line_follows_the_web_url_and_keeps_the_stats_history() {
        let cfg = config("http://127.0.0.1:8090/locust/", &["--loglevel", "DEBUG"]);
        let want = format!(
            "-f /spec/locustfile.py --master --master-bind-host {} --master-bind-port {} \
             --web-host 127.0.0.1 --web-port 8090 --enable-rebalancing --web-base-path /locust \
             --csv /ws/csv/run --csv-full-history --loglevel DEBUG",
            cfg.bind_host, cfg.port
        );
        assert_eq!(args(&cfg).join(" "), want);
    }

    #[test]
    fn a_web_url_without_port_or_path_uses_locusts_defaults_and_csv_given_is_kept() {
        let a = args(&config("http://localhost", &["--csv=/tmp/x"])).join(" ");
        assert!(
            a.contains("--web-host localhost --web-port 8089 --enable-rebalancing --csv=/tmp/x"),
            "{a}"
        );
        assert!(
            !a.contains("--web-base-path") && !a.contains("--csv-full-history"),
            "{a}"
        );
    }

    #[test]
    fn a_web_url_that_names_no_host_is_refused_with_the_setting_to_fix() {
        for bad in ["", "not a url", "/locust"] {
            let e = master_args(&config(bad, &[]), "l.py", Path::new("/s"), Path::new("/t"));
            let e = e.unwrap_err().to_string();
            assert!(
                e.contains("master.web_url") && e.contains("fleet.toml"),
                "{e}"
            );
        }
    }
}
