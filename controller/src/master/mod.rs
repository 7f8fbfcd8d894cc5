//! The Locust master: run it, supervise it, and keep a running test going across restarts.
//!
//! Four rooms: `classes` scans a spec for its user classes, `api` talks to the master's web
//! API, `supervisor` owns the master process (start, adopt, restart, stop) and `keeper`
//! keeps the operator's test running through Locust's own stops. The facts they build on are
//! in docs/locust.md; how they fit together in docs/architecture.md.
//!
//! [`Master`] is the handle the rest of the controller holds. It owns two tasks, the supervisor
//! (only for a managed master) and the keeper; [`Master::join`] reports one that ends before
//! [`Master::stop`] asked it to.
//!
//! State has one writer per part: the supervisor writes the process state ([`Proc`]), the
//! keeper Locust's numbers, and the recorded test ([`Desired`]) is written by the operator's
//! calls and the keeper's decisions. Each is a `watch` channel; `state/master.json` holds what
//! survives a controller restart, so the next `fleet serve` adopts a master that is still
//! running (same epoch, the test keeps running) instead of starting a second one.

mod api;
mod classes;
pub mod confine;
mod keeper;
pub mod merge;
pub mod plugin;
mod supervisor;
pub mod view;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_common::wire::{MasterView, SwarmRequest};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{Id, JoinSet};

pub use api::{ApiError, LocustApi, Stats, CONNECT_TIMEOUT};
pub use classes::user_classes;
use keeper::Desired;
use supervisor::{Cmd, Supervisor};

use crate::config::MasterConfig;

/// Why the master could not be (kept) running. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("cannot start the Locust master ({locust}): {source}; run the setup or set master.locust in fleet.toml")]
    Spawn {
        locust: String,
        source: std::io::Error,
    },
    #[error("cannot open the Locust master's log {}: {source}", path.display())]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("master.web_url {0:?} is not an http://HOST:PORT/PATH URL; fix it in fleet.toml")]
    WebUrl(String),
    #[error("the Locust master's supervisor is not running; restart `fleet serve`")]
    NoSupervisor,
    #[error("the Locust master's {task} ended unexpectedly ({how}); restart `fleet serve`")]
    TaskEnded { task: &'static str, how: String },
    #[error("cannot confine the Locust master: {0}")]
    Confine(String),
}

/// `master.env_allow`, checked as `fleet.toml` is read.
pub fn env_allow<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    fleet_common::child_env::check_allow("master.env_allow", &v)
        .map_err(serde::de::Error::custom)?;
    Ok(v)
}

/// The master process as the supervisor last left it.
#[derive(Debug, Clone, Default)]
struct Proc {
    pid: Option<u32>,
    epoch: u64,
    restarts: u64,
    classes: BTreeSet<String>,
    dir: Option<PathBuf>,
}

/// What survives a controller restart (`state/master.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Saved {
    pid: Option<u32>,
    epoch: u64,
    classes: BTreeSet<String>,
    dir: Option<PathBuf>,
    swarm: Option<SwarmRequest>,
}

/// The state the handle, the supervisor and the keeper share.
struct Shared {
    /// Written by the supervisor only.
    proc: watch::Sender<Proc>,
    /// Written by the operator's calls and the keeper's decisions.
    desired: watch::Sender<Desired>,
    /// Locust's numbers from the keeper's last poll; `None` when the master did not answer.
    stats: watch::Sender<Option<Stats>>,
    state_file: PathBuf,
    /// Serialises saves, so the last one written read every change made before it.
    saving: Mutex<()>,
}

impl Shared {
    fn save(&self) {
        let _one = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        let p = self.proc.borrow().clone();
        let saved = Saved {
            pid: p.pid,
            epoch: p.epoch,
            classes: p.classes,
            dir: p.dir,
            swarm: self.desired.borrow().swarm,
        };
        let tmp = self.state_file.with_extension("tmp");
        if std::fs::write(&tmp, serde_json::to_vec(&saved).expect("serialises")).is_ok() {
            let _ = std::fs::rename(&tmp, &self.state_file);
        }
    }
}

/// The master's long-running tasks, each named for the report when one ends.
struct Tasks {
    set: tokio::sync::Mutex<JoinSet<()>>,
    names: HashMap<Id, &'static str>,
    /// Turned true by [`Master::stop`]: tasks ending after that are expected.
    stopping: watch::Sender<bool>,
}

/// A handle on the supervised master.
#[derive(Clone)]
pub struct Master {
    cfg: MasterConfig,
    shared: Arc<Shared>,
    cmds: mpsc::Sender<Cmd>,
    epoch_rx: watch::Receiver<u64>,
    tasks: Arc<Tasks>,
    pub api: LocustApi,
}

