//! The swarm keeper: follows the master's numbers and keeps the operator's test going.
//!
//! The recorded test ([`Desired::swarm`]) is what the operator asked for; only an explicit stop
//! (or the end of its `run_time`) clears it. Locust also goes idle without being asked: a
//! restarted master starts `ready`, and a master whose last worker quit stops the test
//! (`stopped`), as happens when every worker is swapped in a hot restart. In both cases the
//! test is started again once the workers are back (the count seen while it ran, stable for one
//! poll) or after [`RESWARM_WAIT`] with whatever joined. A running test whose user count drifts
//! is re-posted too: Locust re-dispatches the users of a quitting worker only for the first of
//! several quitting at once (measured with locust 2.47: swapping three workers left 3 of 6
//! users), and `/swarm` with the same numbers restores them (docs/locust.md, "Heartbeats,
//! failures and restarts").
//!
//! [`Keeper::decide`] is the whole policy, a pure function of what it remembers, the stats of
//! one poll, the recorded test and `now`; [`run`] polls, applies and posts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_common::wire::SwarmRequest;
use tokio::sync::watch;

use super::api::{LocustApi, Stats};
use super::Shared;

/// How often the keeper reads `/stats/requests` (Locust caches it ~2 s anyway).
const STATS_EVERY: Duration = Duration::from_secs(1);
/// After a master restart, how long to wait for the workers to come back before re-starting
/// the test with whatever joined.
const RESWARM_WAIT: Duration = Duration::from_secs(30);
/// How long a running test may have another user count than the one recorded before the
/// keeper re-posts it (longer than Locust's ~2 s stats cache).
const DRIFT_GRACE: Duration = Duration::from_secs(3);
/// After the operator starts or stops a test, how long the keeper trusts that over Locust's
/// (cached, ~2 s old) stats: more than twice the cache plus one poll.
const OPERATOR_GRACE: Duration = Duration::from_secs(6);
/// Least time between two `/swarm` posts of the keeper.
const POST_COOLDOWN: Duration = Duration::from_secs(4);

/// The test the operator asked for, as the keeper should keep it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Desired {
    pub swarm: Option<SwarmRequest>,
    /// When a test started with a `run_time` ends: it is not re-started after that.
    pub until: Option<Instant>,
    /// When the test last changed without the keeper seeing it in the stats (the operator
    /// started or stopped one, or its `run_time` ended). Locust's stats lag ~2 s behind, so for
    /// a while after that the keeper neither adopts a test it still sees running nor re-posts
    /// one it still sees idle.
    pub changed_at: Option<Instant>,
}

impl Desired {
    /// What the operator set at `now`, for `run_time` if Locust ends it by itself.
    pub fn set(swarm: Option<SwarmRequest>, run_time: Option<Duration>, now: Instant) -> Desired {
        Desired {
            swarm,
            until: run_time.map(|d| now + d),
            changed_at: Some(now),
        }
    }
}

/// What one poll decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    Nothing,
    /// The test's `run_time` is over: forget it, so it is not started again.
    Ended,
    /// A test someone started on the master directly is running: record it as it is.
    Adopt(SwarmRequest),
    /// Locust went idle under a recorded test and the workers are back: `POST /swarm` again.
    Restart {
        swarm: SwarmRequest,
        workers: u64,
    },
    /// The running test has `had` users instead of the recorded number: `POST /swarm` again.
    Restore {
        swarm: SwarmRequest,
        had: u64,
    },
}

impl Decision {
    /// The recorded test after this decision, when it changes it.
    pub fn apply(&self, d: &mut Desired, now: Instant) -> bool {
        match *self {
            Decision::Ended => *d = Desired::set(None, None, now),
            Decision::Adopt(swarm) => d.swarm = Some(swarm),
            _ => return false,
        }
        true
    }
}

/// What the keeper remembers between polls.
#[derive(Debug, Default)]
pub struct Keeper {
    /// Since when Locust is idle under a recorded test.
    idle_since: Option<Instant>,
    /// Since when the running test has another user count than the recorded one.
    drift_since: Option<Instant>,
    last_post: Option<Instant>,
    /// Worker count of the previous poll, and the one seen while the test last ran.
    last_workers: u64,
    workers_running: u64,
}

