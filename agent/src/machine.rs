//! The agent's decisions, as a pure state machine: [`Machine::on_event`] takes what happened
//! (a poller message, a worker spawning, joining or exiting, a deadline) and the time, updates
//! the bookkeeping of the worker generations and returns the [`Effect`]s for the main loop to
//! carry out. Nothing here touches a process, a file or the clock, so every rule below is unit
//! tested with made-up instants:
//!
//! - **hot restart**: a new release starts a new generation next to the current one; the old
//!   one is stopped once every new worker joined the master, or at the join grace's end
//!   (docs/locust.md: overlap keeps the load up);
//! - **crash-loop rollback**: `crash_loop_exits` worker exits within `stable_ms` of a
//!   generation's start reject its bundle; the workers go back to the last good bundle's code
//!   (against the current master), or the node reports `crash_loop` if there is none;
//! - **promotion**: a generation that ran `stable_ms` without a crash loop makes its release
//!   the last good one (saved to disk; older bundles are collected);
//! - **offline fallback**: an unreachable controller leaves the workers running;
//! - **max lifetime**: at its end the node powers off.
//!
//! The settings behind these rules are in docs/agent-config.md.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fleet_common::manifest::MasterAddr;
use fleet_common::wire::{Heartbeat, NodeStatus, Running, Update, UpdateState, WorkerReport};

use crate::poller::{Poll, PollError};
use crate::store::Release;
use crate::supervisor::{Exit, WorkerEvent};

/// A worker generation's id: grows by one with every launch.
pub type GenId = u64;

/// What a worker generation runs: a bundle against a master incarnation with arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSpec {
    pub sha: String,
    pub dir: PathBuf,
    pub locustfile: String,
    pub master: MasterAddr,
    pub epoch: u64,
    pub worker_args: Vec<String>,
    pub sequence: u64,
}

impl RunSpec {
    /// What `node_id`'s workers run for release `r`: with several masters listed, the one the
    /// node picks (rendezvous hashing on its id), with that master's epoch.
    pub fn of(r: &Release, node_id: &str) -> RunSpec {
        let m = &r.manifest;
        let (master, epoch) = m.master_for(node_id);
        RunSpec {
            sha: m.bundle.sha256.clone(),
            dir: r.dir.clone(),
            locustfile: m.locustfile.clone(),
            master,
            epoch,
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

    /// Whether workers running `self` are already right for `other`.
    fn same_workers(&self, other: &RunSpec) -> bool {
        self.sha == other.sha
            && self.locustfile == other.locustfile
            && self.master == other.master
            && self.epoch == other.epoch
            && self.worker_args == other.worker_args
    }
}

/// The settings the decisions depend on (docs/agent-config.md).
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_id: String,
    pub backend: String,
    /// Workers per generation.
    pub workers: u32,
    pub join_grace: Duration,
    pub stable: Duration,
    pub crash_loop_exits: u32,
    /// When the node powers off, if it has a max lifetime.
    pub lifetime_end: Option<Instant>,
}

/// What happened.
#[derive(Debug)]
pub enum Event {
    Poll(Poll),
    Worker(WorkerEvent),
    /// A deadline from [`Machine::next_deadline`] passed.
    Tick,
}

/// What the main loop must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Start `settings.workers` workers of a new generation.
    Launch {
        generation: GenId,
        spec: RunSpec,
    },
    /// Stop a generation's workers (SIGTERM, grace, SIGKILL) without waiting for them.
    Stop(GenId),
    /// Save this release as the last good one.
    SaveLastGood(Box<Release>),
    /// Remove unpacked bundles other than this one.
    Gc {
        keep: String,
    },
    Log(String),
    /// The heartbeat changed: send it.
    Publish,
    /// The max lifetime is over: stop every worker, wait, and power off.
    PowerOff,
}

/// A worker slot as the machine last heard of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// No process: not spawned yet, or exited and waiting for its restart.
    Down,
    Starting,
    Joined,
}

#[derive(Debug)]
struct Gen {
    id: GenId,
    spec: RunSpec,
    started: Instant,
    exits: u32,
    slots: Vec<Slot>,
}

impl Gen {
    fn all_joined(&self) -> bool {
        self.slots.iter().all(|s| *s == Slot::Joined)
    }

    fn alive(&self) -> usize {
        self.slots.iter().filter(|s| **s != Slot::Down).count()
    }
}

