//! The agent's main loop: feeds what happens to the [`Machine`] and carries out its effects.
//!
//! The loop owns everything that lives: the worker sets (keyed by generation), the stops in
//! progress, and the two long-running tasks, the poller (`poller.rs`) and the heartbeat sender
//! (`heartbeat.rs`). Either task ending is a fatal error: the workers are stopped and the agent
//! exits 1, so systemd restarts it. The decisions themselves are in `machine.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleet_common::client::{Client, ClientError};
use fleet_common::manifest::MasterAddr;
use fleet_common::wire::Heartbeat;
use tokio::sync::{mpsc, watch};
use tokio::task::{Id, JoinError, JoinSet};
use tokio::time::{sleep_until, Instant as TokioInstant};

use crate::config::Config;
use crate::machine::{self, Effect, Event, GenId, Machine, RunSpec, Settings};
use crate::poller::{self, Poll};
use crate::store::Store;
use crate::supervisor::{self, Timing, WorkerCmd, WorkerEvent, WorkerSet};
use crate::{heartbeat, procfs, token};

pub use crate::procfs::default_node_id;

/// What stops a running agent with exit 1.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("cannot create state_dir {}: {source}", dir.display())]
    StateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen for signals: {0}")]
    Signals(std::io::Error),
    #[error("the {task} task {how}; the workers were stopped and the agent exits for systemd to restart it")]
    TaskEnded { task: &'static str, how: String },
    #[error("power-off command {cmd:?} failed: {why}")]
    PowerOff { cmd: Vec<String>, why: String },
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Fills `worker_command`'s placeholders (docs/agent-config.md).
pub fn substitute(
    template: &[String],
    spec_dir: &Path,
    locustfile: &Path,
    master: &MasterAddr,
    index: u32,
) -> Vec<String> {
    template
        .iter()
        .map(|a| {
            a.replace("{locustfile}", &locustfile.display().to_string())
                .replace("{bundle_dir}", &spec_dir.display().to_string())
                .replace("{master_host}", &master.host)
                .replace("{master_port}", &master.port.to_string())
                .replace("{index}", &index.to_string())
        })
        .collect()
}

/// The command lines of a generation's workers.
fn worker_cmds(cfg: &Config, node_id: &str, spec: &RunSpec) -> Vec<WorkerCmd> {
    let locustfile = spec.dir.join(&spec.locustfile);
    // Where a joined worker is connected (see supervisor.rs); a name is resolved once per
    // generation.
    let master_addrs: Vec<std::net::SocketAddr> = match spec.master.host.parse::<std::net::IpAddr>()
    {
        Ok(ip) => vec![std::net::SocketAddr::new(ip, spec.master.port)],
        Err(_) => {
            std::net::ToSocketAddrs::to_socket_addrs(&(spec.master.host.as_str(), spec.master.port))
                .map(|a| a.collect())
                .unwrap_or_default()
        }
    };
    (0..cfg.worker_count())
        .map(|i| {
            let argv = match &cfg.worker_command {
                Some(t) => substitute(t, &spec.dir, &locustfile, &spec.master, i),
                None => {
                    let mut v = vec![
                        cfg.locust.clone(),
                        "-f".into(),
                        locustfile.display().to_string(),
                        "--worker".into(),
                        "--master-host".into(),
                        spec.master.host.clone(),
                        "--master-port".into(),
                        spec.master.port.to_string(),
                    ];
                    v.extend(spec.worker_args.iter().cloned());
                    v
                }
            };
            WorkerCmd {
                argv,
                master: master_addrs.clone(),
                cwd: spec.dir.clone(),
                env: vec![
                    ("PYTHONUNBUFFERED".into(), "1".into()),
                    // Workers must not write byte-code into the verified bundle directory.
                    ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
                    ("FLEET_NODE_ID".into(), node_id.to_string()),
                    ("FLEET_BUNDLE_SHA256".into(), spec.sha.clone()),
                    ("FLEET_WORKER_INDEX".into(), i.to_string()),
                ],
                env_allow: cfg.worker_env_allow.clone(),
                home: Some(cfg.state_dir.join("home")),
            }
        })
        .collect()
}

/// A generation's live workers.
struct Workers {
    set: WorkerSet,
    /// Wall-clock start, for the heartbeat.
    since_ms: u64,
}

/// What carries the machine's effects out: the live side of the agent.
struct Hands {
    cfg: Arc<Config>,
    node_id: String,
    store: Arc<Store>,
    workers_tx: mpsc::UnboundedSender<WorkerEvent>,
    sets: BTreeMap<GenId, Workers>,
    /// Generations being stopped; awaited before the agent exits.
    stopping: JoinSet<()>,
    hb: watch::Sender<Heartbeat>,
}

impl Hands {
    fn publish(&self, m: &Machine, now: Instant) {
        let hb = m.heartbeat(now, |id| {
            self.sets
                .get(&id)
                .map(|w| (w.since_ms, w.set.reports()))
                .unwrap_or_default()
        });
        self.hb.send_replace(hb);
    }

    /// Carries out `fx` in order. `Some` when the agent is done (power-off).
    async fn carry_out(
        &mut self,
        fx: Vec<Effect>,
        m: &Machine,
        now: Instant,
    ) -> Option<Result<(), AgentError>> {
        for e in fx {
            match e {
                Effect::Launch { generation, spec } => {
                    let timing = Timing {
                        join_grace: Duration::from_millis(self.cfg.join_grace_ms),
                        stop_grace: Duration::from_millis(self.cfg.stop_grace_ms),
                        stable: Duration::from_millis(self.cfg.stable_ms),
                    };
                    let cmds = worker_cmds(&self.cfg, &self.node_id, &spec);
                    let set = WorkerSet::start(generation, cmds, timing, self.workers_tx.clone());
                    let since_ms = now_ms();
                    self.sets.insert(generation, Workers { set, since_ms });
                }
                Effect::Stop(generation) => {
                    if let Some(w) = self.sets.remove(&generation) {
                        self.stopping.spawn(w.set.stop());
                    }
                }
                Effect::SaveLastGood(rel) => match self.store.save_last_good(&rel) {
                    Ok(()) => log!(
                        "bundle {} (sequence {}) is now the last good one",
                        machine::short(&rel.manifest.bundle.sha256),
                        rel.manifest.sequence
                    ),
                    Err(e) => log!("{e}"),
                },
                Effect::Gc { keep } => {
                    // Removing directories blocks: on the blocking pool, not awaited (the
                    // collection spares young bundles, so it never races an unpack).
                    let store = self.store.clone();
                    tokio::task::spawn_blocking(move || store.gc(&[&keep]));
                }
                Effect::Log(line) => log!("{line}"),
                Effect::Publish => self.publish(m, now),
                Effect::PowerOff => {
                    self.stop_all().await;
                    return Some(self.power_off().await);
                }
            }
        }
        None
    }

    /// Stops every generation and waits until all are gone.
    async fn stop_all(&mut self) {
        for (_, w) in std::mem::take(&mut self.sets) {
            self.stopping.spawn(w.set.stop());
        }
        while self.stopping.join_next().await.is_some() {}
    }

    async fn power_off(&self) -> Result<(), AgentError> {
        let cmd = &self.cfg.poweroff_command;
        let st = tokio::process::Command::new(&cmd[0])
            .args(&cmd[1..])
            .status()
            .await;
        let why = match st {
            Ok(s) if s.success() => return Ok(()),
            Ok(s) => supervisor::describe(s),
            Err(e) => e.to_string(),
        };
        Err(AgentError::PowerOff {
            cmd: cmd.clone(),
            why,
        })
    }
}

/// What woke the main loop.
enum Next {
    Event(Event),
    Heartbeat,
    Stopped,
    TaskEnded(Result<(Id, &'static str), JoinError>),
    Signal(&'static str),
    /// SIGHUP: read the token file again.
    Hangup,
}

/// The client, the on-disk store and the last good release (a corrupt or tampered state is
/// logged and ignored), checked before anything runs.
fn open(cfg: &Config) -> Result<(Client, Arc<Store>, Option<crate::store::Release>), AgentError> {
    let ca = cfg.ca_pem().map_err(AgentError::Config)?;
    let token = cfg.token().map_err(AgentError::Config)?;
    let client = Client::new(&cfg.controller, &ca, Some(&format!("Bearer {token}")))?;
    std::fs::create_dir_all(cfg.state_dir.join("bundles")).map_err(|source| {
        AgentError::StateDir {
            dir: cfg.state_dir.clone(),
            source,
        }
    })?;
    let store = Arc::new(Store::new(&cfg.state_dir));
    let last_good = match store.load_last_good(&cfg.verify_key(), cfg.fleet.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            log!("ignoring saved state: {e}");
            None
        }
    };
    Ok((client, store, last_good))
}

/// The state machine's settings from the config; the max lifetime ends at an instant computed
/// once, now.
fn settings(cfg: &Config, node_id: &str) -> Settings {
    let lifetime_end = cfg.max_lifetime_s.map(|s| {
        let max = Duration::from_secs(s);
        Instant::now() + machine::lifetime_left(max, &cfg.backend, procfs::node_uptime())
    });
    Settings {
        node_id: node_id.to_string(),
        backend: cfg.backend.clone(),
        workers: cfg.worker_count(),
        join_grace: Duration::from_millis(cfg.join_grace_ms),
        stable: Duration::from_millis(cfg.stable_ms),
        crash_loop_exits: cfg.crash_loop_exits,
        lifetime_end,
    }
}

/// Runs the agent until SIGTERM/SIGINT (exit 0), its max lifetime (power-off), or a fatal
/// error.
pub async fn run(cfg: Config, node_id: String) -> Result<(), AgentError> {
    let cfg = Arc::new(cfg);
    let (client, store, last_good) = open(&cfg)?;
    let fleet = match &cfg.fleet {
        Some(f) => format!("fleet {f:?}"),
        None => "any fleet (no `fleet` configured)".to_string(),
    };
    log!(
        "node {} following {} for {fleet} (state in {})",
        node_id,
        cfg.controller,
        cfg.state_dir.display()
    );
    let floor = last_good.as_ref().map(|r| r.manifest.sequence);
    let now = Instant::now();
    let (mut machine, fx) = Machine::start(settings(&cfg, &node_id), last_good, now);

    let (workers_tx, mut workers_rx) = mpsc::unbounded_channel();
    let (poll_tx, mut poll_rx) = mpsc::unbounded_channel::<Poll>();
    let (hb_tx, hb_rx) = watch::channel(machine.heartbeat(now, |_| (0, vec![])));
    let mut hands = Hands {
        cfg: cfg.clone(),
        node_id,
        store: store.clone(),
        workers_tx,
        sets: BTreeMap::new(),
        stopping: JoinSet::new(),
        hb: hb_tx,
    };
    if let Some(done) = hands.carry_out(fx, &machine, now).await {
        return done;
    }

    let mut tasks = JoinSet::new();
    let poller = poller::run(client.clone(), cfg.clone(), store, floor, poll_tx.clone());
    let poller_id = tasks
        .spawn(async move {
            poller.await;
            "poller"
        })
        .id();
    let token_client = client.clone();
    let hb_cfg = cfg.clone();
    tasks.spawn(async move {
        heartbeat::run(hb_cfg, client, hb_rx, poll_tx).await;
        "heartbeat"
    });

    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(AgentError::Signals)?;
    let mut hb_tick = tokio::time::interval(Duration::from_millis(cfg.heartbeat_ms.max(100)));

    loop {
        let deadline = machine.next_deadline().map(TokioInstant::from_std);
        let next = tokio::select! {
            Some(p) = poll_rx.recv() => Next::Event(Event::Poll(p)),
            Some(w) = workers_rx.recv() => Next::Event(Event::Worker(w)),
            _ = async { sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => Next::Event(Event::Tick),
            _ = hb_tick.tick() => Next::Heartbeat,
            Some(_) = hands.stopping.join_next(), if !hands.stopping.is_empty() => Next::Stopped,
            Some(r) = tasks.join_next_with_id() => Next::TaskEnded(r),
            _ = sigterm.recv() => Next::Signal("SIGTERM"),
            _ = sigint.recv() => Next::Signal("SIGINT"),
            _ = sighup.recv() => Next::Hangup,
        };
        let now = Instant::now();
        match next {
            Next::Event(e) => {
                let fx = machine.on_event(e, now);
                if let Some(done) = hands.carry_out(fx, &machine, now).await {
                    return done;
                }
            }
            Next::Heartbeat => hands.publish(&machine, now),
            Next::Hangup => {
                let re = token::reread(&cfg, &token_client);
                log!("{}", token::describe("SIGHUP", &re, &cfg));
            }
            Next::Stopped => {}
            Next::TaskEnded(r) => {
                let (task, how) = match r {
                    Ok((_, task)) => (task, "ended".to_string()),
                    Err(e) if e.id() == poller_id => ("poller", format!("failed: {e}")),
                    Err(e) => ("heartbeat", format!("failed: {e}")),
                };
                log!("the {task} task {how}: stopping workers");
                hands.stop_all().await;
                return Err(AgentError::TaskEnded { task, how });
            }
            Next::Signal(name) => {
                log!("{name}: stopping workers");
                hands.stop_all().await;
                return Ok(());
            }
        }
    }
}
