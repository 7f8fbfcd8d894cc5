//! The agent's main loop: follow the controller's signed manifests and keep the right Locust
//! workers running.
//!
//! Three tasks cooperate:
//! - the poller long-polls `/v1/manifest`, verifies, downloads and unpacks new bundles, and
//!   hands finished [`Release`]s to the main loop; refusals never reach the workers;
//! - the main loop owns the worker generations: hot restart with overlap, crash-loop rollback,
//!   promotion to "last good", offline fallback, max lifetime;
//! - the heartbeat task posts the latest [`Heartbeat`] whenever it changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use fleet_common::bundle;
use fleet_common::client::Client;
use fleet_common::manifest::{self, Manifest, MasterAddr, Signed, VerifyKey, SIGNATURE_HEADER};
use fleet_common::wire::{routes, Heartbeat, NodeStatus, Running, Update, UpdateState};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant as TokioInstant};

use crate::config::Config;
use crate::supervisor::{Event, Exit, Timing, WorkerCmd, WorkerSet};

macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("{} fleet-agent: {}", humantime::format_rfc3339_millis(SystemTime::now()), format!($($arg)*))
    };
}

/// Reconnect delays after the controller could not be reached: doubled from
/// `RETRY_INITIAL` up to `RETRY_MAX`, each with up to 50% random jitter added so a thousand
/// agents do not reconnect in lockstep after a controller restart.
const RETRY_INITIAL: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Unpacked bundles younger than this are never garbage-collected.
const GC_MIN_AGE: Duration = Duration::from_secs(120);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A verified manifest whose bundle is unpacked on disk.
#[derive(Debug, Clone)]
pub struct Release {
    pub manifest: Manifest,
    pub signed: Signed,
    pub dir: PathBuf,
}

/// What a worker generation runs: a bundle against a master incarnation with arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RunSpec {
    sha: String,
    dir: PathBuf,
    locustfile: String,
    master: MasterAddr,
    epoch: u64,
    worker_args: Vec<String>,
    sequence: u64,
}

impl RunSpec {
    fn of(r: &Release) -> RunSpec {
        let m = &r.manifest;
        RunSpec {
            sha: m.bundle.sha256.clone(),
            dir: r.dir.clone(),
            locustfile: m.locustfile.clone(),
            master: m.master.clone(),
            epoch: m.master_epoch,
            worker_args: m.worker_args.clone(),
            sequence: m.sequence,
        }
    }

    /// `bundle_of`'s code against `target`'s master and arguments: what a rollback runs.
    fn code_from(bundle_of: &Release, target: &RunSpec) -> RunSpec {
        RunSpec {
            sha: bundle_of.manifest.bundle.sha256.clone(),
            dir: bundle_of.dir.clone(),
            locustfile: bundle_of.manifest.locustfile.clone(),
            ..target.clone()
        }
    }

    fn same_workers(&self, other: &RunSpec) -> bool {
        self.sha == other.sha
            && self.locustfile == other.locustfile
            && self.master == other.master
            && self.epoch == other.epoch
            && self.worker_args == other.worker_args
    }
}

struct Gen {
    spec: RunSpec,
    set: WorkerSet,
    started: Instant,
    since_ms: u64,
    exits: u32,
    workers: u32,
}

/// Messages from the poller.
enum Poll {
    Release(Box<Release>),
    Refused(String),
    /// A newer publication is being retried, or was refused.
    Update(Update),
    Unreachable(String),
    Reachable,
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    manifest: String,
    signature: String,
}

/// The on-disk state: unpacked bundles and the last good manifest.
pub struct Store {
    pub dir: PathBuf,
}

impl Store {
    pub fn bundle_dir(&self, sha: &str) -> PathBuf {
        self.dir.join("bundles").join(sha)
    }

    fn last_good_path(&self) -> PathBuf {
        self.dir.join("last_good.json")
    }

    pub fn save_last_good(&self, r: &Release) -> std::io::Result<()> {
        let p = Persisted {
            manifest: B64.encode(&r.signed.bytes),
            signature: r.signed.signature_b64(),
        };
        let tmp = self.dir.join("last_good.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&p).expect("serialises"))?;
        std::fs::rename(tmp, self.last_good_path())
    }

    /// The last good release, re-verified: a tampered state file is ignored, not trusted.
    pub fn load_last_good(&self, vk: &VerifyKey) -> Result<Option<Release>, String> {
        let raw = match std::fs::read(self.last_good_path()) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read last good state: {e}")),
        };
        let p: Persisted =
            serde_json::from_slice(&raw).map_err(|e| format!("last good state is corrupt: {e}"))?;
        let bytes = B64
            .decode(&p.manifest)
            .map_err(|_| "last good state is corrupt".to_string())?;
        let m = vk
            .verify_b64(&bytes, &p.signature)
            .map_err(|e| format!("last good state: {e}"))?;
        let dir = self.bundle_dir(&m.bundle.sha256);
        if !dir.join(&m.locustfile).is_file() {
            return Err(format!(
                "last good bundle {} is missing from {}",
                m.bundle.sha256,
                dir.display()
            ));
        }
        let signature = B64
            .decode(&p.signature)
            .map_err(|_| "last good state is corrupt".to_string())?;
        Ok(Some(Release {
            manifest: m,
            signed: Signed { bytes, signature },
            dir,
        }))
    }