#[derive(Debug)]
pub struct Machine {
    settings: Settings,
    current: Option<Gen>,
    /// The previous generation during a hot restart's overlap, and when to stop it.
    draining: Option<(Gen, Instant)>,
    last_good: Option<Release>,
    /// The newest release the controller published that this agent accepted.
    latest: Option<Release>,
    /// The bundle (sha256) whose workers crash-looped here.
    rejected: Option<String>,
    /// A newer publication the poller is retrying or refused.
    update: Option<Update>,
    status: NodeStatus,
    last_error: Option<String>,
    next_gen: GenId,
    started: Instant,
    out: Vec<Effect>,
}

pub fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

impl Machine {
    /// A machine starting at `now`, from the last good release on disk if there is one: its
    /// workers start at once (`offline_fallback` until the controller answers), and the
    /// controller's current manifest replaces it if newer.
    pub fn start(
        settings: Settings,
        last_good: Option<Release>,
        now: Instant,
    ) -> (Machine, Vec<Effect>) {
        let mut m = Machine {
            settings,
            current: None,
            draining: None,
            last_good: last_good.clone(),
            latest: None,
            rejected: None,
            update: None,
            status: NodeStatus::Waiting,
            last_error: None,
            next_gen: 0,
            started: now,
            out: vec![],
        };
        if let Some(good) = last_good {
            m.status = NodeStatus::OfflineFallback;
            let spec = RunSpec::of(&good, &m.settings.node_id);
            m.switch_to(spec, now);
            m.latest = Some(good);
            m.emit(Effect::Publish);
        }
        let fx = std::mem::take(&mut m.out);
        (m, fx)
    }

    pub fn on_event(&mut self, event: Event, now: Instant) -> Vec<Effect> {
        match event {
            Event::Poll(Poll::Release(rel)) => self.on_release(*rel, now),
            Event::Poll(Poll::Update(u)) => self.on_update(u),
            Event::Poll(Poll::Failed(e)) => self.on_poll_failed(e),
            Event::Poll(Poll::Reachable) => {
                if self.status == NodeStatus::OfflineFallback {
                    self.status = NodeStatus::Running;
                }
                self.emit(Effect::Publish);
            }
            Event::Worker(WorkerEvent::Spawned { generation, index }) => {
                self.set_slot(generation, index, Slot::Starting)
            }
            Event::Worker(WorkerEvent::Joined {
                generation, index, ..
            }) => self.on_joined(generation, index, now),
            Event::Worker(WorkerEvent::Exit(e)) => self.on_exit(e, now),
            Event::Tick => self.on_tick(now),
        }
        std::mem::take(&mut self.out)
    }