impl Keeper {
    /// Decides what to do about one poll's `stats`, given the recorded test.
    pub fn decide(&mut self, stats: &Stats, desired: &Desired, now: Instant) -> Decision {
        let decision = self.decide_inner(stats, desired, now);
        if matches!(
            decision,
            Decision::Restart { .. } | Decision::Restore { .. }
        ) {
            self.last_post = Some(now);
        }
        self.last_workers = stats.worker_count;
        decision
    }

    fn decide_inner(&mut self, stats: &Stats, desired: &Desired, now: Instant) -> Decision {
        if desired.until.is_some_and(|t| now >= t) {
            return Decision::Ended;
        }
        let settled = desired
            .changed_at
            .is_none_or(|t| now.duration_since(t) >= OPERATOR_GRACE);
        if stats.running() {
            self.workers_running = stats.worker_count;
        }
        let Some(swarm) = desired.swarm else {
            self.idle_since = None;
            self.drift_since = None;
            if stats.running() && stats.user_count > 0 && settled {
                return Decision::Adopt(SwarmRequest {
                    users: stats.user_count,
                    spawn_rate: stats.user_count as f64,
                });
            }
            return Decision::Nothing;
        };
        // Locust's stats are cached ~2 s: give a POST time to show before another.
        let cooled = settled
            && self
                .last_post
                .is_none_or(|t| now.duration_since(t) >= POST_COOLDOWN);
        if stats.idle() {
            self.drift_since = None;
            let since = *self.idle_since.get_or_insert(now);
            let workers = stats.worker_count;
            let back = workers >= self.workers_running.max(1) && workers == self.last_workers;
            if cooled && workers > 0 && (back || now.duration_since(since) >= RESWARM_WAIT) {
                return Decision::Restart { swarm, workers };
            }
            return Decision::Nothing;
        }
        self.idle_since = None;
        if stats.running() && stats.worker_count > 0 && stats.user_count != swarm.users {
            let since = *self.drift_since.get_or_insert(now);
            if cooled && now.duration_since(since) >= DRIFT_GRACE {
                self.drift_since = None;
                return Decision::Restore {
                    swarm,
                    had: stats.user_count,
                };
            }
            return Decision::Nothing;
        }
        self.drift_since = None;
        Decision::Nothing
    }
}

/// Polls the master until `stopping` turns true (a poll under way is dropped then).
pub async fn run(shared: Arc<Shared>, api: LocustApi, mut stopping: watch::Receiver<bool>) {
    let mut keeper = Keeper::default();
    loop {
        tokio::select! {
            _ = stopping.wait_for(|s| *s) => return,
            _ = async {
                tokio::time::sleep(STATS_EVERY).await;
                poll(&shared, &api, &mut keeper).await;
            } => {}
        }
    }
}

/// One poll: publishes the master's numbers, records what [`Keeper::decide`] says, and posts
/// the swarm it asks for.
async fn poll(shared: &Shared, api: &LocustApi, keeper: &mut Keeper) {
    let Ok(stats) = api.stats().await else {
        // A master that does not answer has no numbers: never show stale ones.
        shared.stats.send_replace(None);
        return;
    };
    shared.stats.send_replace(Some(stats.clone()));
    let now = Instant::now();
    let mut decision = Decision::Nothing;
    // Decided and applied under the one borrow, so an operator's change in between is never
    // overwritten by a decision made on the old record.
    let recorded = shared.desired.send_if_modified(|d| {
        decision = keeper.decide(&stats, d, now);
        decision.apply(d, now)
    });
    if recorded {
        shared.save();
    }
    post(api, decision).await;
}

