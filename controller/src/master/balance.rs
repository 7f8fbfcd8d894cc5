//! Shards share one test: the operator's users and spawn rate are split over the masters in
//! proportion to the workers each has connected, and split again when workers come and go
//! (a shard restarting loses its workers for a while; its share goes to the others and
//! comes back with them). Each shard's keeper then keeps its own share running.
//!
//! [`split`] and [`plan`] are pure; [`run`] applies the plan once a second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_common::wire::SwarmRequest;
use tokio::sync::watch;

use super::keeper::Desired;
use super::{Shard, Stats, Total};

/// How often the balancer looks at the shards' worker counts (the keepers' poll).
const EVERY: Duration = Duration::from_secs(1);

/// `total` split over shards with `workers` connected each: users by largest remainder, so the
/// shares add up to exactly the total; spawn rate in the same proportion. A shard that gets no
/// user gets `None`. With no worker anywhere, the shards share evenly.
pub fn split(total: &SwarmRequest, workers: &[u64]) -> Vec<Option<SwarmRequest>> {
    let n = workers.len();
    if n == 0 {
        return vec![];
    }
    let even = workers.iter().all(|w| *w == 0);
    let weight = |i: usize| if even { 1 } else { u128::from(workers[i]) };
    let sum: u128 = (0..n).map(weight).sum();
    let users = u128::from(total.users);
    let mut share: Vec<u128> = (0..n).map(|i| users * weight(i) / sum).collect();
    let left = users - share.iter().sum::<u128>();
    // The rest goes one by one to the largest remainders (ties: the lower shard).
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(users * weight(i) % sum), i));
    for &i in order.iter().take(left as usize) {
        share[i] += 1;
    }
    share
        .into_iter()
        .enumerate()
        .map(|(i, u)| {
            (u > 0).then(|| SwarmRequest {
                users: u as u64,
                spawn_rate: total.spawn_rate * weight(i) as f64 / sum as f64,
            })
        })
        .collect()
}

/// The shares to record, when the recorded ones no longer fit the connected workers: a shard
/// that has users and no workers (or workers and no users), shares that do not add up to the
/// total, or one more than 2 % of the total off its fair share (any user under 100: 8 users
/// left at 5 and 3 on 3 and 1 workers are 50 % too many on one). `None`: keep them (small
/// churn in a large test's worker counts does not move users around).
pub fn plan(
    total: &SwarmRequest,
    workers: &[u64],
    current: &[Option<SwarmRequest>],
) -> Option<Vec<Option<SwarmRequest>>> {
    let want = split(total, workers);
    let users = |s: &Option<SwarmRequest>| s.map_or(0, |s| s.users);
    let sum: u64 = current.iter().map(users).sum();
    let tolerance = total.users / 50;
    let off = want.len() != current.len()
        || sum != total.users
        || want
            .iter()
            .zip(current)
            .any(|(w, c)| w.is_some() != c.is_some() || users(w).abs_diff(users(c)) > tolerance);
    off.then_some(want)
}

/// Totals of the shards' numbers: users, workers and RPS summed; the failure ratio weighted by
/// RPS; the state the shards agree on, else `running` if any runs (`spawning` if any spawns).
pub fn sum_stats(all: &[Stats]) -> Stats {
    let Some(first) = all.first() else {
        return Stats::default();
    };
    let state = if all.iter().all(|s| s.state == first.state) {
        first.state.clone()
    } else if all.iter().any(|s| s.state == "running") {
        "running".into()
    } else if all.iter().any(|s| s.state == "spawning") {
        "spawning".into()
    } else {
        first.state.clone()
    };
    let rps: f64 = all.iter().map(|s| s.total_rps).sum();
    let fail_ratio = if rps > 0.0 {
        all.iter().map(|s| s.fail_ratio * s.total_rps).sum::<f64>() / rps
    } else {
        all.iter().map(|s| s.fail_ratio).fold(0.0, f64::max)
    };
    Stats {
        state,
        user_count: all.iter().map(|s| s.user_count).sum(),
        worker_count: all.iter().map(|s| s.worker_count).sum(),
        total_rps: rps,
        fail_ratio,
    }
}

/// Splits the recorded test again whenever [`plan`] says so, until `stopping`, over the shards
/// as they are at each step (a shard added while serving joins the split).
pub async fn run(
    shards: watch::Receiver<Arc<Vec<Shard>>>,
    total: Arc<watch::Sender<Total>>,
    mut stopping: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stopping.wait_for(|s| *s) => return,
            _ = async {
                tokio::time::sleep(EVERY).await;
                let now = shards.borrow().clone();
                step(&now, &total, Instant::now()).await;
            } => {}
        }
    }
}

