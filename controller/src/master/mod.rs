//! The Locust master: run it, supervise it, and keep a running test going across restarts.
//!
//! Four rooms: `classes` scans a spec for its user classes, `api` talks to the master's web
//! API, `supervisor` owns the master process (start, adopt, restart, stop) and `keeper`
//! keeps the operator's test running through Locust's own stops. The facts they build on are
//! in docs/locust.md; how they fit together in docs/architecture.md.
//!
//! [`Master`] is the handle the rest of the controller holds. It owns two tasks per shard, the
//! supervisor (only for a managed master) and the keeper, and with shards the balancer;
//! [`Master::join`] reports one that ends before [`Master::stop`] asked it to. With
//! `master.shards = "auto"`, [`Master::grow`] appends shards while the controller runs; the
//! list only grows, so a reader takes it as it is now ([`Master::all`]) and goes on with that.
//!
//! State has one writer per part: the supervisor writes the process state ([`Proc`]), the
//! keeper Locust's numbers, and the recorded test ([`Desired`]) is written by the operator's
//! calls and the keeper's decisions. Each is a `watch` channel; `state/master.json` holds what
//! survives a controller restart, so the next `fleet serve` adopts a master that is still
//! running (same epoch, the test keeps running) instead of starting a second one.

mod api;
mod balance;
pub mod capacity;
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

use fleet_common::manifest::ShardAddr;
use fleet_common::wire::{MasterView, ShardView, SwarmRequest};
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
    #[error("shard {shard}'s ports would pass 65535; lower master.port, the web_url's port or master.shards in fleet.toml")]
    ShardPorts { shard: u32 },
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

/// The master's long-running tasks, each named for the report when one ends. Tasks are added
/// while [`Master::join`] waits on the set (a grown shard's), so neither holds the lock across
/// an await.
struct Tasks {
    set: Mutex<JoinSet<()>>,
    names: Mutex<HashMap<Id, &'static str>>,
    /// Turned true by [`Master::stop`]: tasks ending after that are expected.
    stopping: watch::Sender<bool>,
}

impl Tasks {
    fn spawn(
        &self,
        name: &'static str,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let mut set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        // Named before the set lock is let go: `join` sees the task's end only under it.
        let id = set.spawn(task).id();
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, name);
    }

    fn name(&self, id: Id) -> &'static str {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        names.get(&id).copied().unwrap_or("task")
    }
}

/// One master of the fleet (a shard): its ports, its state, its supervisor's commands.
#[derive(Clone)]
struct Shard {
    index: u32,
    cfg: MasterConfig,
    shared: Arc<Shared>,
    cmds: mpsc::Sender<Cmd>,
    /// The supervisor's end, until it is spawned ([`Shard::take_cmds`]).
    cmds_rx: Arc<Mutex<Option<mpsc::Receiver<Cmd>>>>,
    api: LocustApi,
}

/// A state or log file of shard `index`: `master.json` for shard 0 (as before shards),
/// `master-2.json` for shard 2.
pub(crate) fn shard_file(index: u32, stem: &str, ext: &str) -> String {
    match index {
        0 => format!("{stem}.{ext}"),
        k => format!("{stem}-{k}.{ext}"),
    }
}

/// The expected worker count, kept for the next start's `shards = "auto"`.
const EXPECTED_FILE: &str = "master-expected.json";