async fn post(api: &LocustApi, decision: Decision) {
    match decision {
        Decision::Restart { swarm, workers } => match api.swarm(&swarm).await {
            Ok(()) => log!(
                "re-started the test: {} users at {}/s on {workers} workers",
                swarm.users,
                swarm.spawn_rate
            ),
            Err(e) => log!("cannot re-start the test: {e}"),
        },
        Decision::Restore { swarm, had } => match api.swarm(&swarm).await {
            Ok(()) => log!("restored the test to {} users (it had {had})", swarm.users),
            Err(e) => log!("cannot restore the test's users: {e}"),
        },
        Decision::Nothing | Decision::Ended | Decision::Adopt(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIX: SwarmRequest = SwarmRequest {
        users: 6,
        spawn_rate: 2.0,
    };

    fn stats(state: &str, users: u64, workers: u64) -> Stats {
        Stats {
            state: state.into(),
            user_count: users,
            worker_count: workers,
            ..Stats::default()
        }
    }

    /// A test recorded long enough ago that the keeper trusts Locust's numbers.
    fn recorded(swarm: Option<SwarmRequest>) -> Desired {
        Desired {
            swarm,
            ..Desired::default()
        }
    }

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn after_a_master_restart_the_test_restarts_once_the_workers_are_back_and_stable() {
        let (mut k, d, t0) = (Keeper::default(), recorded(Some(SIX)), Instant::now());
        assert_eq!(k.decide(&stats("running", 6, 3), &d, t0), Decision::Nothing);
        assert_eq!(
            k.decide(&stats("ready", 0, 1), &d, secs(t0, 1)),
            Decision::Nothing
        );
        // Three again, but just arrived: one more poll to be sure the count is stable.
        assert_eq!(
            k.decide(&stats("ready", 0, 3), &d, secs(t0, 2)),
            Decision::Nothing
        );
        assert_eq!(
            k.decide(&stats("ready", 0, 3), &d, secs(t0, 3)),
            Decision::Restart {
                swarm: SIX,
                workers: 3
            }
        );
    }

    #[test]
    fn workers_that_do_not_all_come_back_get_the_test_after_the_wait() {
        let (mut k, d, t0) = (Keeper::default(), recorded(Some(SIX)), Instant::now());
        k.decide(&stats("running", 6, 3), &d, t0);
        for s in 1..=30 {
            let got = k.decide(&stats("stopped", 0, 1), &d, secs(t0, s));
            assert_eq!(got, Decision::Nothing, "at {s} s");
        }
        assert_eq!(
            k.decide(&stats("stopped", 0, 1), &d, secs(t0, 31)),
            Decision::Restart {
                swarm: SIX,
                workers: 1
            }
        );
    }

    #[test]
    fn a_master_without_workers_is_never_swarmed() {
        let (mut k, d, t0) = (Keeper::default(), recorded(Some(SIX)), Instant::now());
        for s in 0..100 {
            let got = k.decide(&stats("ready", 0, 0), &d, secs(t0, s));
            assert_eq!(got, Decision::Nothing, "at {s} s");
        }
    }

    #[test]
    fn a_restart_that_does_not_show_yet_is_not_posted_again_before_the_cooldown() {
        let (mut k, d, t0) = (Keeper::default(), recorded(Some(SIX)), Instant::now());
        k.decide(&stats("ready", 0, 2), &d, t0);
        let again = Decision::Restart {
            swarm: SIX,
            workers: 2,
        };
        assert_eq!(k.decide(&stats("ready", 0, 2), &d, secs(t0, 1)), again);
        for s in 2..5 {
            let got = k.decide(&stats("ready", 0, 2), &d, secs(t0, s));
            assert_eq!(got, Decision::Nothing, "at {s} s");
        }
        assert_eq!(k.decide(&stats("ready", 0, 2), &d, secs(t0, 5)), again);
    }

    #[test]
    fn a_running_test_that_lost_users_is_restored_after_the_drift_grace() {
        let (mut k, d, t0) = (Keeper::default(), recorded(Some(SIX)), Instant::now());
        assert_eq!(k.decide(&stats("running", 3, 3), &d, t0), Decision::Nothing);
        assert_eq!(
            k.decide(&stats("running", 3, 3), &d, secs(t0, 2)),
            Decision::Nothing
        );
        assert_eq!(
            k.decide(&stats("running", 3, 3), &d, secs(t0, 3)),
            Decision::Restore { swarm: SIX, had: 3 }
        );
        // A drift that heals by itself starts the grace over.
        assert_eq!(
            k.decide(&stats("running", 6, 3), &d, secs(t0, 10)),
            Decision::Nothing
        );
        assert_eq!(
            k.decide(&stats("running", 5, 3), &d, secs(t0, 11)),
            Decision::Nothing
        );
        assert_eq!(
            k.decide(&stats("running", 5, 3), &d, secs(t0, 13)),
            Decision::Nothing
        );
    }

    #[test]
    fn a_test_started_on_the_master_directly_is_adopted_as_it_runs() {
        let (mut k, d, t0) = (Keeper::default(), recorded(None), Instant::now());
        let got = k.decide(&stats("running", 8, 2), &d, t0);
        assert_eq!(
            got,
            Decision::Adopt(SwarmRequest {
                users: 8,
                spawn_rate: 8.0
            })
        );
        let mut d = d;
        assert!(got.apply(&mut d, t0));
        assert_eq!(d.swarm.map(|s| s.users), Some(8));
        assert_eq!(
            k.decide(&stats("ready", 0, 0), &recorded(None), t0),
            Decision::Nothing
        );
    }

    #[test]
    fn for_a_while_after_the_operator_acts_the_keeper_trusts_the_operator_over_stale_stats() {
        let t0 = Instant::now();
        // Stopped by the operator, Locust's cached stats still say running: not adopted back.
        let stopped = Desired::set(None, None, t0);
        let mut k = Keeper::default();
        assert_eq!(
            k.decide(&stats("running", 6, 3), &stopped, secs(t0, 5)),
            Decision::Nothing
        );
        assert!(matches!(
            k.decide(&stats("running", 6, 3), &stopped, secs(t0, 6)),
            Decision::Adopt(_)
        ));
        // Started by the operator, the stats still say ready: not posted a second time.
        let started = Desired::set(Some(SIX), None, t0);
        let mut k = Keeper::default();
        for s in 1..6 {
            let got = k.decide(&stats("ready", 0, 2), &started, secs(t0, s));
            assert_eq!(got, Decision::Nothing, "at {s} s");
        }
        assert!(matches!(
            k.decide(&stats("ready", 0, 2), &started, secs(t0, 6)),
            Decision::Restart { .. }
        ));
    }

    #[test]
    fn a_test_whose_run_time_ended_is_forgotten_and_not_taken_back() {
        let t0 = Instant::now();
        let mut d = Desired::set(Some(SIX), Some(Duration::from_secs(60)), t0);
        let mut k = Keeper::default();
        assert_eq!(
            k.decide(&stats("running", 6, 3), &d, secs(t0, 59)),
            Decision::Nothing
        );
        let end = k.decide(&stats("running", 6, 3), &d, secs(t0, 60));
        assert_eq!(end, Decision::Ended);
        assert!(end.apply(&mut d, secs(t0, 60)));
        assert_eq!((d.swarm, d.until), (None, None));
        // Locust's cached stats still show it running for a moment: not adopted as new.
        assert_eq!(
            k.decide(&stats("running", 6, 3), &d, secs(t0, 62)),
            Decision::Nothing
        );
        // Then Locust has stopped it: nothing to restart.
        assert_eq!(
            k.decide(&stats("stopped", 0, 3), &d, secs(t0, 90)),
            Decision::Nothing
        );
    }

    #[test]
    fn only_adopting_and_ending_change_the_record() {
        let t0 = Instant::now();
        let mut d = recorded(Some(SIX));
        let posts = [
            Decision::Nothing,
            Decision::Restart {
                swarm: SIX,
                workers: 1,
            },
            Decision::Restore { swarm: SIX, had: 1 },
        ];
        for p in posts {
            assert!(!p.apply(&mut d, t0), "{p:?}");
            assert_eq!(d, recorded(Some(SIX)));
        }
    }
}