    /// The next instant at which [`Event::Tick`] has something to decide.
    pub fn next_deadline(&self) -> Option<Instant> {
        let grace = self.settings.join_grace;
        let first_start = self.current.as_ref().and_then(|cur| {
            (self.status == NodeStatus::Starting && self.draining.is_none())
                .then_some(cur.started + grace)
        });
        let promotion = self.current.as_ref().and_then(|cur| {
            self.needs_promotion()
                .then_some(cur.started + self.settings.stable)
        });
        [
            self.draining.as_ref().map(|(_, t)| *t),
            first_start,
            promotion,
            self.settings.lifetime_end,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The heartbeat at `now`; `live` gives the wall-clock start (ms since the epoch) and the
    /// worker reports of a generation, which only the supervisor knows.
    pub fn heartbeat(
        &self,
        now: Instant,
        live: impl FnOnce(GenId) -> (u64, Vec<WorkerReport>),
    ) -> Heartbeat {
        let (running, workers) = match &self.current {
            Some(g) => {
                let (since_ms, workers) = live(g.id);
                let running = Running {
                    sha256: g.spec.sha.clone(),
                    sequence: g.spec.sequence,
                    master_epoch: g.spec.epoch,
                    since_ms,
                };
                (Some(running), workers)
            }
            None => (None, vec![]),
        };
        Heartbeat {
            node_id: self.settings.node_id.clone(),
            backend: self.settings.backend.clone(),
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
            uptime_s: now.saturating_duration_since(self.started).as_secs(),
            update: self.update.clone(),
            seen_sequence: self.seen_sequence(),
        }
    }

    fn emit(&mut self, e: Effect) {
        self.out.push(e);
    }

    fn log(&mut self, line: String) {
        self.emit(Effect::Log(line));
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

    fn launch(&mut self, spec: RunSpec, now: Instant) -> Gen {
        self.next_gen += 1;
        let workers = self.settings.workers;
        self.log(format!(
            "starting {workers} worker(s) on bundle {} (sequence {}, master {}:{} epoch {})",
            short(&spec.sha),
            spec.sequence,
            spec.master.host,
            spec.master.port,
            spec.epoch
        ));
        self.emit(Effect::Launch {
            generation: self.next_gen,
            spec: spec.clone(),
        });
        Gen {
            id: self.next_gen,
            spec,
            started: now,
            exits: 0,
            slots: vec![Slot::Down; workers as usize],
        }
    }

    /// Switches the workers to `spec`: new generation first, the old one kept until the new
    /// workers joined or had their join grace.
    fn switch_to(&mut self, spec: RunSpec, now: Instant) {
        if let Some((old, _)) = self.draining.take() {
            // A switch during an overlap: the generation being drained is superseded at once.
            self.emit(Effect::Stop(old.id));
        }
        let new = self.launch(spec, now);
        if let Some(old) = self.current.replace(new) {
            self.draining = Some((old, now + self.settings.join_grace));
        }
    }

    fn on_release(&mut self, rel: Release, now: Instant) {
        let mut spec = RunSpec::of(&rel, &self.settings.node_id);
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
                self.switch_to(spec, now);
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
        self.emit(Effect::Publish);
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
            self.log(format!(
                "cannot fetch the bundle of sequence {} yet ({}); retrying",
                u.sequence, u.error
            ));
        }
        self.update = Some(u);
        self.emit(Effect::Publish);
    }

    fn on_poll_failed(&mut self, e: PollError) {
        let line = e.to_string();
        if let PollError::Unreachable(_) = e {
            self.log(format!(
                "controller unreachable ({line}); keeping the current workers and retrying"
            ));
            if self.current.is_none() {
                self.status = NodeStatus::Waiting;
            } else if self.status == NodeStatus::Running {
                self.status = NodeStatus::OfflineFallback;
            }
        } else {
            self.log(line.clone());
        }
        self.last_error = Some(line);
        self.emit(Effect::Publish);
    }

    fn gen_mut(&mut self, generation: GenId) -> Option<&mut Gen> {
        let draining = self.draining.as_mut().map(|(g, _)| g);
        self.current
            .as_mut()
            .into_iter()
            .chain(draining)
            .find(|g| g.id == generation)
    }

    fn set_slot(&mut self, generation: GenId, index: u32, to: Slot) {
        if let Some(s) = self
            .gen_mut(generation)
            .and_then(|g| g.slots.get_mut(index as usize))
        {
            *s = to;
        }
    }

    /// Rejects the current generation's bundle and goes back to the last good one, if any.
    fn roll_back(&mut self, why: String, now: Instant) {
        let Some(cur) = &self.current else { return };
        let bad = cur.spec.sha.clone();
        let line = format!("bundle {} rejected: {why}", short(&bad));
        self.log(line.clone());
        self.rejected = Some(bad.clone());
        self.last_error = Some(line);
        // An overlap still in progress means the old workers never stopped: keep them.
        if let Some((old, _)) = self.draining.take() {
            if old.spec.sha != bad {
                let failed = self.current.replace(old).expect("current");
                self.emit(Effect::Stop(failed.id));
                self.status = NodeStatus::RolledBack;
                self.emit(Effect::Publish);
                return;
            }
            self.emit(Effect::Stop(old.id));
        }
        match self.last_good.clone() {
            Some(good) if good.manifest.bundle.sha256 != bad => {
                let failed = self.current.take().expect("current");
                self.emit(Effect::Stop(failed.id));
                let g = self.launch(RunSpec::code_from(&good, &failed.spec), now);
                self.current = Some(g);
                self.status = NodeStatus::RolledBack;
            }
            _ => self.status = NodeStatus::CrashLoop,
        }
        self.emit(Effect::Publish);
    }

    fn on_exit(&mut self, e: Exit, now: Instant) {
        self.set_slot(e.generation, e.index, Slot::Down);
        let Some(cur) = &mut self.current else { return };
        if cur.id != e.generation {
            return;
        }
        cur.exits += 1;
        let line = format!(
            "worker {} of bundle {} exited ({}); restarting",
            e.index,
            short(&cur.spec.sha),
            e.status
        );
        let ran = now.saturating_duration_since(cur.started);
        let young = ran < self.settings.stable;
        let proven = self
            .last_good
            .as_ref()
            .is_some_and(|g| g.manifest.bundle.sha256 == cur.spec.sha);
        let crash_loop = young
            && !proven
            && cur.exits >= self.settings.crash_loop_exits.max(1)
            && self.status != NodeStatus::CrashLoop;
        let why = format!(
            "workers crash-looped ({} exits in {:.1}s, last: {})",
            cur.exits,
            ran.as_secs_f64(),
            e.status
        );
        self.log(line);
        if crash_loop {
            self.roll_back(why, now);
        } else {
            self.emit(Effect::Publish);
        }
    }

    /// A worker of `generation` joined the master: once every worker of the current
    /// generation has, the overlap ends at once (the old generation is stopped).
    fn on_joined(&mut self, generation: GenId, index: u32, now: Instant) {
        self.set_slot(generation, index, Slot::Joined);
        let Some(cur) = &self.current else { return };
        if cur.id != generation || !cur.all_joined() {
            return;
        }
        let after = now.saturating_duration_since(cur.started);
        if let Some((old, _)) = self.draining.take() {
            self.log(format!(
                "new workers joined the master after {:.2}s; stopping the previous generation",
                after.as_secs_f64()
            ));
            self.emit(Effect::Stop(old.id));
        }
        if self.status == NodeStatus::Starting {
            self.status = NodeStatus::Running;
        }
        self.emit(Effect::Publish);
    }

    /// Whatever is due at `now`: the end of the lifetime, of an overlap, of a first start's
    /// join grace, and promotion of a stable generation.
    fn on_tick(&mut self, now: Instant) {
        if self.settings.lifetime_end.is_some_and(|end| now >= end) {
            self.log("max lifetime reached: stopping workers and powering off".into());
            self.emit(Effect::PowerOff);
            return;
        }
        if let Some((_, deadline)) = &self.draining {
            if now >= *deadline {
                let cur = self.current.as_ref().expect("current during drain");
                if cur.exits >= self.settings.workers && cur.alive() == 0 {
                    self.roll_back("every new worker exited during its join grace".into(), now);
                } else {
                    let (old, _) = self.draining.take().expect("draining");
                    self.emit(Effect::Stop(old.id));
                    if self.status == NodeStatus::Starting {
                        self.status = NodeStatus::Running;
                    }
                }
                self.emit(Effect::Publish);
            }
        }
        if let Some(cur) = &self.current {
            // A first start has no overlap to end: it is running once its join grace passed.
            let joined = now.saturating_duration_since(cur.started) >= self.settings.join_grace;
            if joined && self.draining.is_none() && self.status == NodeStatus::Starting {
                self.status = NodeStatus::Running;
                self.emit(Effect::Publish);
            }
        }
        if let Some(cur) = &self.current {
            let stable = now.saturating_duration_since(cur.started) >= self.settings.stable;
            if stable && self.draining.is_none() && self.needs_promotion() {
                let sha = cur.spec.sha.clone();
                let rel = self.latest.clone().expect("needs_promotion checked it");
                self.emit(Effect::SaveLastGood(Box::new(rel.clone())));
                self.last_good = Some(rel);
                self.emit(Effect::Gc { keep: sha });
                self.emit(Effect::Publish);
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
            && RunSpec::of(latest, &self.settings.node_id).same_workers(&cur.spec)
            && self
                .last_good
                .as_ref()
                .is_none_or(|g| g.manifest.sequence != latest.manifest.sequence)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_common::client::ClientError;
    use fleet_common::manifest::{BundleRef, Manifest, Signed};

    const GRACE: Duration = Duration::from_secs(10);
    const STABLE: Duration = Duration::from_secs(15);

    fn settings() -> Settings {
        Settings {
            node_id: "n1".into(),
            backend: "static".into(),
            workers: 2,
            join_grace: GRACE,
            stable: STABLE,
            crash_loop_exits: 3,
            lifetime_end: None,
        }
    }

    /// A release of bundle `sha` (a made-up name, repeated to look like a digest) as
    /// publication `sequence` for master incarnation `epoch`.
    fn rel(sha: &str, sequence: u64, epoch: u64) -> Release {
        let sha = sha.repeat(64);
        Release {
            manifest: Manifest {
                format: fleet_common::manifest::FORMAT,
                fleet: "t".into(),
                sequence,
                bundle: BundleRef {
                    sha256: sha.clone(),
                    size: 1,
                },
                locustfile: "locustfile.py".into(),
                master: MasterAddr {
                    host: "10.0.0.5".into(),
                    port: 5557,
                },
                master_epoch: epoch,
                worker_args: vec![],
                created: String::new(),
                masters: vec![],
            },
            signed: Signed {
                bytes: vec![],
                signature: vec![],
            },
            dir: PathBuf::from("/state/bundles").join(sha),
        }
    }

    fn release(r: &Release) -> Event {
        Event::Poll(Poll::Release(Box::new(r.clone())))
    }

    fn exit(generation: GenId, index: u32) -> Event {
        Event::Worker(WorkerEvent::Exit(Exit {
            generation,
            index,
            status: "exit 1".into(),
        }))
    }

    fn spawned(generation: GenId, index: u32) -> Event {
        Event::Worker(WorkerEvent::Spawned { generation, index })
    }

    fn joined(generation: GenId, index: u32) -> Event {
        Event::Worker(WorkerEvent::Joined {
            generation,
            index,
            connected: true,
        })
    }

    fn unreachable() -> Event {
        Event::Poll(Poll::Failed(PollError::Unreachable(ClientError::Connect {
            addr: "10.0.0.5:8443".into(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        })))
    }

    fn launches(fx: &[Effect]) -> Vec<(GenId, String, u64)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Launch { generation, spec } => {
                    Some((*generation, spec.sha.clone(), spec.epoch))
                }
                _ => None,
            })
            .collect()
    }

    fn stops(fx: &[Effect]) -> Vec<GenId> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Stop(g) => Some(*g),
                _ => None,
            })
            .collect()
    }