/// How many masters to start: `master.shards`, or for `"auto"` enough for the workers
/// expected when the controller last ran (`state/master-expected.json`).
pub fn shards_to_start(cfg: &MasterConfig, state_dir: &Path) -> u32 {
    let expected = std::fs::read_to_string(state_dir.join(EXPECTED_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    capacity::shard_count(cfg.shards, expected, cfg.capacity)
}

/// The test over all shards as the operator recorded it (`state/master-test.json`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Total {
    swarm: Option<SwarmRequest>,
    /// When its `run_time` ends (not saved: each shard's own record ends its share too).
    #[serde(skip)]
    until: Option<Instant>,
}

/// A handle on the supervised masters (one, or one per shard).
#[derive(Clone)]
pub struct Master {
    cfg: MasterConfig,
    /// In shard order; only [`Master::grow`] changes it, by appending.
    shards: Arc<watch::Sender<Arc<Vec<Shard>>>>,
    /// The most shards whose ports fit (1 for an external master).
    max_shards: u32,
    locustfile: String,
    state_dir: PathBuf,
    /// The spec directory the masters were last asked to run, for a shard started later.
    last_dir: Arc<Mutex<Option<PathBuf>>>,
    /// The epochs' sender, kept for shards started later (managed masters only).
    epoch_tx: Option<Arc<watch::Sender<Vec<u64>>>>,
    /// One [`Master::grow`] at a time, and none once [`Master::stop`] began.
    growing: Arc<tokio::sync::Mutex<()>>,
    /// The operator's test over all shards; each shard's keeper keeps its share.
    total: Arc<watch::Sender<Total>>,
    total_file: PathBuf,
    /// Workers per node of the configured backend, and the last expected worker count.
    per_node: Arc<watch::Sender<Option<u32>>>,
    expected: Arc<watch::Sender<u64>>,
    expected_file: PathBuf,
    epoch_rx: watch::Receiver<Vec<u64>>,
    tasks: Arc<Tasks>,
    /// Shard 0's web API (the only one of a fleet of one master).
    pub api: LocustApi,
}

impl Master {
    /// How long the `/locust/` proxy waits for the web UI's answer (`master.proxy_timeout_s`).
    pub fn proxy_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.cfg.proxy_timeout_s.max(1))
    }

    /// Starts one master per shard (`count`; an external master is always one): for a
    /// managed master its supervisor, and for each its keeper. `state_dir` keeps
    /// `master.json` and `master.log` (shard k > 0: `master-k.json`, `master-k.log`).
    /// Call within a Tokio runtime.
    pub fn start(cfg: MasterConfig, locustfile: &str, state_dir: &Path) -> Master {
        Master::start_shards(cfg, locustfile, state_dir, 1)
    }

    /// [`Master::start`] with `count` shards (docs/architecture-master.md, "Shards").
    pub fn start_shards(
        cfg: MasterConfig,
        locustfile: &str,
        state_dir: &Path,
        count: u32,
    ) -> Master {
        let max_shards = if cfg.managed { max_shards(&cfg) } else { 1 };
        if count > max_shards {
            // Ports past 65535: run the shards that fit, and say so.
            if let Err(e) = shard_config(&cfg, max_shards) {
                log!("{e}");
            }
        }
        let count = count.clamp(1, max_shards);
        let (stopping, stopping_rx) = watch::channel(false);
        let tasks = Arc::new(Tasks {
            set: Mutex::new(JoinSet::new()),
            names: Mutex::new(HashMap::new()),
            stopping,
        });
        let mut shards = vec![];
        let mut epochs = vec![];
        let mut pending = vec![];
        for index in 0..count {
            let scfg = shard_config(&cfg, index).expect("within max_shards");
            let (shard, saved) = Shard::open(index, scfg, state_dir, false);
            epochs.push(saved.epoch);
            pending.push((shard.clone(), saved.pid));
            shards.push(shard);
        }
        let last_dir = shards[0].shared.proc.borrow().dir.clone();
        let (epoch_tx, epoch_rx) = watch::channel(epochs);
        let epoch_tx = Arc::new(epoch_tx);
        let total_file = state_dir.join("master-test.json");
        let total: Total = std::fs::read(&total_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let api = shards[0].api.clone();
        let master = Master {
            shards: Arc::new(watch::Sender::new(Arc::new(shards))),
            max_shards,
            locustfile: locustfile.to_string(),
            state_dir: state_dir.to_path_buf(),
            last_dir: Arc::new(Mutex::new(last_dir)),
            // An external master: nothing to supervise. Dropping the epochs' sender tells the
            // publisher no restart will come; the epoch stays 0 unless the operator restarts
            // that master and tells agents with `fleet serve` restarted.
            epoch_tx: cfg.managed.then_some(epoch_tx),
            growing: Arc::new(tokio::sync::Mutex::new(())),
            cfg,
            total: Arc::new(watch::Sender::new(total)),
            total_file,
            per_node: Arc::new(watch::Sender::new(None)),
            expected: Arc::new(watch::Sender::new(0)),
            expected_file: state_dir.join(EXPECTED_FILE),
            epoch_rx,
            tasks,
            api,
        };
        for (shard, pid) in pending {
            master.run_shard(&shard, pid);
        }
        if count > 1 {
            master.run_balancer(stopping_rx);
        }
        master
    }

    /// Spawns shard `shard`'s keeper and, for a managed master, its supervisor (adopting the
    /// master at `pid` if it still runs).
    fn run_shard(&self, shard: &Shard, pid: Option<u32>) {
        let stopping = self.tasks.stopping.subscribe();
        let keeper = keeper::run(shard.shared.clone(), shard.api.clone(), stopping);
        self.tasks.spawn("swarm keeper", keeper);
        // An external master has no supervisor: its end of the commands is dropped, so a
        // command to it fails at once instead of waiting for an answer.
        let rx = shard.take_cmds();
        let (Some(epoch_tx), Some(rx)) = (&self.epoch_tx, rx) else {
            return;
        };
        let sup = Supervisor::new(
            shard.cfg.clone(),
            &self.locustfile,
            &self.state_dir,
            shard.index,
            shard.shared.clone(),
            epoch_tx.clone(),
            supervisor::adoptable(pid, supervisor::alive_master),
        );
        self.tasks.spawn("supervisor", sup.run(rx));
    }

    fn run_balancer(&self, stopping: watch::Receiver<bool>) {
        let bal = balance::run(self.shards.subscribe(), self.total.clone(), stopping);
        self.tasks.spawn("shard balancer", bal);
    }

    /// The shards as they are now (shard 0 first). The list only grows; a reader that holds
    /// this one while a shard is added goes on with the shards it had.
    fn all(&self) -> Arc<Vec<Shard>> {
        self.shards.borrow().clone()
    }

    /// The masters `master.shards` wants for the workers expected now ([`capacity::grow_to`];
    /// only `"auto"` ever adds one): the nodes the backend lists (`listed_nodes`) times the
    /// workers per node, or the workers connected, whichever is more. Each new shard k gets
    /// its supervisor and keeper as at the start, runs the spec the others run, and is
    /// published in the manifest with its first epoch; a test that runs is split again over
    /// every shard by the balancer (started here when the fleet had one master). Never stops
    /// a shard. Returns how many masters run.
    pub async fn grow(&self, listed_nodes: usize) -> usize {
        let _one = self.growing.lock().await;
        let expected = self.expected_now(listed_nodes);
        let running = self.shard_count() as u32;
        let to = capacity::grow_to(
            self.cfg.shards,
            running,
            expected,
            self.cfg.capacity,
            self.max_shards,
        );
        for k in running..to {
            if *self.tasks.stopping.borrow() {
                break;
            }
            log!(
                "starting shard {k}: {expected} workers expected, capacity {} per master",
                self.cfg.capacity
            );
            if let Err(e) = self.start_shard(k).await {
                log!("{e}");
                break;
            }
        }
        self.shard_count()
    }

    /// Adds shard `k` (the next index) and starts its master on the spec the others run.
    async fn start_shard(&self, k: u32) -> Result<(), MasterError> {
        let scfg = shard_config(&self.cfg, k)?;
        // A shard that ran before (a larger fleet, an earlier run) keeps counting its epochs
        // up; the test it recorded then is not this one: the balancer gives it its share.
        let (shard, saved) = Shard::open(k, scfg, &self.state_dir, true);
        self.run_shard(&shard, saved.pid);
        let from_one = k == 1;
        if from_one {
            // The test of the one master so far is the test over all shards from now on.
            let d = *self.all()[0].shared.desired.borrow();
            self.total.send_replace(Total {
                swarm: d.swarm,
                until: d.until,
            });
            self.save_total();
        }
        self.shards.send_modify(|all| {
            let mut grown = Vec::clone(all);
            grown.push(shard.clone());
            *all = Arc::new(grown);
        });
        if from_one {
            self.run_balancer(self.tasks.stopping.subscribe());
        }
        // Read after the shard joined the list: an `ensure` that began before sets the
        // directory first, one that begins after reaches this shard too.
        let dir = self
            .last_dir
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(dir) = dir else {
            // Nothing published yet: the first publication starts it with the others.
            return Ok(());
        };
        let (reply, rx) = oneshot::channel();
        shard
            .cmds
            .send(Cmd::Ensure { dir, reply })
            .await
            .map_err(|_| MasterError::NoSupervisor)?;
        // The supervisor publishes the new master's epoch; the steward then republishes the
        // manifest with the longer list of masters.
        rx.await.map_err(|_| MasterError::NoSupervisor)?.map(drop)
    }

    pub fn managed(&self) -> bool {
        self.cfg.managed
    }

    /// How many masters run.
    pub fn shard_count(&self) -> usize {
        self.shards.borrow().len()
    }

    /// Shard `k`'s web API (`/locust/<k>/` proxies it).
    pub fn shard_api(&self, k: usize) -> Option<LocustApi> {
        self.shards.borrow().get(k).map(|s| s.api.clone())
    }

    /// Where each shard's workers connect, as the manifest lists them (empty for one master:
    /// the manifest then carries `master` alone, as before shards). A shard whose master has
    /// not started yet (no epoch) is not listed: no worker is sent to a port nothing binds.
    pub fn masters(&self, epochs: &[u64]) -> Vec<ShardAddr> {
        let all = self.all();
        let listed = all.len().min(epochs.len().max(1));
        if listed < 2 {
            return vec![];
        }
        all[..listed]
            .iter()
            .map(|s| ShardAddr {
                host: s.cfg.host.clone(),
                port: s.cfg.port,
                epoch: epochs.get(s.index as usize).copied().unwrap_or(0),
            })
            .collect()
    }

    /// The epochs to publish, one per shard; each changes at its master's (re)start. For an
    /// external master the sender is gone: `changed()` fails at once.
    pub fn epoch(&self) -> watch::Receiver<Vec<u64>> {
        self.epoch_rx.clone()
    }

    /// Makes sure every shard's master runs on `dir`'s user classes (a change of them restarts
    /// each); returns the epochs to publish.
    pub async fn ensure(&self, dir: PathBuf) -> Result<Vec<u64>, MasterError> {
        if !self.cfg.managed {
            return Ok(self.epoch_rx.borrow().clone());
        }
        // Before the list is read: a shard added meanwhile reads this directory after joining.
        *self.last_dir.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir.clone());
        let mut replies = vec![];
        for s in self.all().iter() {
            let (reply, rx) = oneshot::channel();
            s.cmds
                .send(Cmd::Ensure {
                    dir: dir.clone(),
                    reply,
                })
                .await
                .map_err(|_| MasterError::NoSupervisor)?;
            replies.push(rx);
        }
        let mut epochs = vec![];
        for rx in replies {
            epochs.push(rx.await.map_err(|_| MasterError::NoSupervisor)??);
        }
        Ok(epochs)
    }

    /// Stops every managed master's process group and the tasks; returns once they ended.
    pub async fn stop(&self) {
        self.tasks.stopping.send_replace(true);
        // A shard being added finishes joining the list first, so it is stopped too.
        let _no_more = self.growing.lock().await;
        let mut replies = vec![];
        for s in self.all().iter() {
            let (reply, rx) = oneshot::channel();
            if s.cmds.send(Cmd::Stop { reply }).await.is_ok() {
                replies.push(rx);
            }
        }
        for rx in replies {
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
        // The set is locked for each poll only, so a shard added meanwhile adds its tasks.
        let next = || {
            std::future::poll_fn(|cx| {
                let mut set = self.tasks.set.lock().unwrap_or_else(|e| e.into_inner());
                set.poll_join_next_with_id(cx)
            })
        };
        while let Some(ended) = next().await {
            if *self.tasks.stopping.borrow() {
                continue;
            }
            let (id, how) = match ended {
                Ok((id, ())) => (id, "returned".to_string()),
                Err(e) if e.is_panic() => (e.id(), "panicked".to_string()),
                Err(e) => (e.id(), e.to_string()),
            };
            let task = self.tasks.name(id);
            return Err(MasterError::TaskEnded { task, how });
        }
        Ok(())
    }

    /// Shard 0 as before shards, with every shard listed and the test over all of them.
    pub fn view(&self) -> MasterView {
        let all = self.all();
        let s0 = &all[0];
        let p = s0.shared.proc.borrow().clone();
        let sharded = all.len() > 1;
        MasterView {
            managed: self.cfg.managed,
            pid: p.pid,
            epoch: p.epoch,
            restarts: p.restarts,
            user_classes: p.classes.iter().cloned().collect(),
            web_url: self.cfg.web_url.clone(),
            swarm: if sharded {
                self.total.borrow().swarm
            } else {
                s0.shared.desired.borrow().swarm
            },
            shards: all.iter().map(Shard::view).collect(),
            capacity_warning: None,
        }
    }

    /// Locust's numbers from the keepers' last polls (once a second): shard 0's for one
    /// master; for shards, their users, workers and RPS summed (`None` until every shard
    /// answered).
    pub fn stats(&self) -> Option<Stats> {
        let all: Option<Vec<Stats>> = self
            .all()
            .iter()
            .map(|s| s.shared.stats.borrow().clone())
            .collect();
        all.map(|v| balance::sum_stats(&v))
    }

    /// Each shard's numbers from its keeper's last poll.
    pub fn shard_stats(&self) -> Vec<Option<Stats>> {
        self.all()
            .iter()
            .map(|s| s.shared.stats.borrow().clone())
            .collect()
    }

    /// The web APIs of the masters that carry the test, one per shard in shard order. Everything
    /// that shows the test's numbers reads them through [`Master::merged_stats`], so this is
    /// the one place that says which masters there are.
    pub fn shard_apis(&self) -> Vec<LocustApi> {
        self.all().iter().map(|s| s.api.clone()).collect()
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
    /// With shards, each records its share by its connected workers.
    pub fn set_swarm_until(&self, s: Option<SwarmRequest>, run_time: Option<Duration>) {
        let now = Instant::now();
        let all = self.all();
        let shares = self.shares(&all, s);
        for (shard, share) in all.iter().zip(shares) {
            shard
                .shared
                .desired
                .send_replace(Desired::set(share, run_time, now));
            shard.shared.save();
        }
        if all.len() > 1 {
            self.total.send_replace(Total {
                swarm: s,
                until: run_time.map(|d| now + d),
            });
            self.save_total();
        }
    }

    fn save_total(&self) {
        let bytes = serde_json::to_vec(&*self.total.borrow()).expect("serialises");
        let _ = std::fs::write(&self.total_file, bytes);
    }

    /// `s` split over `all` by their connected workers at the last poll.
    fn shares(&self, all: &[Shard], s: Option<SwarmRequest>) -> Vec<Option<SwarmRequest>> {
        let workers: Vec<u64> = all
            .iter()
            .map(|sh| {
                sh.shared
                    .stats
                    .borrow()
                    .as_ref()
                    .map_or(0, |st| st.worker_count)
            })
            .collect();
        match s {
            Some(s) => balance::split(&s, &workers),
            None => vec![None; all.len()],
        }
    }

    /// Starts (or resizes) the test on every shard with its share, then records it.
    pub async fn swarm(&self, s: &SwarmRequest) -> Result<(), ApiError> {
        let all = self.all();
        let shares = self.shares(&all, Some(*s));
        let many = all.len() > 1;
        let done = each_shard(&all, |k, api| {
            let share = shares[k];
            async move {
                match share {
                    Some(share) => api.swarm(&share).await,
                    None if many => api.stop().await,
                    None => Ok(()),
                }
            }
        })
        .await;
        done.into_iter().collect::<Result<Vec<()>, _>>()?;
        self.set_swarm(Some(*s));
        Ok(())
    }

    /// Forgets the recorded test, then stops it on every shard (at once); the first shard's
    /// error, once every shard was asked.
    pub async fn stop_test(&self) -> Result<(), ApiError> {
        self.set_swarm(None);
        let done = each_shard(&self.all(), |_, api| async move { api.stop().await }).await;
        done.into_iter().collect::<Result<Vec<()>, _>>()?;
        Ok(())
    }

    /// The workers per node the configured backend runs, for the capacity check.
    pub fn set_per_node(&self, per_node: Option<u32>) {
        self.per_node.send_replace(per_node);
    }

    /// One line when the expected workers are more than the running masters carry: the nodes
    /// the backend lists times the workers per node, or the workers connected now, whichever is
    /// more. The expected count is kept in `state/master-expected.json` for the next start's
    /// `shards = "auto"`.
    pub fn capacity_warning(&self, listed_nodes: usize) -> Option<String> {
        let expected = self.expected_now(listed_nodes);
        capacity::overload(
            expected,
            self.shard_count() as u32,
            self.cfg.capacity,
            self.cfg.shards,
            max_shards(&self.cfg),
        )
        .map(|o| o.to_string())
    }

    /// The workers expected now (`listed_nodes` times the workers per node, or the workers
    /// connected, whichever is more), kept in `state/master-expected.json` when it changed.
    fn expected_now(&self, listed_nodes: usize) -> u64 {
        let connected = self
            .shard_stats()
            .iter()
            .flatten()
            .map(|s| s.worker_count)
            .sum();
        let expected = capacity::expected_workers(listed_nodes, *self.per_node.borrow(), connected);
        let changed = self.expected.send_if_modified(|e| {
            let moved = *e != expected;
            *e = expected;
            moved
        });
        if changed {
            let _ = std::fs::write(&self.expected_file, expected.to_string());
        }
        expected
    }

    /// Connected workers over every shard, asked of each master now: from its stats plugin,
    /// which answers fresh, not from `/stats/requests`, which Locust caches ~2 s (a test
    /// started just after the workers connected would be refused as having none, while the
    /// merged view `fleet run` checked first already counted them).
    pub async fn worker_count(&self) -> Result<u64, ApiError> {
        let counts = each_shard(&self.all(), |_, api| async move {
            view::worker_count(&api).await
        })
        .await;
        counts.into_iter().sum()
    }
}

/// `call(k, shard k's web API)` for every shard at the same time, the answers in shard order:
/// a test starts or stops on every master at once, not one master after the other (with K
/// shards that would make the dispatch K times one master's answer).
async fn each_shard<T, F, Fut>(shards: &[Shard], call: F) -> Vec<Result<T, ApiError>>
where
    T: Send + 'static,
    F: Fn(usize, LocustApi) -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
{
    let apis: Vec<LocustApi> = shards.iter().map(|s| s.api.clone()).collect();
    each_api(&apis, call).await
}

/// [`each_shard`] over the web APIs themselves.
async fn each_api<T, F, Fut>(apis: &[LocustApi], call: F) -> Vec<Result<T, ApiError>>
where
    T: Send + 'static,
    F: Fn(usize, LocustApi) -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
{
    let mut set = JoinSet::new();
    for (k, api) in apis.iter().enumerate() {
        let answer = call(k, api.clone());
        set.spawn(async move { (k, answer.await) });
    }
    let mut answers: Vec<Option<Result<T, ApiError>>> = (0..apis.len()).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        let (k, answer) = joined.expect("a call to a master's web API does not panic");
        answers[k] = Some(answer);
    }
    answers
        .into_iter()
        .map(|a| a.expect("every shard answered"))
        .collect()
}