async fn step(shards: &[Shard], total: &watch::Sender<Total>, now: Instant) {
    let t = *total.borrow();
    if t.until.is_some_and(|u| now >= u) {
        // Each shard's keeper ends its own share; only the total is left to forget.
        total.send_replace(Total::default());
        return;
    }
    let Some(swarm) = t.swarm else {
        return;
    };
    let workers: Vec<u64> = shards
        .iter()
        .map(|s| {
            s.shared
                .stats
                .borrow()
                .as_ref()
                .map_or(0, |s| s.worker_count)
        })
        .collect();
    let current: Vec<Option<SwarmRequest>> = shards
        .iter()
        .map(|s| s.shared.desired.borrow().swarm)
        .collect();
    let Some(shares) = plan(&swarm, &workers, &current) else {
        return;
    };
    let line: Vec<String> = shares
        .iter()
        .zip(&workers)
        .map(|(s, w)| format!("{} on {w}", s.map_or(0, |s| s.users)))
        .collect();
    log!(
        "test of {} users split again over the masters' workers: {}",
        swarm.users,
        line.join(", ")
    );
    for ((shard, share), was) in shards.iter().zip(shares).zip(current) {
        if share == was {
            continue;
        }
        match share {
            // The keeper re-posts a share that differs from what its master runs.
            Some(_) => shard.shared.desired.send_modify(|d| d.swarm = share),
            None => {
                let until = t.until.map(|u| u.saturating_duration_since(now));
                shard
                    .shared
                    .desired
                    .send_replace(Desired::set(None, until, now));
                if let Err(e) = shard.api.stop().await {
                    log!("cannot stop Locust master {}'s share: {e}", shard.index);
                }
            }
        }
        shard.shared.save();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn swarm(users: u64, rate: f64) -> SwarmRequest {
        SwarmRequest {
            users,
            spawn_rate: rate,
        }
    }

    fn users(v: &[Option<SwarmRequest>]) -> Vec<u64> {
        v.iter().map(|s| s.map_or(0, |s| s.users)).collect()
    }

    #[test]
    fn users_split_by_workers_and_add_up_exactly() {
        let got = split(&swarm(12_000, 300.0), &[400, 400, 400]);
        assert_eq!(users(&got), [4000, 4000, 4000]);
        assert!(got
            .iter()
            .all(|s| (s.unwrap().spawn_rate - 100.0).abs() < 1e-9));
        let got = split(&swarm(12_000, 300.0), &[400, 400, 200]);
        assert_eq!(users(&got), [4800, 4800, 2400]);
        assert!((got[2].unwrap().spawn_rate - 60.0).abs() < 1e-9);
        // Remainders: 10 over 3 equal shards gives the extra user to the lowest shard.
        assert_eq!(users(&split(&swarm(10, 1.0), &[1, 1, 1])), [4, 3, 3]);
        // 100 over 7, 5, 1: 53.8, 38.5, 7.7 -> the largest remainders round up.
        assert_eq!(users(&split(&swarm(100, 1.0), &[7, 5, 1])), [54, 38, 8]);
        for (u, w) in [
            (7u64, vec![3u64, 0, 9]),
            (1, vec![5, 5]),
            (12_345, vec![1, 2, 3, 4]),
        ] {
            let s = split(&swarm(u, 5.0), &w);
            assert_eq!(users(&s).iter().sum::<u64>(), u, "{u} over {w:?}");
            let rate: f64 = s.iter().flatten().map(|s| s.spawn_rate).sum();
            assert!(rate <= 5.0 + 1e-9, "{rate}");
        }
    }

    #[test]
    fn a_shard_without_workers_gets_nothing_and_no_workers_at_all_share_evenly() {
        let got = split(&swarm(12_000, 30.0), &[400, 0, 400]);
        assert_eq!(users(&got), [6000, 0, 6000]);
        assert_eq!(got[1], None);
        assert_eq!(users(&split(&swarm(9, 3.0), &[0, 0, 0])), [3, 3, 3]);
        // Fewer users than shards: some get none.
        assert_eq!(users(&split(&swarm(2, 2.0), &[1, 1, 1])), [1, 1, 0]);
    }

    #[test]
    fn shares_move_when_workers_come_and_go_but_not_for_small_churn() {
        let total = swarm(12_000, 300.0);
        let even = split(&total, &[400, 400, 400]);
        assert_eq!(plan(&total, &[400, 400, 400], &even), None);
        assert_eq!(plan(&total, &[400, 399, 400], &even), None, "one worker");
        // Shard 1 restarted: its workers are gone, its users go to the others...
        let down = plan(&total, &[400, 0, 400], &even).expect("rebalanced");
        assert_eq!(users(&down), [6000, 0, 6000]);
        // ...and come back with its workers.
        let back = plan(&total, &[400, 400, 400], &down).expect("rebalanced");
        assert_eq!(users(&back), [4000, 4000, 4000]);
        // Half its workers back is more than 2 % off.
        assert!(plan(&total, &[400, 200, 400], &down).is_some());
        // A small test is split again for one user: a restart left 8 users at 5 and 3 when
        // the workers came back 3 and 1.
        let small = swarm(8, 8.0);
        let left = split(&small, &[4, 2]);
        assert_eq!(users(&left), [5, 3]);
        let back = plan(&small, &[3, 1], &left).expect("rebalanced");
        assert_eq!(users(&back), [6, 2]);
        assert_eq!(plan(&small, &[3, 1], &back), None);
        // Shares recorded for another total are split again.
        assert!(plan(&swarm(9000, 300.0), &[400, 400, 400], &even).is_some());
    }

    #[test]
    fn totals_sum_the_shards_and_weight_the_failure_ratio_by_rps() {
        let s = |state: &str, users, workers, rps, fail| Stats {
            state: String::from(state),
            user_count: users,
            worker_count: workers,
            total_rps: rps,
            fail_ratio: fail,
        };
        let t = sum_stats(&[
            s("running", 4000, 400, 300.0, 0.0),
            s("running", 4000, 400, 100.0, 0.04),
        ]);
        assert_eq!(
            (t.user_count, t.worker_count, t.total_rps),
            (8000, 800, 400.0)
        );
        assert!((t.fail_ratio - 0.01).abs() < 1e-12);
        assert_eq!(t.state, "running");
        let t = sum_stats(&[s("ready", 0, 0, 0.0, 0.0), s("running", 5, 1, 0.0, 0.0)]);
        assert_eq!(t.state, "running");
        assert_eq!(sum_stats(&[s("stopped", 0, 1, 0.0, 0.0)]).state, "stopped");
    }
}