    fn hb(m: &Machine, now: Instant) -> Heartbeat {
        m.heartbeat(now, |_| (0, vec![]))
    }

    /// A machine that started at `t0` from last good release `a` (generation 1), heard from
    /// the controller, and then got release `b` (generation 2, overlapping generation 1).
    fn overlapping(a: &Release, b: &Release, t0: Instant) -> Machine {
        let (mut m, fx) = Machine::start(settings(), Some(a.clone()), t0);
        assert_eq!(
            launches(&fx),
            vec![(1, a.manifest.bundle.sha256.clone(), 1)]
        );
        m.on_event(Event::Poll(Poll::Reachable), t0);
        let fx = m.on_event(release(b), t0);
        assert_eq!(launches(&fx).len(), 1);
        assert_eq!(stops(&fx), Vec::<GenId>::new(), "the old workers overlap");
        assert_eq!(m.status, NodeStatus::Starting);
        m
    }

    #[test]
    fn with_several_masters_the_node_runs_against_its_pick_and_only_its_epoch_restarts_it() {
        let mut rel = rel("a", 1, 1);
        rel.manifest.masters = (0..3)
            .map(|k| fleet_common::manifest::ShardAddr {
                host: "10.0.0.5".into(),
                port: 6000 + k,
                epoch: 1,
            })
            .collect();
        let mine = fleet_common::shard::pick("node-1", 3);
        let spec = RunSpec::of(&rel, "node-1");
        assert_eq!(spec.master.port, 6000 + mine as u16);
        // Another shard restarted: same workers here. This one restarted: new workers.
        let mut other = rel.clone();
        other.manifest.masters[(mine + 1) % 3].epoch = 2;
        assert!(RunSpec::of(&other, "node-1").same_workers(&spec));
        let mut own = rel.clone();
        own.manifest.masters[mine].epoch = 2;
        assert!(!RunSpec::of(&own, "node-1").same_workers(&spec));
    }