impl Shard {
    /// Shard `index` with its state from `state_dir`'s `master[-k].json`; `fresh` forgets the
    /// test it recorded then (a shard added while serving gets its share from the balancer).
    /// The supervisor's commands wait in the shard until [`Shard::take_cmds`].
    fn open(index: u32, cfg: MasterConfig, state_dir: &Path, fresh: bool) -> (Shard, Saved) {
        let state_file = state_dir.join(shard_file(index, "master", "json"));
        let saved: Saved = std::fs::read(&state_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let shared = Arc::new(Shared {
            proc: watch::Sender::new(Proc {
                pid: None,
                epoch: saved.epoch,
                restarts: 0,
                classes: saved.classes.clone(),
                dir: saved.dir.clone(),
            }),
            desired: watch::Sender::new(Desired {
                swarm: if fresh { None } else { saved.swarm },
                ..Desired::default()
            }),
            stats: watch::Sender::new(None),
            state_file,
            saving: Mutex::new(()),
        });
        let api = LocustApi::new(&cfg.web_url);
        let (cmds, rx) = mpsc::channel(8);
        let shard = Shard {
            index,
            cfg,
            shared,
            cmds,
            cmds_rx: Arc::new(Mutex::new(Some(rx))),
            api,
        };
        (shard, saved)
    }

    /// The supervisor's end of the commands, once.
    fn take_cmds(&self) -> Option<mpsc::Receiver<Cmd>> {
        self.cmds_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn view(&self) -> ShardView {
        let p = self.shared.proc.borrow();
        let stats = self.shared.stats.borrow();
        ShardView {
            index: self.index,
            pid: p.pid,
            epoch: p.epoch,
            restarts: p.restarts,
            web_url: self.cfg.web_url.clone(),
            port: self.cfg.port,
            swarm: self.shared.desired.borrow().swarm,
            workers: stats.as_ref().map(|s| s.worker_count),
            users: stats.as_ref().map(|s| s.user_count),
        }
    }
}

/// The most masters `cfg` can run: [`capacity::MAX_SHARDS`], fewer when shard k's ports would
/// pass 65535 ([`shard_config`]).
pub fn max_shards(cfg: &MasterConfig) -> u32 {
    (1..capacity::MAX_SHARDS)
        .take_while(|k| shard_config(cfg, *k).is_ok())
        .count() as u32
        + 1
}

/// Shard `k`'s master settings: shard 0 is `cfg` itself; shard k > 0 has its ZMQ port at
/// `port + k`, its web port at the web URL's port + k and its web path `<path>/k`, so
/// `/locust/k/` reaches its UI.
pub fn shard_config(cfg: &MasterConfig, k: u32) -> Result<MasterConfig, MasterError> {
    if k == 0 {
        return Ok(cfg.clone());
    }
    let bad_url = || MasterError::WebUrl(cfg.web_url.clone());
    let uri: hyper::Uri = cfg.web_url.parse().map_err(|_| bad_url())?;
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(bad_url)?;
    let web_port = uri.port_u16().unwrap_or(supervisor::DEFAULT_WEB_PORT);
    let too_high = || MasterError::ShardPorts { shard: k };
    let port = u16::try_from(u32::from(cfg.port) + k).map_err(|_| too_high())?;
    let web_port = u16::try_from(u32::from(web_port) + k).map_err(|_| too_high())?;
    let path = uri.path().trim_end_matches('/');
    Ok(MasterConfig {
        port,
        web_url: format!("http://{host}:{web_port}{path}/{k}"),
        ..cfg.clone()
    })
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

    #[test]
    fn shard_k_has_its_own_ports_and_web_path_and_shard_0_is_the_config() {
        let cfg = MasterConfig {
            port: 5557,
            web_url: "http://127.0.0.1:8089/locust".into(),
            ..MasterConfig::default()
        };
        let s0 = shard_config(&cfg, 0).unwrap();
        assert_eq!(
            (s0.port, s0.web_url.as_str()),
            (5557, "http://127.0.0.1:8089/locust")
        );
        let s2 = shard_config(&cfg, 2).unwrap();
        assert_eq!(
            (s2.port, s2.web_url.as_str()),
            (5559, "http://127.0.0.1:8091/locust/2")
        );
        assert_eq!(shard_file(0, "master", "json"), "master.json");
        assert_eq!(shard_file(2, "master", "log"), "master-2.log");
        let high = MasterConfig { port: 65535, ..cfg };
        let e = shard_config(&high, 1).unwrap_err().to_string();
        assert!(e.contains("65535") && e.contains("fleet.toml"), "{e}");
    }

    #[tokio::test]
    async fn a_task_that_ends_before_stop_is_reported_by_name() {
        let state = tempfile::tempdir().unwrap();
        let m = Master::start(config(false, "locust"), "locustfile.py", state.path());
        m.tasks.set.lock().unwrap().abort_all();
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

    /// A web API answering every request after `delay`, with `status`; returns its base URL.
    async fn slow_api(delay: Duration, status: u16) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = vec![];
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    tokio::time::sleep(delay).await;
                    let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                    let _ = conn.write_all(answer.as_bytes()).await;
                });
            }
        });
        url
    }

    #[tokio::test]
    async fn every_shard_is_called_at_once_and_answers_in_shard_order() {
        let delay = Duration::from_millis(400);
        let mut apis = vec![];
        for status in [200, 500, 200, 200] {
            apis.push(LocustApi::new(&slow_api(delay, status).await));
        }
        let t0 = Instant::now();
        let answers = each_api(&apis, |_, api| async move { api.stop().await }).await;
        let took = t0.elapsed();
        // One after the other would be 4 × 400 ms.
        assert!(took < delay * 2, "{took:?}");
        let ok: Vec<bool> = answers.iter().map(Result::is_ok).collect();
        assert_eq!(ok, [true, false, true, true]);
    }

    #[tokio::test]
    async fn a_task_added_while_join_waits_is_watched_too() {
        let state = tempfile::tempdir().unwrap();
        let m = Master::start(config(false, "locust"), "locustfile.py", state.path());
        let joined = tokio::spawn({
            let m = m.clone();
            async move { m.join().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!joined.is_finished(), "the keeper runs");
        // What a shard added while serving does: its tasks join the set `join` waits on.
        m.tasks.spawn("shard balancer", async {});
        let e = tokio::time::timeout(Duration::from_secs(5), joined)
            .await
            .expect("join sees the new task end")
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(
                e,
                MasterError::TaskEnded {
                    task: "shard balancer",
                    ..
                }
            ),
            "{e}"
        );
        m.stop().await;
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
        assert!(m.tasks.set.lock().unwrap().is_empty());
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
    async fn auto_starts_a_shard_live_when_the_expected_workers_need_it() {
        let state = tempfile::tempdir().unwrap();
        // A "master" that runs until stopped.
        let fake = state.path().join("fake-locust");
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 60\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = MasterConfig {
            shards: capacity::Shards::Auto,
            capacity: 2,
            ..config(true, fake.to_str().unwrap())
        };
        let m = Master::start_shards(cfg.clone(), "locustfile.py", state.path(), 1);
        m.set_per_node(Some(1));
        let spec = state.path().join("spec");
        std::fs::create_dir(&spec).unwrap();
        assert_eq!(m.ensure(spec.clone()).await.unwrap(), [1]);
        let test = SwarmRequest {
            users: 6,
            spawn_rate: 3.0,
        };
        m.set_swarm(Some(test));
        assert!(m.masters(&[1]).is_empty(), "one master: `master` alone");
        assert_eq!(m.grow(2).await, 1, "two workers fit one master of 2");

        let mut epochs = m.epoch();
        epochs.borrow_and_update();
        assert_eq!(m.grow(3).await, 2, "three workers need two");
        assert!(epochs.has_changed().unwrap(), "the new epoch is published");
        let now = epochs.borrow().clone();
        assert_eq!(now, [1, 1]);
        let listed = m.masters(&now);
        assert_eq!(
            listed.iter().map(|s| s.port).collect::<Vec<_>>(),
            [cfg.port, cfg.port + 1]
        );
        let view = m.view();
        assert_eq!(view.shards.len(), 2);
        assert!(view.shards[1].pid.is_some(), "shard 1 runs: {view:?}");
        assert_eq!(
            m.last_dir.lock().unwrap().as_deref(),
            Some(spec.as_path()),
            "on the spec shard 0 runs"
        );
        // The one master's test is now the test over both (the balancer splits it).
        assert_eq!(view.swarm, Some(test));
        assert_eq!(
            std::fs::read_to_string(state.path().join(EXPECTED_FILE)).unwrap(),
            "3"
        );
        let mut names: Vec<&str> = m.tasks.names.lock().unwrap().values().copied().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "shard balancer",
                "supervisor",
                "supervisor",
                "swarm keeper",
                "swarm keeper"
            ],
            "shard 1's tasks and the balancer are owned with shard 0's"
        );
        // Fewer expected (scaled down): no shard is stopped while serving.
        assert_eq!(m.grow(0).await, 2);
        assert_eq!(m.shard_count(), 2);
        m.stop().await;
        assert!(
            m.join().await.is_ok(),
            "the grown shard's tasks ended as asked"
        );
        assert!(m.tasks.set.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_fixed_shard_count_never_grows_and_the_epoch_waits_for_the_first_start() {
        let state = tempfile::tempdir().unwrap();
        let m = Master::start_shards(config(true, "locust"), "locustfile.py", state.path(), 1);
        m.set_per_node(Some(1));
        assert_eq!(m.grow(100_000).await, 1);
        // A shard listed before its master started (no epoch yet) is not published.
        let auto = MasterConfig {
            shards: capacity::Shards::Auto,
            capacity: 2,
            ..config(true, "locust")
        };
        let m2 = Master::start_shards(auto, "locustfile.py", state.path(), 2);
        assert_eq!(m2.masters(&[1]), vec![]);
        assert_eq!(m2.masters(&[1, 1]).len(), 2);
        m.stop().await;
        m2.stop().await;
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
        assert_eq!(m.ensure(state.path().to_path_buf()).await.unwrap(), [1]);
        epochs.borrow_and_update();
        // It exits at once; the first restart comes after a second.
        tokio::time::timeout(Duration::from_secs(5), epochs.changed())
            .await
            .expect("restarted")
            .unwrap();
        assert_eq!(*epochs.borrow(), [2]);
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
