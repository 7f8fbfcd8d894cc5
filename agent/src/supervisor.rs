//! Supervision of a set of worker processes.
//!
//! Each worker runs in a process group of its own, so stopping it reaches anything it spawned:
//! SIGTERM to the group, a grace period, then SIGKILL. A worker that exits, whatever its exit
//! code, is restarted after a capped exponential backoff (Locust workers orphaned by a master
//! restart exit 0 a minute later: docs/locust.md). Every spawn, join and exit is also reported
//! on a channel, so the agent can tell a crash loop from an occasional restart.
//!
//! A new worker counts as joined once it holds an established TCP connection to the master
//! (read from `/proc`: Locust's ZMQ socket connects from the worker process itself as soon as
//! its imports are done), or when the join grace runs out, whichever comes first. The agent
//! ends a hot restart's overlap on that event, so the old workers are stopped only once the
//! new ones are at the master, however long a loaded machine takes to import Locust.

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_common::child_env;
use fleet_common::process::{signal_group, stop_child, Signal};
use fleet_common::wire::{WorkerReport, WorkerState};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::procfs;

/// First restart delay; doubled on every consecutive quick exit up to [`BACKOFF_MAX`].
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// How long a worker that exited cleanly (exit 0) waits before its restart, unless it is
/// quick-exiting again (then the backoff applies, so a crash loop is still seen as one). Locust
/// workers exit 0 when their master quits them, which a master restart does; the manifest with
/// the new master's epoch follows within about a second and replaces them. Restarted at once,
/// they would join the new master on the old bundle and be stopped mid-start there.
pub const QUIT_HOLD: Duration = Duration::from_secs(3);

/// How long a worker waits before its restart: [`QUIT_HOLD`] after a clean exit that is not a
/// quick repeat (`backoff` still at its start), else `backoff`.
pub fn restart_delay(clean: bool, backoff: Duration) -> Duration {
    if clean && backoff == BACKOFF_INITIAL {
        QUIT_HOLD
    } else {
        backoff
    }
}

/// How often a starting worker's connections are looked at.
const JOIN_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct WorkerCmd {
    pub argv: Vec<String>,
    pub cwd: PathBuf,
    /// The worker's environment: these variables, on top of what [`child_env::inherited`]
    /// lets through from the agent's own (nothing else of it: a token given to the agent by
    /// env must not reach the spec).
    pub env: Vec<(String, String)>,
    /// Names or `PREFIX*` of the agent's variables the worker also gets (`worker_env_allow`).
    pub env_allow: Vec<String>,
    /// The worker's `HOME`, made (0700) before the first start when missing.
    pub home: Option<PathBuf>,
    /// The master's addresses: the worker has joined once it is connected to one of them.
    /// Empty: joined when the join grace has passed (stub workers).
    pub master: Vec<SocketAddr>,
}

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub join_grace: Duration,
    pub stop_grace: Duration,
    /// A worker that ran this long resets its backoff.
    pub stable: Duration,
}

/// One worker exit, as the agent's main loop sees it.
#[derive(Debug)]
pub struct Exit {
    pub generation: u64,
    pub index: u32,
    pub status: String,
}

/// What the workers tell the agent's main loop.
#[derive(Debug)]
pub enum WorkerEvent {
    /// A worker process was spawned (at first, or again after an exit).
    Spawned {
        generation: u64,
        index: u32,
    },
    Exit(Exit),
    /// A worker joined the master (or its join grace ran out: `connected` false).
    Joined {
        generation: u64,
        index: u32,
        connected: bool,
    },
}

#[derive(Debug, Clone)]
struct SlotStatus {
    pid: Option<u32>,
    state: WorkerState,
    restarts: u32,
    last_exit: Option<String>,
}

struct Slot {
    status: Arc<Mutex<SlotStatus>>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// The workers of one bundle generation.
pub struct WorkerSet {
    pub generation: u64,
    slots: Vec<Slot>,
}

pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown".into(),
    }
}

fn spawn(cmd: &WorkerCmd) -> std::io::Result<Child> {
    let mut c = Command::new(&cmd.argv[0]);
    c.args(&cmd.argv[1..])
        .current_dir(&cmd.cwd)
        .env_clear()
        .envs(child_env::inherited(std::env::vars_os(), &cmd.env_allow))
        .envs(cmd.env.iter().map(|(k, v)| (k, v)));
    if let Some(home) = &cmd.home {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(home)?;
        c.env("HOME", home);
    }
    c.stdin(Stdio::null()).process_group(0).kill_on_drop(false);
    c.spawn()
}