    #[test]
    fn one_master_becoming_two_moves_only_the_nodes_that_hash_to_the_new_one() {
        // `master.shards = "auto"` grew while serving: the manifest that carried `master`
        // alone now lists shard 0 (the same master, same epoch) and a new shard 1.
        let one = rel("a", 1, 3);
        let mut two = rel("a", 2, 3);
        two.manifest.masters = vec![
            fleet_common::manifest::ShardAddr {
                host: "10.0.0.5".into(),
                port: 5557,
                epoch: 3,
            },
            fleet_common::manifest::ShardAddr {
                host: "10.0.0.5".into(),
                port: 5558,
                epoch: 1,
            },
        ];
        let nodes: Vec<String> = (0..40).map(|i| format!("node-{i}")).collect();
        let mut moved = 0;
        for id in &nodes {
            let before = RunSpec::of(&one, id);
            let after = RunSpec::of(&two, id);
            match fleet_common::shard::pick(id, 2) {
                0 => assert!(after.same_workers(&before), "{id} stays: workers kept"),
                _ => {
                    assert!(!after.same_workers(&before), "{id} moves: new workers");
                    assert_eq!((after.master.port, after.epoch), (5558, 1));
                    moved += 1;
                }
            }
        }
        assert!(
            0 < moved && moved < nodes.len(),
            "{moved} of {}",
            nodes.len()
        );
        // The machine of a node that moves launches workers for the new master.
        let t0 = Instant::now();
        let id = nodes
            .iter()
            .find(|id| fleet_common::shard::pick(id, 2) == 1)
            .unwrap();
        let (mut m, _) = Machine::start(
            Settings {
                node_id: id.clone(),
                ..settings()
            },
            Some(one.clone()),
            t0,
        );
        m.on_event(Event::Poll(Poll::Reachable), t0);
        let fx = m.on_event(release(&two), t0);
        assert_eq!(
            launches(&fx),
            vec![(2, two.manifest.bundle.sha256.clone(), 1)]
        );
    }