impl Master {
    /// How long the `/locust/` proxy waits for the web UI's answer (`master.proxy_timeout_s`).
    pub fn proxy_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.cfg.proxy_timeout_s.max(1))
    }

    /// Starts the supervisor (for a managed master) and the keeper. `state_dir` keeps
    /// `master.json` and `master.log`. Call within a Tokio runtime.
    pub fn start(cfg: MasterConfig, locustfile: &str, state_dir: &Path) -> Master {
        let state_file = state_dir.join("master.json");
        let saved: Saved = std::fs::read(&state_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let shared = Arc::new(Shared {
            proc: watch::Sender::new(Proc {
                pid: None,
                epoch: saved.epoch,
                restarts: 0,
                classes: saved.classes,
                dir: saved.dir,
            }),
            desired: watch::Sender::new(Desired {
                swarm: saved.swarm,
                ..Desired::default()
            }),
            stats: watch::Sender::new(None),
            state_file,
            saving: Mutex::new(()),
        });
        let api = LocustApi::new(&cfg.web_url);
        let (cmds, rx) = mpsc::channel(8);
        let (epoch_tx, epoch_rx) = watch::channel(saved.epoch);
        let (stopping, stopping_rx) = watch::channel(false);
        let mut set = JoinSet::new();
        let mut names = HashMap::new();
        if cfg.managed {
            let adopted = supervisor::adoptable(saved.pid, supervisor::alive_master);
            let sup = Supervisor::new(
                cfg.clone(),
                locustfile,
                state_dir,
                shared.clone(),
                epoch_tx,
                adopted,
            );
            names.insert(set.spawn(sup.run(rx)).id(), "supervisor");
        } else {
            // An external master: nothing to supervise. Dropping the epoch's sender tells the
            // publisher no restart will come; the epoch stays 0 unless the operator restarts
            // that master and tells agents with `fleet serve` restarted.
            drop((rx, epoch_tx));
        }
        let keeper = keeper::run(shared.clone(), api.clone(), stopping_rx);
        names.insert(set.spawn(keeper).id(), "swarm keeper");
        let tasks = Arc::new(Tasks {
            set: tokio::sync::Mutex::new(set),
            names,
            stopping,
        });
        Master {
            cfg,
            shared,
            cmds,
            epoch_rx,
            tasks,
            api,
        }
    }

    pub fn managed(&self) -> bool {
        self.cfg.managed
    }

    /// The epoch to publish; it changes at every master (re)start. For an external master
    /// its sender is gone: `changed()` fails at once.
    pub fn epoch(&self) -> watch::Receiver<u64> {
        self.epoch_rx.clone()
    }

    /// Makes sure a master runs on `dir`'s user classes; returns the epoch to publish.
    pub async fn ensure(&self, dir: PathBuf) -> Result<u64, MasterError> {
        if !self.cfg.managed {
            return Ok(*self.epoch_rx.borrow());
        }
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Ensure { dir, reply })
            .await
            .map_err(|_| MasterError::NoSupervisor)?;
        rx.await.map_err(|_| MasterError::NoSupervisor)?
    }

    /// Stops the managed master's process group and both tasks; returns once they ended.
    pub async fn stop(&self) {
        self.tasks.stopping.send_replace(true);
        let (reply, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Stop { reply }).await.is_ok() {
            let _ = rx.await;
        }
        if let Err(e) = self.join().await {
            log!("{e}");
        }
    }

    /// Resolves when the master's tasks have ended: `Ok` once they all ended after
    /// [`Master::stop`], an error as soon as one ends (returns or panics) before it. Meant to be
    /// selected on next to the daemon's other tasks; cancel-safe, and a later call goes on
    /// with the tasks that are left.
    pub async fn join(&self) -> Result<(), MasterError> {
        let mut set = self.tasks.set.lock().await;
        while let Some(ended) = set.join_next_with_id().await {
            if *self.tasks.stopping.borrow() {
                continue;
            }
            let (id, how) = match ended {
                Ok((id, ())) => (id, "returned".to_string()),
                Err(e) if e.is_panic() => (e.id(), "panicked".to_string()),
                Err(e) => (e.id(), e.to_string()),
            };
            let task = self.tasks.names.get(&id).copied().unwrap_or("task");
            return Err(MasterError::TaskEnded { task, how });
        }
        Ok(())
    }

    pub fn view(&self) -> MasterView {
        let p = self.shared.proc.borrow();
        MasterView {
            managed: self.cfg.managed,
            pid: p.pid,
            epoch: p.epoch,
            restarts: p.restarts,
            user_classes: p.classes.iter().cloned().collect(),
            web_url: self.cfg.web_url.clone(),
            swarm: self.shared.desired.borrow().swarm,
        }
    }

    /// Locust's numbers from the keeper's last poll (once a second).
    pub fn stats(&self) -> Option<Stats> {
        self.shared.stats.borrow().clone()
    }

    /// The web APIs of the masters that carry the test: the one master today. Everything
    /// that shows the test's numbers reads them through [`Master::merged_stats`], so this is
    /// the one place that says which masters there are.
    pub fn shard_apis(&self) -> Vec<LocustApi> {
        vec![self.api.clone()]
    }

    /// The test's stats now: every master's snapshot merged exactly, or the only master's own
    /// `/stats/requests` when it has no stats plugin ([`view`]).
    pub async fn merged_stats(&self) -> Result<view::Current, view::ViewError> {
        view::read(&self.shard_apis()).await
    }

    /// The test's stats now as Locust's `stats.csv` ([`view::read_csv`]).
    pub async fn merged_stats_csv(&self) -> Result<String, view::ViewError> {
        view::read_csv(&self.shard_apis()).await
    }

    /// Records the test the operator started, so it is re-started after a master restart.
    pub fn set_swarm(&self, s: Option<SwarmRequest>) {
        self.set_swarm_until(s, None);
    }

    /// Like [`Master::set_swarm`] for a test that Locust ends by itself after `run_time`.
    pub fn set_swarm_until(&self, s: Option<SwarmRequest>, run_time: Option<Duration>) {
        self.shared
            .desired
            .send_replace(Desired::set(s, run_time, Instant::now()));
        self.shared.save();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A web URL nothing listens on: the keeper polls it and finds no master.
    fn nowhere() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/locust", l.local_addr().unwrap())
    }

    fn config(managed: bool, locust: &str) -> MasterConfig {
        MasterConfig {
            managed,
            locust: locust.into(),
            web_url: nowhere(),
            // These tests are about supervision; confinement has its own (confine.rs and
            // the `reach` end-to-end test).
            confine: false,
            ..MasterConfig::default()
        }
    }

    #[tokio::test]
    async fn a_task_that_ends_before_stop_is_reported_by_name() {
        let state = tempfile::tempdir().unwrap();
        let m = Master::start(config(false, "locust"), "locustfile.py", state.path());
        m.tasks.set.lock().await.abort_all();
        let e = tokio::time::timeout(Duration::from_secs(5), m.join())
            .await
            .expect("join resolves")
            .unwrap_err();
        assert!(
            matches!(
                e,
                MasterError::TaskEnded {
                    task: "swarm keeper",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().ends_with("restart `fleet serve`"), "{e}");
    }

    #[tokio::test]
    async fn after_stop_every_task_has_ended_and_join_is_ok() {
        let state = tempfile::tempdir().unwrap();
        let m = Master::start(config(true, "locust"), "locustfile.py", state.path());
        let joined = tokio::spawn({
            let m = m.clone();
            async move { m.join().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!joined.is_finished(), "join waits while the tasks run");
        tokio::time::timeout(Duration::from_secs(5), m.stop())
            .await
            .expect("stop returns");
        let r = tokio::time::timeout(Duration::from_secs(5), joined).await;
        assert!(r.expect("join resolves").unwrap().is_ok());
        assert!(m.tasks.set.lock().await.is_empty());
    }

    #[tokio::test]
    async fn a_locust_that_cannot_start_is_one_line_that_says_what_to_set() {
        let state = tempfile::tempdir().unwrap();
        let missing = state.path().join("no-locust");
        let m = Master::start(
            config(true, missing.to_str().unwrap()),
            "locustfile.py",
            state.path(),
        );
        let e = m.ensure(state.path().to_path_buf()).await.unwrap_err();
        assert!(matches!(e, MasterError::Spawn { .. }), "{e}");
        assert!(
            e.to_string().contains("set master.locust in fleet.toml"),
            "{e}"
        );
        assert_eq!(m.view().pid, None);
        m.stop().await;
    }

    #[tokio::test]
    async fn a_master_that_exits_is_restarted_with_a_new_epoch() {
        let state = tempfile::tempdir().unwrap();
        let fake = state.path().join("fake-locust");
        std::fs::write(&fake, "#!/bin/sh\nexit 3\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let m = Master::start(
            config(true, fake.to_str().unwrap()),
            "locustfile.py",
            state.path(),
        );
        let mut epochs = m.epoch();
        assert_eq!(m.ensure(state.path().to_path_buf()).await.unwrap(), 1);
        epochs.borrow_and_update();
        // It exits at once; the first restart comes after a second.
        tokio::time::timeout(Duration::from_secs(5), epochs.changed())
            .await
            .expect("restarted")
            .unwrap();
        assert_eq!(*epochs.borrow(), 2);
        assert!(m.view().restarts >= 1);
        m.stop().await;
        let saved: Saved =
            serde_json::from_slice(&std::fs::read(state.path().join("master.json")).unwrap())
                .unwrap();
        assert_eq!((saved.pid, saved.epoch >= 2), (None, true));
        assert!(
            m.join().await.is_ok(),
            "a stopped master's tasks ended as asked"
        );
    }
}