async fn run_slot(
    generation: u64,
    index: u32,
    cmd: WorkerCmd,
    timing: Timing,
    status: Arc<Mutex<SlotStatus>>,
    mut stop: oneshot::Receiver<()>,
    events: mpsc::UnboundedSender<WorkerEvent>,
) {
    let set = |f: &dyn Fn(&mut SlotStatus)| f(&mut status.lock().unwrap());
    let mut backoff = BACKOFF_INITIAL;
    loop {
        let started = Instant::now();
        let mut clean = false;
        let exit_line = match spawn(&cmd) {
            Err(e) => format!("spawn of {} failed: {e}", cmd.argv[0]),
            Ok(mut child) => {
                let pid = child.id().unwrap_or(0);
                set(&|s| {
                    s.pid = Some(pid);
                    s.state = WorkerState::Starting;
                });
                let _ = events.send(WorkerEvent::Spawned { generation, index });
                let grace = tokio::time::sleep(timing.join_grace);
                tokio::pin!(grace);
                let mut poll = tokio::time::interval(JOIN_POLL);
                let mut joined = false;
                loop {
                    tokio::select! {
                        _ = poll.tick(), if !joined && !cmd.master.is_empty() => {
                            if procfs::connected_to(pid, &cmd.master) {
                                joined = true;
                                set(&|s| s.state = WorkerState::Running);
                                let _ = events.send(WorkerEvent::Joined { generation, index, connected: true });
                            }
                        }
                        _ = &mut grace, if !joined => {
                            joined = true;
                            set(&|s| s.state = WorkerState::Running);
                            let _ = events.send(WorkerEvent::Joined { generation, index, connected: false });
                        }
                        r = child.wait() => {
                            signal_group(pid, Signal::SIGKILL);
                            break match r {
                                Ok(st) => {
                                    clean = st.success();
                                    describe(st)
                                }
                                Err(e) => format!("wait failed: {e}"),
                            };
                        }
                        _ = &mut stop => {
                            set(&|s| s.state = WorkerState::Stopping);
                            let st = stop_child(&mut child, pid, timing.stop_grace).await;
                            set(&|s| {
                                s.pid = None;
                                s.last_exit = st.map(describe);
                            });
                            return;
                        }
                    }
                }
            }
        };
        set(&|s| {
            s.pid = None;
            s.state = WorkerState::Backoff;
            s.last_exit = Some(exit_line.clone());
        });
        let _ = events.send(WorkerEvent::Exit(Exit {
            generation,
            index,
            status: exit_line,
        }));
        if started.elapsed() >= timing.stable {
            backoff = BACKOFF_INITIAL;
        }
        tokio::select! {
            _ = tokio::time::sleep(restart_delay(clean, backoff)) => {}
            _ = &mut stop => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
        set(&|s| s.restarts += 1);
    }
}

impl WorkerSet {
    pub fn start(
        generation: u64,
        cmds: Vec<WorkerCmd>,
        timing: Timing,
        events: mpsc::UnboundedSender<WorkerEvent>,
    ) -> WorkerSet {
        let slots = cmds
            .into_iter()
            .enumerate()
            .map(|(i, cmd)| {
                let status = Arc::new(Mutex::new(SlotStatus {
                    pid: None,
                    state: WorkerState::Starting,
                    restarts: 0,
                    last_exit: None,
                }));
                let (tx, rx) = oneshot::channel();
                let task = tokio::spawn(run_slot(
                    generation,
                    i as u32,
                    cmd,
                    timing,
                    status.clone(),
                    rx,
                    events.clone(),
                ));
                Slot {
                    status,
                    stop: Some(tx),
                    task,
                }
            })
            .collect();
        WorkerSet { generation, slots }
    }

    pub fn reports(&self) -> Vec<WorkerReport> {
        self.slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let st = s.status.lock().unwrap().clone();
                WorkerReport {
                    index: i as u32,
                    pid: st.pid,
                    state: st.state,
                    restarts: st.restarts,
                    last_exit: st.last_exit,
                }
            })
            .collect()
    }

    /// Workers with a live process right now.
    pub fn alive(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.status.lock().unwrap().pid.is_some())
            .count()
    }

    /// Stops every worker (SIGTERM, grace, SIGKILL) and waits until all are gone.
    pub async fn stop(mut self) {
        for s in &mut self.slots {
            if let Some(tx) = s.stop.take() {
                let _ = tx.send(());
            }
        }
        for s in self.slots {
            let _ = s.task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_common::process::alive;

    fn sh(script: &str) -> WorkerCmd {
        WorkerCmd {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            cwd: std::env::temp_dir(),
            env: vec![],
            env_allow: vec![],
            home: None,
            master: vec![],
        }
    }

    fn timing() -> Timing {
        Timing {
            join_grace: Duration::from_millis(50),
            stop_grace: Duration::from_millis(300),
            stable: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn workers_that_exit_are_restarted_whatever_the_code() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let set = WorkerSet::start(7, vec![sh("exit 0"), sh("exit 3")], timing(), tx);
        let mut seen = std::collections::HashSet::new();
        let mut exits = 0;
        while exits < 6 {
            let e = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            if let WorkerEvent::Exit(e) = e {
                assert_eq!(e.generation, 7);
                seen.insert((e.index, e.status));
                exits += 1;
            }
        }
        assert!(seen.contains(&(0, "exit 0".to_string())));
        assert!(seen.contains(&(1, "exit 3".to_string())));
        assert!(set.reports().iter().any(|r| r.restarts >= 1));
        set.stop().await;
    }

    #[test]
    fn a_clean_exit_waits_for_the_manifest_a_quick_repeat_or_a_crash_does_not() {
        assert_eq!(restart_delay(true, BACKOFF_INITIAL), QUIT_HOLD);
        assert_eq!(restart_delay(false, BACKOFF_INITIAL), BACKOFF_INITIAL);
        let repeat = BACKOFF_INITIAL * 2;
        assert_eq!(restart_delay(true, repeat), repeat);
        assert_eq!(restart_delay(false, BACKOFF_MAX), BACKOFF_MAX);
    }

    /// The times of `index`'s spawns.
    async fn spawns(
        rx: &mut mpsc::UnboundedReceiver<WorkerEvent>,
        index: u32,
        n: usize,
    ) -> Vec<Instant> {
        let mut at = vec![];
        while at.len() < n {
            let e = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .unwrap()
                .unwrap();
            if let WorkerEvent::Spawned { index: i, .. } = e {
                if i == index {
                    at.push(Instant::now());
                }
            }
        }
        at
    }

    #[tokio::test]
    async fn a_worker_quit_by_its_master_is_restarted_after_the_hold_and_a_crash_at_once() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let set = WorkerSet::start(1, vec![sh("sleep 0.2; exit 0")], timing(), tx);
        let at = spawns(&mut rx, 0, 3).await;
        let (first, second) = (at[1] - at[0], at[2] - at[1]);
        assert!(first >= QUIT_HOLD, "{first:?}");
        // A second quick clean exit is a repeat: the backoff, not the hold.
        assert!(second < QUIT_HOLD, "{second:?}");
        set.stop().await;

        let (tx, mut rx) = mpsc::unbounded_channel();
        let set = WorkerSet::start(2, vec![sh("sleep 0.2; exit 1")], timing(), tx);
        let at = spawns(&mut rx, 0, 2).await;
        assert!(at[1] - at[0] < QUIT_HOLD, "{:?}", at[1] - at[0]);
        set.stop().await;
    }

    #[tokio::test]
    async fn a_stop_during_the_hold_ends_the_worker_without_a_restart() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let set = WorkerSet::start(3, vec![sh("exit 0")], timing(), tx);
        spawns(&mut rx, 0, 1).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t0 = Instant::now();
        set.stop().await;
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        tokio::time::sleep(QUIT_HOLD).await;
        while let Ok(e) = rx.try_recv() {
            assert!(
                !matches!(e, WorkerEvent::Spawned { .. }),
                "restarted: {e:?}"
            );
        }
    }

    #[tokio::test]
    async fn stop_reaches_the_whole_process_group_and_kills_after_grace() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild");
        // The worker ignores SIGTERM and has a grandchild that does too.
        let script = format!(
            "trap '' TERM; sh -c 'trap \"\" TERM; echo $$ > {}; sleep 60' & sleep 60",
            pidfile.display()
        );
        let set = WorkerSet::start(1, vec![sh(&script)], timing(), tx);
        let mut grandchild = None;
        for _ in 0..100 {
            if let Ok(s) = std::fs::read_to_string(&pidfile) {
                if let Ok(p) = s.trim().parse::<u32>() {
                    grandchild = Some(p);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let grandchild = grandchild.expect("grandchild started");
        let leader = set.reports()[0].pid.unwrap();
        assert!(alive(leader) && alive(grandchild));
        let t = Instant::now();
        set.stop().await;
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "SIGKILL came before the grace period"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!alive(leader), "leader survived");
        assert!(!alive(grandchild), "grandchild survived");
    }

    /// The worker sees the allowlist, the variables the agent sets and its own HOME, and
    /// nothing else of the agent's environment (cargo sets `CARGO_*` for this test process).
    #[tokio::test]
    async fn a_worker_gets_a_cleared_environment_plus_the_allowlist() {
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let run = |env_allow: Vec<String>| {
            let (tx, _rx) = mpsc::unbounded_channel();
            let cmd = WorkerCmd {
                env: vec![("FLEET_WORKER_INDEX".into(), "0".into())],
                env_allow,
                home: Some(dir.path().join("home")),
                ..sh(&format!(
                    "env > {0}.tmp; mv {0}.tmp {0}; exec sleep 60",
                    out.display()
                ))
            };
            WorkerSet::start(1, vec![cmd], timing(), tx)
        };
        let read = || async {
            for _ in 0..100 {
                if let Ok(s) = std::fs::read_to_string(&out) {
                    std::fs::remove_file(&out).unwrap();
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("the worker wrote no environment");
        };
        let set = run(vec![]);
        let env = read().await;
        set.stop().await;
        let home = format!("HOME={}", dir.path().join("home").display());
        assert!(env.lines().any(|l| l == home), "{env}");
        assert!(env.lines().any(|l| l.starts_with("PATH=")), "{env}");
        assert!(env.lines().any(|l| l == "FLEET_WORKER_INDEX=0"), "{env}");
        assert!(!env.contains("CARGO_"), "{env}");
        assert!(dir.path().join("home").is_dir());
        let set = run(vec!["CARGO_MANIFEST_*".into()]);
        let env = read().await;
        set.stop().await;
        assert!(env.contains("CARGO_MANIFEST_DIR="), "{env}");
        assert!(!env.contains("CARGO_PKG_NAME="), "{env}");
    }

    #[tokio::test]
    async fn sigterm_is_enough_for_a_cooperative_worker() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let set = WorkerSet::start(1, vec![sh("exec sleep 60")], timing(), tx);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(set.alive(), 1);
        let t = Instant::now();
        set.stop().await;
        assert!(t.elapsed() < Duration::from_millis(300));
    }

    /// A worker joins when it connects to the master, long before the join grace ends; one
    /// that never connects joins when the grace ends.
    #[tokio::test]
    async fn join_is_the_connection_to_the_master_or_the_grace() {
        let master = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = master.local_addr().unwrap();
        let accept = std::thread::spawn(move || master.accept().map(|(s, _)| s));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let connects = WorkerCmd {
            argv: vec![
                "bash".into(),
                "-c".into(),
                format!(
                    "sleep 0.3; exec 3<>/dev/tcp/127.0.0.1/{}; exec sleep 60",
                    addr.port()
                ),
            ],
            cwd: std::env::temp_dir(),
            env: vec![],
            env_allow: vec![],
            home: None,
            master: vec![addr],
        };
        let silent = WorkerCmd {
            master: vec![addr],
            ..sh("exec sleep 60")
        };
        let t = Timing {
            join_grace: Duration::from_secs(3),
            ..timing()
        };
        let t0 = Instant::now();
        let set = WorkerSet::start(1, vec![connects, silent], t, tx);
        let mut joined = vec![];
        while joined.len() < 2 {
            match tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .unwrap()
                .unwrap()
            {
                WorkerEvent::Joined {
                    index, connected, ..
                } => joined.push((index, connected, t0.elapsed())),
                WorkerEvent::Spawned { .. } => {}
                WorkerEvent::Exit(e) => panic!("worker exited: {e:?}"),
            }
        }
        assert_eq!((joined[0].0, joined[0].1), (0, true), "{joined:?}");
        assert!(
            joined[0].2 < Duration::from_secs(2),
            "joined on the connection, not the grace: {joined:?}"
        );
        assert_eq!((joined[1].0, joined[1].1), (1, false), "{joined:?}");
        assert!(joined[1].2 >= Duration::from_secs(3), "{joined:?}");
        set.stop().await;
        drop(accept.join());
    }
}