    #[test]
    fn a_crash_loop_rolls_back_to_the_last_good_code_against_the_new_master() {
        let t0 = Instant::now();
        let (a, b) = (rel("a", 1, 1), rel("b", 2, 2));
        let mut m = overlapping(&a, &b, t0);
        m.on_event(joined(2, 0), t0 + Duration::from_secs(1));
        let fx = m.on_event(joined(2, 1), t0 + Duration::from_secs(1));
        assert_eq!(stops(&fx), vec![1]);
        m.on_event(exit(2, 0), t0 + Duration::from_secs(2));
        let fx = m.on_event(exit(2, 1), t0 + Duration::from_secs(3));
        assert!(launches(&fx).is_empty(), "two exits are restarts: {fx:?}");
        let fx = m.on_event(exit(2, 0), t0 + Duration::from_secs(4));
        assert_eq!(stops(&fx), vec![2]);
        // A's code, B's master incarnation.
        assert_eq!(
            launches(&fx),
            vec![(3, a.manifest.bundle.sha256.clone(), 2)]
        );
        let h = hb(&m, t0 + Duration::from_secs(4));
        assert_eq!(h.status, NodeStatus::RolledBack);
        assert_eq!(h.rejected, Some(b.manifest.bundle.sha256.clone()));
        assert!(h
            .last_error
            .unwrap()
            .contains("crash-looped (3 exits in 4.0s"));
    }

    #[test]
    fn a_crash_loop_during_the_overlap_keeps_the_old_workers() {
        let t0 = Instant::now();
        let (a, b) = (rel("a", 1, 1), rel("b", 2, 1));
        let mut m = overlapping(&a, &b, t0);
        for i in 0..3 {
            m.on_event(spawned(2, i % 2), t0);
            let fx = m.on_event(exit(2, i % 2), t0 + Duration::from_secs(1));
            if i == 2 {
                assert_eq!(stops(&fx), vec![2], "the new generation is stopped");
                assert!(launches(&fx).is_empty(), "the old one still runs: {fx:?}");
            }
        }
        assert_eq!(m.current.as_ref().map(|g| g.id), Some(1));
        assert_eq!(m.status, NodeStatus::RolledBack);
        assert!(m.draining.is_none());
    }

    #[test]
    fn a_crash_loop_with_no_last_good_bundle_is_reported_and_left_running() {
        let t0 = Instant::now();
        let a = rel("a", 1, 1);
        let (mut m, fx) = Machine::start(settings(), None, t0);
        assert!(fx.is_empty(), "nothing to run: {fx:?}");
        assert_eq!(hb(&m, t0).status, NodeStatus::Waiting);
        let fx = m.on_event(release(&a), t0);
        assert_eq!(launches(&fx).len(), 1);
        let mut fx = vec![];
        for i in 0..3 {
            fx = m.on_event(exit(1, 0), t0 + Duration::from_secs(i));
        }
        assert!(stops(&fx).is_empty() && launches(&fx).is_empty(), "{fx:?}");
        assert_eq!(m.status, NodeStatus::CrashLoop);
        assert_eq!(m.rejected, Some(a.manifest.bundle.sha256.clone()));
        // More exits are restarts of the same workers: no second rollback.
        let fx = m.on_event(exit(1, 1), t0 + Duration::from_secs(4));
        assert_eq!(fx.last(), Some(&Effect::Publish));
        assert_eq!(m.status, NodeStatus::CrashLoop);
        // And a crash-looping bundle never becomes the last good one.
        let fx = m.on_event(Event::Tick, t0 + STABLE * 2);
        assert!(!fx.iter().any(|e| matches!(e, Effect::SaveLastGood(_))));
        assert_eq!(m.next_deadline(), None);
    }

    #[test]
    fn exits_after_stable_ms_are_restarts_not_a_crash_loop() {
        let t0 = Instant::now();
        let (mut m, _) = Machine::start(settings(), None, t0);
        m.on_event(release(&rel("a", 1, 1)), t0);
        for i in 0..5 {
            m.on_event(exit(1, 0), t0 + STABLE + Duration::from_secs(i));
        }
        assert_eq!(m.status, NodeStatus::Starting);
        assert_eq!(m.rejected, None);
    }