    /// Removes unpacked bundles other than `keep`.
    fn gc(&self, keep: &[&str]) {
        let Ok(rd) = std::fs::read_dir(self.dir.join("bundles")) else {
            return;
        };
        // Young directories are spared: the poller may have just unpacked a bundle (or be
        // unpacking one into a `.unpack-*` directory) that the main loop has not taken yet.
        let young = |e: &std::fs::DirEntry| {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age < GC_MIN_AGE)
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if !keep.iter().any(|k| *k == name) && !name.starts_with('.') && !young(&e) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Why a publication's bundle did not become a [`Release`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum FetchError {
    /// The download failed on the way (a reset, a stall, a timeout, the controller answering
    /// other than 200): fetch it again after a backoff.
    Transient(String),
    /// The bundle failed verification (size cap, sha256, unsafe content, no locustfile): this
    /// sequence is used up.
    Refused(String),
}

/// No data for this long ends a bundle download as stalled (it is then retried). A download
/// that keeps moving, however slowly (a thousand agents fetching a big bundle at once), has
/// no overall deadline.
const DOWNLOAD_IDLE: Duration = Duration::from_secs(15);

/// Fetches, verifies and unpacks the bundle a verified manifest names (if not on disk yet).
async fn materialise(
    client: &Client,
    cfg: &Config,
    store: &Store,
    m: Manifest,
    signed: Signed,
) -> Result<Release, FetchError> {
    use FetchError::{Refused, Transient};
    let dir = store.bundle_dir(&m.bundle.sha256);
    if !dir.join(&m.locustfile).is_file() {
        if m.bundle.size > cfg.max_bundle_bytes {
            return Err(Refused(format!(
                "bundle {} is {} bytes, over the cap of {}",
                m.bundle.sha256, m.bundle.size, cfg.max_bundle_bytes
            )));
        }
        let path = format!("{}/{}", routes::BUNDLES, m.bundle.sha256);
        let resp = client
            .download(&path, DOWNLOAD_IDLE, cfg.max_bundle_bytes as usize + 1)
            .await
            .map_err(|e| {
                if e.is_transient() {
                    Transient(e.to_string())
                } else {
                    Refused(e.to_string())
                }
            })?;
        if resp.status != 200 {
            return Err(Transient(format!("GET {path}: HTTP {}", resp.status)));
        }
        manifest::check_bundle(&m, &resp.body).map_err(|e| Refused(e.to_string()))?;
        if dir.exists() {
            // A directory without its locustfile is debris from an interrupted unpack.
            std::fs::remove_dir_all(&dir)
                .map_err(|e| Transient(format!("{}: {e}", dir.display())))?;
        }
        bundle::unpack(&resp.body, &dir, &cfg.limits()).map_err(|e| Refused(e.to_string()))?;
        if !dir.join(&m.locustfile).is_file() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(Refused(format!(
                "bundle {} has no {}",
                m.bundle.sha256, m.locustfile
            )));
        }
    }
    Ok(Release {
        manifest: m,
        signed,
        dir,
    })
}

/// Capped exponential backoff with jitter for the poller's retries.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: RETRY_INITIAL,
        }
    }

    /// The wait before the next try, given a jitter fraction in [0, 1): the current delay plus
    /// up to half of it again; the delay then doubles up to [`RETRY_MAX`].
    fn step(&mut self, jitter: f64) -> Duration {
        let wait = self.next + self.next.mul_f64(jitter.clamp(0.0, 1.0) * 0.5);
        self.next = (self.next * 2).min(RETRY_MAX);
        wait
    }
}

/// The poller's record of the publications it has seen.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Seen {
    /// The highest sequence used up: run, or refused. Long-polls ask for newer ones only.
    floor: Option<u64>,
    /// A newer publication whose bundle could not be fetched yet, or was refused.
    update: Option<Update>,
}