    #[test]
    fn the_overlap_ends_once_every_new_worker_joined() {
        let t0 = Instant::now();
        let mut m = overlapping(&rel("a", 1, 1), &rel("b", 2, 1), t0);
        let t = t0 + Duration::from_secs(2);
        assert!(
            stops(&m.on_event(joined(1, 0), t)).is_empty(),
            "an old worker"
        );
        assert!(stops(&m.on_event(joined(2, 0), t)).is_empty(), "one of two");
        let fx = m.on_event(joined(2, 1), t);
        assert_eq!(stops(&fx), vec![1]);
        assert!(fx.contains(&Effect::Log(
            "new workers joined the master after 2.00s; stopping the previous generation".into()
        )));
        assert_eq!(m.status, NodeStatus::Running);
        assert_eq!(m.next_deadline(), Some(t0 + STABLE), "promotion is next");
    }

    #[test]
    fn a_worker_that_exited_after_joining_holds_the_overlap_until_it_joins_again() {
        let t0 = Instant::now();
        let mut m = overlapping(&rel("a", 1, 1), &rel("b", 2, 1), t0);
        let t = t0 + Duration::from_secs(1);
        m.on_event(joined(2, 0), t);
        m.on_event(exit(2, 0), t);
        m.on_event(spawned(2, 0), t);
        assert!(stops(&m.on_event(joined(2, 1), t)).is_empty());
        assert_eq!(stops(&m.on_event(joined(2, 0), t)), vec![1]);
    }

    #[test]
    fn the_overlap_ends_at_the_join_grace_whatever_joined() {
        let t0 = Instant::now();
        let mut m = overlapping(&rel("a", 1, 1), &rel("b", 2, 1), t0);
        m.on_event(spawned(2, 0), t0);
        m.on_event(spawned(2, 1), t0);
        assert_eq!(m.next_deadline(), Some(t0 + GRACE));
        let fx = m.on_event(Event::Tick, t0 + GRACE - Duration::from_millis(1));
        assert!(fx.is_empty(), "early: {fx:?}");
        let fx = m.on_event(Event::Tick, t0 + GRACE);
        assert_eq!(stops(&fx), vec![1]);
        assert_eq!(m.status, NodeStatus::Running);
    }

    #[test]
    fn new_workers_that_all_died_during_the_grace_are_rolled_back_at_its_end() {
        let t0 = Instant::now();
        let mut m = overlapping(&rel("a", 1, 1), &rel("b", 2, 1), t0);
        for i in 0..2 {
            m.on_event(spawned(2, i), t0);
            m.on_event(exit(2, i), t0 + Duration::from_secs(1));
        }
        let fx = m.on_event(Event::Tick, t0 + GRACE);
        assert_eq!(
            stops(&fx),
            vec![2],
            "the new generation goes, the old one stays"
        );
        assert_eq!(m.current.as_ref().map(|g| g.id), Some(1));
        assert_eq!(m.status, NodeStatus::RolledBack);
        assert!(m
            .last_error
            .as_deref()
            .unwrap()
            .ends_with("every new worker exited during its join grace"));
    }

    #[test]
    fn a_generation_that_ran_stable_ms_becomes_the_last_good_one() {
        let t0 = Instant::now();
        let a = rel("a", 1, 1);
        let (mut m, _) = Machine::start(settings(), None, t0);
        m.on_event(release(&a), t0);
        assert_eq!(
            m.next_deadline(),
            Some(t0 + GRACE),
            "a first start's join grace"
        );
        m.on_event(Event::Tick, t0 + GRACE);
        assert_eq!(m.status, NodeStatus::Running);
        assert_eq!(m.next_deadline(), Some(t0 + STABLE));
        let early = m.on_event(Event::Tick, t0 + STABLE - Duration::from_millis(1));
        assert!(early.is_empty(), "{early:?}");
        let fx = m.on_event(Event::Tick, t0 + STABLE);
        let sha = a.manifest.bundle.sha256.clone();
        assert_eq!(
            fx,
            vec![
                Effect::SaveLastGood(Box::new(a.clone())),
                Effect::Gc { keep: sha.clone() },
                Effect::Publish
            ]
        );
        assert_eq!(hb(&m, t0 + STABLE).last_good, Some(sha));
        assert_eq!(m.next_deadline(), None, "promoted once");
        // The same workers republished (a new sequence, same master) are promoted again, so
        // the saved manifest is the newest one.
        let fx = m.on_event(release(&rel("a", 2, 1)), t0 + STABLE);
        assert!(launches(&fx).is_empty(), "same workers: no restart");
        let fx = m.on_event(Event::Tick, t0 + STABLE);
        assert!(matches!(&fx[0], Effect::SaveLastGood(r) if r.manifest.sequence == 2));
    }

    #[test]
    fn an_unreachable_controller_is_offline_fallback_until_it_answers_again() {
        let t0 = Instant::now();
        let a = rel("a", 1, 1);
        let (mut m, _) = Machine::start(settings(), Some(a), t0);
        assert_eq!(
            m.status,
            NodeStatus::OfflineFallback,
            "from disk until it answers"
        );
        m.on_event(Event::Poll(Poll::Reachable), t0);
        assert_eq!(m.status, NodeStatus::Running);
        let fx = m.on_event(unreachable(), t0);
        assert!(stops(&fx).is_empty(), "the workers keep running");
        assert_eq!(m.status, NodeStatus::OfflineFallback);
        assert!(m.last_error.as_deref().unwrap().contains("cannot connect"));
        assert!(matches!(&fx[0], Effect::Log(l) if l.starts_with("controller unreachable (")));
        // A refused answer is an error, but not offline.
        m.on_event(Event::Poll(Poll::Reachable), t0);
        m.on_event(
            Event::Poll(Poll::Failed(PollError::Status { status: 500 })),
            t0,
        );
        assert_eq!(m.status, NodeStatus::Running);
        // With nothing running, unreachable is waiting.
        let (mut idle, _) = Machine::start(settings(), None, t0);
        idle.on_event(unreachable(), t0);
        assert_eq!(idle.status, NodeStatus::Waiting);
    }

    #[test]
    fn the_max_lifetime_ends_in_a_power_off() {
        let t0 = Instant::now();
        let hour = Duration::from_secs(3600);
        let s = Settings {
            lifetime_end: Some(t0 + hour),
            ..settings()
        };
        let (mut m, _) = Machine::start(s, None, t0);
        assert_eq!(m.next_deadline(), Some(t0 + hour));
        assert!(m.on_event(Event::Tick, t0 + hour / 2).is_empty());
        let fx = m.on_event(Event::Tick, t0 + hour);
        assert_eq!(fx.last(), Some(&Effect::PowerOff));
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

    #[test]
    fn a_rejected_bundle_republished_for_a_new_master_runs_the_last_good_code_there() {
        let t0 = Instant::now();
        let (a, b) = (rel("a", 1, 1), rel("b", 2, 1));
        let mut m = overlapping(&a, &b, t0);
        m.on_event(Event::Tick, t0 + GRACE);
        for i in 0..3 {
            m.on_event(exit(2, 0), t0 + GRACE + Duration::from_secs(i));
        }
        assert_eq!(m.status, NodeStatus::RolledBack);
        assert_eq!(m.current.as_ref().map(|g| g.id), Some(3));
        // The master restarted: B is published again for epoch 2.
        let fx = m.on_event(release(&rel("b", 3, 2)), t0 + STABLE * 2);
        assert_eq!(
            launches(&fx),
            vec![(4, a.manifest.bundle.sha256.clone(), 2)]
        );
        assert_eq!(
            m.rejected,
            Some(b.manifest.bundle.sha256.clone()),
            "still rejected"
        );
        // A new bundle is given its chance.
        let fx = m.on_event(release(&rel("c", 4, 2)), t0 + STABLE * 2);
        assert_eq!(launches(&fx), vec![(5, "c".repeat(64), 2)]);
        assert_eq!(m.rejected, None);
    }

    #[test]
    fn the_heartbeat_says_the_highest_sequence_seen_and_the_live_workers() {
        let t0 = Instant::now();
        let (mut m, _) = Machine::start(settings(), Some(rel("a", 4, 1)), t0);
        m.on_event(
            Event::Poll(Poll::Update(Update {
                sequence: 6,
                sha256: "d".repeat(64),
                state: UpdateState::Retrying,
                attempts: 1,
                error: "stalled".into(),
            })),
            t0,
        );
        let h = m.heartbeat(t0 + Duration::from_secs(7), |g| {
            assert_eq!(g, 1);
            (1234, vec![])
        });
        assert_eq!(h.seen_sequence, Some(6));
        assert_eq!(h.uptime_s, 7);
        let running = h.running.unwrap();
        assert_eq!((running.sequence, running.since_ms), (4, 1234));
    }
}