impl Seen {
    /// Records the outcome of fetching the bundle of sequence `seq` (`sha`): a success or a
    /// refusal uses the sequence up; a transient failure leaves it to be tried again, counting
    /// the attempts for that very sequence.
    fn fetched(&mut self, seq: u64, sha: &str, outcome: Result<(), &FetchError>) {
        match outcome {
            Ok(()) => {
                self.floor = Some(seq);
                self.update = None;
            }
            Err(FetchError::Refused(e)) => {
                self.floor = Some(seq);
                self.update = Some(Update {
                    sequence: seq,
                    sha256: sha.to_string(),
                    state: UpdateState::Refused,
                    attempts: 1,
                    error: e.clone(),
                });
            }
            Err(FetchError::Transient(e)) => {
                let attempts = match &self.update {
                    Some(u) if u.sequence == seq && u.state == UpdateState::Retrying => {
                        u.attempts.saturating_add(1)
                    }
                    _ => 1,
                };
                self.update = Some(Update {
                    sequence: seq,
                    sha256: sha.to_string(),
                    state: UpdateState::Retrying,
                    attempts,
                    error: e.clone(),
                });
            }
        }
    }
}

/// What went wrong in one round of the poller.
enum Failure {
    /// The controller could not be reached at all.
    Unreachable(String),
    /// It answered, but not with something usable (a refused manifest, an HTTP error).
    Answer(String),
    /// A bundle download failed on the way; already reported as an [`Update`].
    Retry,
}

async fn poller(
    client: Client,
    cfg: Arc<Config>,
    store: Arc<Store>,
    floor: Option<u64>,
    tx: mpsc::UnboundedSender<Poll>,
) {
    let vk = cfg.verify_key();
    let mut backoff = Backoff::new();
    let mut reachable: Option<bool> = None;
    let mut seen = Seen {
        floor,
        update: None,
    };
    loop {
        // Always a long-poll: before anything is published the controller holds the request
        // until the first publication instead of answering 404 at once.
        let path = match seen.floor {
            Some(s) => format!("{}?after={s}&wait={}", routes::MANIFEST, cfg.poll_wait_s),
            None => format!("{}?wait={}", routes::MANIFEST, cfg.poll_wait_s),
        };
        let res = client
            .get(&path, Duration::from_secs(cfg.poll_wait_s + 15), 1 << 20)
            .await;
        let mut failed = None;
        match res {
            Err(e) if e.is_unreachable() => failed = Some(Failure::Unreachable(e.to_string())),
            Err(e) => failed = Some(Failure::Answer(e.to_string())),
            Ok(r) => {
                if reachable != Some(true) {
                    reachable = Some(true);
                    let _ = tx.send(Poll::Reachable);
                }
                match r.status {
                    200 => {
                        let sig = r.header(SIGNATURE_HEADER).unwrap_or("").to_string();
                        match vk.verify_b64(&r.body, &sig) {
                            Err(e) => {
                                failed = Some(Failure::Answer(format!("refused manifest: {e}")))
                            }
                            Ok(m) => {
                                if let Err(e) = manifest::check_sequence(&m, seen.floor) {
                                    failed =
                                        Some(Failure::Answer(format!("refused manifest: {e}")));
                                } else if Some(m.sequence) != seen.floor {
                                    let signed = Signed {
                                        bytes: r.body.to_vec(),
                                        signature: B64.decode(sig.trim()).unwrap_or_default(),
                                    };
                                    let (seq, sha) = (m.sequence, m.bundle.sha256.clone());
                                    let res = materialise(&client, &cfg, &store, m, signed).await;
                                    seen.fetched(seq, &sha, res.as_ref().map(|_| ()));
                                    match res {
                                        Ok(rel) => {
                                            let _ = tx.send(Poll::Release(Box::new(rel)));
                                        }
                                        Err(FetchError::Refused(e)) => {
                                            let _ = tx.send(Poll::Refused(format!(
                                                "refused bundle of sequence {seq}: {e}"
                                            )));
                                        }
                                        Err(FetchError::Transient(_)) => {
                                            failed = Some(Failure::Retry)
                                        }
                                    }
                                    if let Some(u) = &seen.update {
                                        let _ = tx.send(Poll::Update(u.clone()));
                                    }
                                }
                            }
                        }
                    }
                    // Nothing newer within the wait, or nothing published yet.
                    204 | 304 | 404 => {
                        if r.status == 404 {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                    s => {
                        failed = Some(Failure::Answer(format!(
                            "GET {}: HTTP {s}",
                            routes::MANIFEST
                        )))
                    }
                }
            }
        }
        match failed {
            None => backoff = Backoff::new(),
            Some(f) => {
                match f {
                    Failure::Unreachable(line) => {
                        if reachable != Some(false) {
                            reachable = Some(false);
                            let _ = tx.send(Poll::Unreachable(line));
                        }
                    }
                    Failure::Answer(line) => {
                        let _ = tx.send(Poll::Refused(line));
                    }
                    Failure::Retry => {}
                }
                tokio::time::sleep(backoff.step(jitter_fraction())).await;
            }
        }
    }
}

/// A number in [0, 1) from the clock's low bits: enough to spread reconnects, no RNG needed.
fn jitter_fraction() -> f64 {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (n % 1_000_003) as f64 / 1_000_003.0
}

/// Posts every new heartbeat. A heartbeat that gets through after failures also tells the main
/// loop the controller is back, without waiting for the long-poll to return.
async fn heartbeats(
    client: Client,
    mut rx: watch::Receiver<Heartbeat>,
    poll_tx: mpsc::UnboundedSender<Poll>,
) {
    let mut failing = false;
    while rx.changed().await.is_ok() {
        let hb = rx.borrow_and_update().clone();
        let body = serde_json::to_vec(&hb).expect("serialises");
        match client
            .post_json(routes::HEARTBEAT, body, Duration::from_secs(10))
            .await
        {
            Ok(r) if r.status == 200 => {
                if failing {
                    let _ = poll_tx.send(Poll::Reachable);
                }
                failing = false;
            }
            Ok(r) => {
                if !failing {
                    log!("heartbeat refused: HTTP {}", r.status);
                }
                failing = true;
            }
            Err(e) => {
                if !failing {
                    log!("heartbeat failed: {e}");
                }
                failing = true;
            }
        }
    }
}

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

pub struct Agent {
    cfg: Arc<Config>,
    node_id: String,
    store: Arc<Store>,
    exits_tx: mpsc::UnboundedSender<Event>,
    current: Option<Gen>,
    /// The previous generation during a hot restart's overlap, and when to stop it.
    draining: Option<(Gen, Instant)>,
    last_good: Option<Release>,
    /// The newest release the controller published that this agent accepted.
    latest: Option<Release>,
    rejected: Option<String>,
    /// A newer publication the poller is retrying or refused.
    update: Option<Update>,
    status: NodeStatus,
    last_error: Option<String>,
    next_gen: u64,
    started: Instant,
    hb: watch::Sender<Heartbeat>,
}

impl Agent {
    fn worker_cmds(&self, spec: &RunSpec) -> Vec<WorkerCmd> {
        let locustfile = spec.dir.join(&spec.locustfile);
        // Where a joined worker is connected (see supervisor.rs); a name is resolved once per
        // generation.
        let master_addrs: Vec<std::net::SocketAddr> =
            match spec.master.host.parse::<std::net::IpAddr>() {
                Ok(ip) => vec![std::net::SocketAddr::new(ip, spec.master.port)],
                Err(_) => std::net::ToSocketAddrs::to_socket_addrs(&(
                    spec.master.host.as_str(),
                    spec.master.port,
                ))
                .map(|a| a.collect())
                .unwrap_or_default(),
            };
        (0..self.cfg.worker_count())
            .map(|i| {
                let argv = match &self.cfg.worker_command {
                    Some(t) => substitute(t, &spec.dir, &locustfile, &spec.master, i),
                    None => {
                        let mut v = vec![
                            self.cfg.locust.clone(),
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
                        ("FLEET_NODE_ID".into(), self.node_id.clone()),
                        ("FLEET_BUNDLE_SHA256".into(), spec.sha.clone()),
                        ("FLEET_WORKER_INDEX".into(), i.to_string()),
                    ],
                }
            })
            .collect()
    }

    fn launch(&mut self, spec: RunSpec) -> Gen {
        self.next_gen += 1;
        let timing = Timing {
            join_grace: Duration::from_millis(self.cfg.join_grace_ms),
            stop_grace: Duration::from_millis(self.cfg.stop_grace_ms),
            stable: Duration::from_millis(self.cfg.stable_ms),
        };
        let cmds = self.worker_cmds(&spec);
        let workers = cmds.len() as u32;
        log!(
            "starting {workers} worker(s) on bundle {} (sequence {}, master {}:{} epoch {})",
            short(&spec.sha),
            spec.sequence,
            spec.master.host,
            spec.master.port,
            spec.epoch
        );
        Gen {
            set: WorkerSet::start(self.next_gen, cmds, timing, self.exits_tx.clone()),
            spec,
            started: Instant::now(),
            since_ms: now_ms(),
            exits: 0,
            workers,
        }
    }

    /// Switches the workers to `spec`: new generation first, the old one kept until the new
    /// workers had their join grace (LOCUST.md: overlap keeps the load up).
    fn switch_to(&mut self, spec: RunSpec) {
        if let Some((old, _)) = self.draining.take() {
            // A switch during an overlap: the generation being drained is superseded at once.
            tokio::spawn(old.set.stop());
        }
        let new = self.launch(spec);
        if let Some(old) = self.current.replace(new) {
            let deadline = Instant::now() + Duration::from_millis(self.cfg.join_grace_ms);
            self.draining = Some((old, deadline));
        }
    }

    fn heartbeat(&self) -> Heartbeat {
        let (running, workers) = match &self.current {
            Some(g) => (
                Some(Running {
                    sha256: g.spec.sha.clone(),
                    sequence: g.spec.sequence,
                    master_epoch: g.spec.epoch,
                    since_ms: g.since_ms,
                }),
                g.set.reports(),
            ),
            None => (None, vec![]),
        };
        Heartbeat {
            node_id: self.node_id.clone(),
            backend: self.cfg.backend.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            running,
            last_good: self
                .last_good
                .as_ref()
                .map(|r| r.manifest.bundle.sha256.clone()),
            workers,
            status: self.status,
            last_error: self.last_error.clone(),
            rejected: self.rejected.clone(),
            uptime_s: self.started.elapsed().as_secs(),
            update: self.update.clone(),
            seen_sequence: self.seen_sequence(),
        }
    }

    /// The highest sequence this agent knows of: the latest it accepted, the one it retries or
    /// refused, or the one on disk.
    fn seen_sequence(&self) -> Option<u64> {
        [
            self.latest.as_ref().map(|r| r.manifest.sequence),
            self.update.as_ref().map(|u| u.sequence),
            self.last_good.as_ref().map(|r| r.manifest.sequence),
        ]
        .into_iter()
        .flatten()
        .max()
    }

    /// The poller retries or refused a newer publication.
    fn on_update(&mut self, u: Update) {
        if self
            .latest
            .as_ref()
            .is_some_and(|r| r.manifest.sequence >= u.sequence)
        {
            return;
        }
        if u.state == UpdateState::Retrying && u.attempts == 1 {
            log!(
                "cannot fetch the bundle of sequence {} yet ({}); retrying",
                u.sequence,
                u.error
            );
        }
        self.update = Some(u);
        self.publish();
    }

    fn publish(&self) {
        self.hb.send_replace(self.heartbeat());
    }

    fn on_release(&mut self, rel: Release) {
        let mut spec = RunSpec::of(&rel);
        if self.rejected.as_deref() == Some(spec.sha.as_str()) {
            // A newer publication of a bundle that crash-looped here (a master restart, say):
            // follow its master and arguments, but keep running the last good code.
            if let Some(good) = &self.last_good {
                spec = RunSpec::code_from(good, &spec);
            }
        } else {
            self.rejected = None;
        }
        match &mut self.current {
            Some(g) if g.spec.same_workers(&spec) => {
                g.spec.sequence = spec.sequence;
                self.status = NodeStatus::Running;
            }
            _ => {
                self.status = NodeStatus::Starting;
                self.switch_to(spec);
            }
        }
        if self
            .update
            .as_ref()
            .is_some_and(|u| u.sequence <= rel.manifest.sequence)
        {
            self.update = None;
        }
        self.latest = Some(rel);
        self.publish();
    }

    /// Rolls back from the current generation's bundle to the last good one, if there is one.
    fn roll_back(&mut self, why: String) {
        let Some(cur) = &self.current else { return };
        let bad = cur.spec.sha.clone();
        log!("bundle {} rejected: {why}", short(&bad));
        self.rejected = Some(bad.clone());
        self.last_error = Some(format!("bundle {} rejected: {why}", short(&bad)));
        // An overlap still in progress means the old workers never stopped: keep them.
        if let Some((old, _)) = self.draining.take() {
            if old.spec.sha != bad {
                let failed = self.current.replace(old).expect("current");
                tokio::spawn(failed.set.stop());
                self.status = NodeStatus::RolledBack;
                self.publish();
                return;
            }
            tokio::spawn(old.set.stop());
        }
        match self.last_good.clone() {
            Some(good) if good.manifest.bundle.sha256 != bad => {
                let spec = RunSpec::code_from(&good, &self.current.as_ref().expect("current").spec);
                let failed = self.current.take().expect("current");
                tokio::spawn(failed.set.stop());
                let g = self.launch(spec);
                self.current = Some(g);
                self.status = NodeStatus::RolledBack;
            }
            _ => self.status = NodeStatus::CrashLoop,
        }
        self.publish();
    }

    fn on_exit(&mut self, e: Exit) {
        let Some(cur) = &mut self.current else { return };
        if cur.set.generation != e.generation {
            return;
        }
        cur.exits += 1;
        log!(
            "worker {} of bundle {} exited ({}); restarting",
            e.index,
            short(&cur.spec.sha),
            e.status
        );
        let young = cur.started.elapsed() < Duration::from_millis(self.cfg.stable_ms);
        let proven = self
            .last_good
            .as_ref()
            .map(|g| g.manifest.bundle.sha256 == cur.spec.sha)
            .unwrap_or(false);
        if young
            && !proven
            && cur.exits >= self.cfg.crash_loop_exits.max(1)
            && self.status != NodeStatus::CrashLoop
        {
            let why = format!(
                "workers crash-looped ({} exits in {:.1}s, last: {})",
                cur.exits,
                cur.started.elapsed().as_secs_f64(),
                e.status
            );
            self.roll_back(why);
        } else {
            self.publish();
        }
    }

    /// A worker of `generation` joined the master: once every worker of the current
    /// generation has, the overlap ends at once (the old generation is stopped).
    fn on_joined(&mut self, generation: u64) {
        let Some(cur) = &self.current else { return };
        if cur.set.generation != generation
            || !cur
                .set
                .reports()
                .iter()
                .all(|r| r.state == fleet_common::wire::WorkerState::Running)
        {
            return;
        }
        if let Some((old, _)) = self.draining.take() {
            log!(
                "new workers joined the master after {:.2}s; stopping the previous generation",
                cur.started.elapsed().as_secs_f64()
            );
            tokio::spawn(old.set.stop());
        }
        if self.status == NodeStatus::Starting {
            self.status = NodeStatus::Running;
        }
        self.publish();
    }

    /// Called at each deadline: end overlaps and promote stable generations.
    fn on_tick(&mut self) {
        let now = Instant::now();
        if let Some((_, deadline)) = &self.draining {
            if now >= *deadline {
                let cur = self.current.as_ref().expect("current during drain");
                if cur.exits >= cur.workers && cur.set.alive() == 0 {
                    self.roll_back("every new worker exited during its join grace".into());
                } else {
                    let (old, _) = self.draining.take().expect("draining");
                    tokio::spawn(old.set.stop());
                    if self.status == NodeStatus::Starting {
                        self.status = NodeStatus::Running;
                    }
                }
                self.publish();
            }
        }
        if let Some(cur) = &self.current {
            // A first start has no overlap to end: it is running once its join grace passed.
            let joined = cur.started.elapsed() >= Duration::from_millis(self.cfg.join_grace_ms);
            if joined && self.draining.is_none() && self.status == NodeStatus::Starting {
                self.status = NodeStatus::Running;
                self.publish();
            }
        }
        if let Some(cur) = &self.current {
            let stable = cur.started.elapsed() >= Duration::from_millis(self.cfg.stable_ms);
            if stable && self.draining.is_none() && self.needs_promotion() {
                let sha = cur.spec.sha.clone();
                let rel = self.latest.clone().expect("needs_promotion checked it");
                match self.store.save_last_good(&rel) {
                    Ok(()) => log!(
                        "bundle {} (sequence {}) is now the last good one",
                        short(&sha),
                        rel.manifest.sequence
                    ),
                    Err(e) => log!("cannot save last good state: {e}"),
                }
                self.last_good = Some(rel);
                self.store.gc(&[&sha]);
                self.publish();
            }
        }
    }

    /// Whether the latest manifest runs here but is not yet the saved last good one. The
    /// comparison is by sequence, not only by bundle: a republication of the same bundle for a
    /// restarted master (new epoch) must replace the saved manifest, or an agent restarted
    /// offline would point its workers at the old master.
    fn needs_promotion(&self) -> bool {
        let (Some(cur), Some(latest)) = (&self.current, &self.latest) else {
            return false;
        };
        self.status != NodeStatus::CrashLoop
            && latest.manifest.bundle.sha256 == cur.spec.sha
            && RunSpec::of(latest).same_workers(&cur.spec)
            && self
                .last_good
                .as_ref()
                .is_none_or(|g| g.manifest.sequence != latest.manifest.sequence)
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut d = self.draining.as_ref().map(|(_, t)| *t);
        if let Some(cur) = &self.current {
            if self.status == NodeStatus::Starting && self.draining.is_none() {
                let t = cur.started + Duration::from_millis(self.cfg.join_grace_ms);
                d = Some(d.map_or(t, |x| x.min(t)));
            }
            if self.needs_promotion() {
                let t = cur.started + Duration::from_millis(self.cfg.stable_ms);
                d = Some(d.map_or(t, |x| x.min(t)));
            }
        }
        d
    }

    async fn stop_all(&mut self) {
        if let Some((old, _)) = self.draining.take() {
            old.set.stop().await;
        }
        if let Some(cur) = self.current.take() {
            cur.set.stop().await;
        }
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// How long until the node's max lifetime ends. On EC2 the lifetime is the node's, counted
/// from boot, so an agent restarted by systemd (or crash-looping) cannot put the power-off
/// off; elsewhere (local agents share a long-running machine) it counts from the agent's start.
pub fn lifetime_left(max: Duration, backend: &str, uptime: Option<Duration>) -> Duration {
    match (backend, uptime) {
        ("ec2" | "asg", Some(up)) => max.saturating_sub(up),
        _ => max,
    }
}

/// How long this node (its PID 1, so a container's own boot too) has been up: the system's
/// uptime less PID 1's start time (`/proc/1/stat` field 22, in USER_HZ ticks, 100 on Linux).
fn node_uptime() -> Option<Duration> {
    const USER_HZ: f64 = 100.0;
    let up: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string("/proc/1/stat").ok()?;
    let start: f64 = stat
        .rsplit(')')
        .next()?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    Some(Duration::from_secs_f64((up - start / USER_HZ).max(0.0)))
}

pub fn default_node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "fleet-agent".into())
}

/// Runs the agent until SIGTERM/SIGINT (exit 0) or its max lifetime (power-off).
pub async fn run(cfg: Config, node_id: String) -> Result<(), String> {
    let cfg = Arc::new(cfg);
    let ca = cfg.ca_pem()?;
    let token = cfg.token()?;
    let client = Client::new(&cfg.controller, &ca, Some(&format!("Bearer {token}")))
        .map_err(|e| e.to_string())?;
    std::fs::create_dir_all(cfg.state_dir.join("bundles"))
        .map_err(|e| format!("cannot create state_dir {}: {e}", cfg.state_dir.display()))?;
    let store = Arc::new(Store {
        dir: cfg.state_dir.clone(),
    });
    let vk = cfg.verify_key();
    let last_good = match store.load_last_good(&vk) {
        Ok(r) => r,
        Err(e) => {
            log!("ignoring saved state: {e}");
            None
        }
    };

    let (exits_tx, mut exits_rx) = mpsc::unbounded_channel();
    let (poll_tx, mut poll_rx) = mpsc::unbounded_channel();
    let (hb_tx, hb_rx) = watch::channel(Heartbeat {
        node_id: node_id.clone(),
        backend: cfg.backend.clone(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        running: None,
        last_good: None,
        workers: vec![],
        status: NodeStatus::Waiting,
        last_error: None,
        rejected: None,
        uptime_s: 0,
        update: None,
        seen_sequence: None,
    });
    let mut agent = Agent {
        cfg: cfg.clone(),
        node_id,
        store: store.clone(),
        exits_tx,
        current: None,
        draining: None,
        last_good: last_good.clone(),
        latest: None,
        rejected: None,
        update: None,
        status: NodeStatus::Waiting,
        last_error: None,
        next_gen: 0,
        started: Instant::now(),
        hb: hb_tx,
    };
    log!(
        "node {} following {} (state in {})",
        agent.node_id,
        cfg.controller,
        cfg.state_dir.display()
    );
    if let Some(good) = &last_good {
        // Start from disk at once; the controller's current manifest replaces it if newer.
        agent.latest = Some(good.clone());
        let spec = RunSpec::of(good);
        agent.status = NodeStatus::OfflineFallback;
        agent.switch_to(spec);
        agent.publish();
    }

    let poll_tx_hb = poll_tx.clone();
    tokio::spawn(poller(
        client.clone(),
        cfg.clone(),
        store,
        last_good.map(|r| r.manifest.sequence),
        poll_tx,
    ));
    tokio::spawn(heartbeats(client, hb_rx, poll_tx_hb));

    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut hb_tick = tokio::time::interval(Duration::from_millis(cfg.heartbeat_ms.max(100)));
    let uptime = node_uptime();
    let lifetime_end = cfg
        .max_lifetime_s
        .map(|s| TokioInstant::now() + lifetime_left(Duration::from_secs(s), &cfg.backend, uptime));

    loop {
        let deadline = agent.next_deadline().map(TokioInstant::from_std);
        tokio::select! {
            Some(p) = poll_rx.recv() => match p {
                Poll::Release(rel) => agent.on_release(*rel),
                Poll::Update(u) => agent.on_update(u),
                Poll::Refused(line) => {
                    log!("{line}");
                    agent.last_error = Some(line);
                    agent.publish();
                }
                Poll::Unreachable(line) => {
                    log!("controller unreachable ({line}); keeping the current workers and retrying");
                    if agent.current.is_none() {
                        agent.status = NodeStatus::Waiting;
                    } else if agent.status == NodeStatus::Running {
                        agent.status = NodeStatus::OfflineFallback;
                    }
                    agent.last_error = Some(line);
                    agent.publish();
                }
                Poll::Reachable => {
                    if agent.status == NodeStatus::OfflineFallback {
                        agent.status = NodeStatus::Running;
                    }
                    agent.publish();
                }
            },
            Some(e) = exits_rx.recv() => match e {
                Event::Exit(e) => agent.on_exit(e),
                Event::Joined { generation, .. } => agent.on_joined(generation),
            },
            _ = async { sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => agent.on_tick(),
            _ = hb_tick.tick() => agent.publish(),
            _ = sigterm.recv() => {
                log!("SIGTERM: stopping workers");
                agent.stop_all().await;
                return Ok(());
            }
            _ = sigint.recv() => {
                log!("SIGINT: stopping workers");
                agent.stop_all().await;
                return Ok(());
            }
            _ = async { sleep_until(lifetime_end.expect("guarded")).await }, if lifetime_end.is_some() => {
                log!("max lifetime reached: stopping workers and powering off");
                agent.stop_all().await;
                let cmd = &cfg.poweroff_command;
                let st = tokio::process::Command::new(&cmd[0]).args(&cmd[1..]).status().await;
                return match st {
                    Ok(s) if s.success() => Ok(()),
                    Ok(s) => Err(format!("power-off command {:?} failed: {}", cmd, crate::supervisor::describe(s))),
                    Err(e) => Err(format!("power-off command {:?} failed: {e}", cmd)),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_a_cap_with_at_most_half_again_of_jitter() {
        let mut b = Backoff::new();
        assert_eq!(b.step(0.0), RETRY_INITIAL);
        assert_eq!(b.step(0.0), RETRY_INITIAL * 2);
        let waits: Vec<Duration> = (0..10).map(|_| b.step(0.999)).collect();
        assert!(waits.iter().all(|w| *w < RETRY_MAX.mul_f64(1.5)));
        assert!(*waits.last().unwrap() >= RETRY_MAX, "{waits:?}");
        assert_eq!(Backoff::new().step(1.0), RETRY_INITIAL.mul_f64(1.5));
    }

    #[test]
    fn a_transient_failure_keeps_the_sequence_open_and_counts_attempts() {
        let mut s = Seen {
            floor: Some(40),
            update: None,
        };
        let reset = FetchError::Transient("connection reset".into());
        s.fetched(41, "aa", Err(&reset));
        s.fetched(41, "aa", Err(&reset));
        assert_eq!(s.floor, Some(40), "41 is asked for again");
        let u = s.update.clone().unwrap();
        assert_eq!(
            (u.sequence, u.state, u.attempts),
            (41, UpdateState::Retrying, 2)
        );
        // A newer publication supersedes it: attempts start again.
        s.fetched(42, "bb", Err(&reset));
        assert_eq!(s.update.as_ref().unwrap().attempts, 1);
        s.fetched(42, "bb", Ok(()));
        assert_eq!(
            s,
            Seen {
                floor: Some(42),
                update: None
            }
        );
    }

    #[test]
    fn only_a_refusal_uses_up_a_sequence() {
        let mut s = Seen::default();
        s.fetched(7, "cc", Err(&FetchError::Refused("sha256 mismatch".into())));
        assert_eq!(s.floor, Some(7));
        let u = s.update.unwrap();
        assert_eq!((u.sequence, u.state), (7, UpdateState::Refused));
        assert_eq!(u.error, "sha256 mismatch");
    }

    #[test]
    fn the_lifetime_of_an_ec2_node_counts_from_boot() {
        let h = Duration::from_secs(3600);
        let up = Some(Duration::from_secs(600));
        assert_eq!(lifetime_left(h, "ec2", up), Duration::from_secs(3000));
        assert_eq!(
            lifetime_left(h, "asg", Some(Duration::from_secs(7200))),
            Duration::ZERO
        );
        assert_eq!(
            lifetime_left(h, "local", up),
            h,
            "a local agent counts from its own start"
        );
        assert_eq!(
            lifetime_left(h, "ec2", None),
            h,
            "no /proc/uptime: from the agent's start"
        );
    }
}
