//! The EC2 launcher's decisions, kept free of the SDK so they are tested as plain functions.
//!
//! - [`Bucket`]: a client-side token bucket shaped on AWS's documented buckets (docs/ec2.md,
//!   "How a launch works"), adaptive: a `RequestLimitExceeded` empties it and halves its refill
//!   rate; every success creeps the rate back up. The launcher waits on its own buckets instead
//!   of letting the SDK's retries discover the limit.
//! - [`Pools`]: subnet × instance type, in the operator's order of preference, with the
//!   capacity each pool showed (an `InsufficientInstanceCapacity` benches a pool for a while;
//!   a partial fulfilment moves the next batch to another subnet first).
//! - [`next_batch`]: given what is left to launch, the pools and the budget, what to call next.

use std::time::{Duration, Instant};

/// How long a pool that answered `InsufficientInstanceCapacity` is left alone.
pub const ICE_BENCH: Duration = Duration::from_secs(60);
/// Smallest share of the refill rate an adaptive bucket falls to after throttles.
const MIN_RATE_FACTOR: f64 = 1.0 / 16.0;
/// Added to the rate factor on every success (so ~10 successes undo one halving).
const RATE_CREEP: f64 = 0.05;

/// A token bucket. `tokens` is our estimate of what AWS holds for us.
#[derive(Debug, Clone)]
pub struct Bucket {
    pub burst: f64,
    pub refill_per_s: f64,
    tokens: f64,
    factor: f64,
    at: Instant,
}

impl Bucket {
    pub fn new(burst: f64, refill_per_s: f64, now: Instant) -> Bucket {
        Bucket {
            burst,
            refill_per_s,
            tokens: burst,
            factor: 1.0,
            at: now,
        }
    }

    fn rate(&self) -> f64 {
        self.refill_per_s * self.factor
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate()).min(self.burst);
        self.at = now;
    }

    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    /// How long until `n` tokens are there (zero if they are).
    pub fn wait_for(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        let n = n.min(self.burst);
        if self.tokens >= n {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((n - self.tokens) / self.rate())
        }
    }

    pub fn take(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.tokens -= n;
    }

    /// Gives back tokens taken for work that was not done (a smaller launch than asked).
    pub fn give_back(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens + n).min(self.burst);
    }

    /// AWS said we are over the limit: our estimate was too high.
    pub fn throttled(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = 0.0;
        self.factor = (self.factor * 0.5).max(MIN_RATE_FACTOR);
    }

    /// AWS accepted a call: creep back toward the documented rate.
    pub fn succeeded(&mut self) {
        self.factor = (self.factor + RATE_CREEP).min(1.0);
    }

    /// Sets the estimate to what AWS just showed us it holds (after a partial launch).
    pub fn observed_empty(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = self.tokens.min(0.0);
    }
}

/// The documented EC2 buckets (docs/ec2.md, "How a launch works"), optionally sped up for tests.
#[derive(Debug, Clone)]
pub struct Limits {
    pub run_requests: Bucket,
    pub run_instances: Bucket,
    pub terminate_requests: Bucket,
    pub terminate_instances: Bucket,
    pub describe: Bucket,
}

impl Limits {
    /// `time_scale` multiplies every refill rate (1.0 for AWS; tests run faster emulators).
    pub fn documented(time_scale: f64, now: Instant) -> Limits {
        let s = time_scale.max(f64::MIN_POSITIVE);
        Limits {
            run_requests: Bucket::new(5.0, 2.0 * s, now),
            run_instances: Bucket::new(1000.0, 2.0 * s, now),
            terminate_requests: Bucket::new(100.0, 5.0 * s, now),
            terminate_instances: Bucket::new(1000.0, 20.0 * s, now),
            describe: Bucket::new(100.0, 20.0 * s, now),
        }
    }
}

/// One place instances can be launched: a subnet (and its AZ) with an instance type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub subnet: String,
    pub az: String,
    pub instance_type: String,
}

#[derive(Debug, Clone)]
pub struct Pools {
    pools: Vec<Pool>,
    benched_until: Vec<Option<Instant>>,
    /// Round-robin position over subnets.
    next_subnet: usize,
    subnets: Vec<String>,
}

impl Pools {
    /// Subnets in order, each with the instance types in order of preference.
    pub fn new(subnets: &[(String, String)], types: &[String]) -> Pools {
        let mut pools = vec![];
        for (subnet, az) in subnets {
            for t in types {
                pools.push(Pool {
                    subnet: subnet.clone(),
                    az: az.clone(),
                    instance_type: t.clone(),
                });
            }
        }
        Pools {
            benched_until: vec![None; pools.len()],
            subnets: subnets.iter().map(|(s, _)| s.clone()).collect(),
            pools,
            next_subnet: 0,
        }
    }

    pub fn get(&self, i: usize) -> &Pool {
        &self.pools[i]
    }

    pub fn len(&self) -> usize {
        self.pools.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    fn usable(&self, i: usize, now: Instant) -> bool {
        self.benched_until[i].is_none_or(|t| now >= t)
    }

    /// Subnets with at least one usable pool.
    pub fn usable_subnets(&self, now: Instant) -> usize {
        self.subnets
            .iter()
            .filter(|s| {
                (0..self.pools.len()).any(|i| &self.pools[i].subnet == *s && self.usable(i, now))
            })
            .count()
    }

    /// The next pool to try: the next subnet in turn that has a usable pool, and in it the
    /// most preferred usable instance type.
    pub fn pick(&mut self, now: Instant) -> Option<usize> {
        for k in 0..self.subnets.len() {
            let s = &self.subnets[(self.next_subnet + k) % self.subnets.len()];
            if let Some(i) =
                (0..self.pools.len()).find(|i| &self.pools[*i].subnet == s && self.usable(*i, now))
            {
                self.next_subnet = (self.next_subnet + k + 1) % self.subnets.len();
                return Some(i);
            }
        }
        None
    }

    /// The pool said it has no capacity for this type: leave it alone for a while.
    pub fn bench(&mut self, i: usize, now: Instant) {
        self.benched_until[i] = Some(now + ICE_BENCH);
    }

    /// When the first benched pool comes back, if every pool is benched.
    pub fn all_benched_until(&self, now: Instant) -> Option<Instant> {
        if (0..self.pools.len()).any(|i| self.usable(i, now)) {
            return None;
        }
        self.benched_until.iter().flatten().min().copied()
    }
}

/// What the launcher does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Call RunInstances on this pool with MinCount 1 and MaxCount `count`.
    Launch {
        pool: usize,
        count: usize,
    },
    /// Nothing is possible before this long.
    Wait(Duration),
    /// Every pool is out of capacity.
    Exhausted,
    Done,
}

/// Decides the next RunInstances call: as many instances as the instance bucket holds (at most
/// `max_batch`, and at most this launch's `total` spread evenly over the usable subnets), once
/// a request token is there. It waits for a useful batch rather than trickling single instances: at least
/// what the bucket refills in `min_batch_window`, or what is left.
pub fn next_batch(
    remaining: usize,
    total: usize,
    pools: &mut Pools,
    limits: &mut Limits,
    max_batch: usize,
    min_batch_window: Duration,
    now: Instant,
) -> Step {
    if remaining == 0 {
        return Step::Done;
    }
    if pools.is_empty() || pools.all_benched_until(now).is_some() {
        return Step::Exhausted;
    }
    let subnets = pools.usable_subnets(now).max(1);
    let share = total
        .max(remaining)
        .div_ceil(subnets)
        .min(max_batch.max(1))
        .min(remaining);
    let floor = (limits.run_instances.rate() * min_batch_window.as_secs_f64())
        .ceil()
        .max(1.0) as usize;
    let want = share.min(floor.max(1)).min(remaining);
    let wait = limits
        .run_requests
        .wait_for(1.0, now)
        .max(limits.run_instances.wait_for(want as f64, now));
    if !wait.is_zero() {
        return Step::Wait(wait);
    }
    let have = limits.run_instances.available(now).floor().max(0.0) as usize;
    let count = share.min(have).max(1);
    match pools.pick(now) {
        Some(pool) => Step::Launch { pool, count },
        None => Step::Exhausted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools() -> Pools {
        Pools::new(
            &[
                ("subnet-a".into(), "az-a".into()),
                ("subnet-b".into(), "az-b".into()),
            ],
            &["c6i.large".into(), "c5.large".into()],
        )
    }

    #[test]
    fn buckets_refill_throttle_and_creep_back() {
        let t0 = Instant::now();
        let mut b = Bucket::new(5.0, 2.0, t0);
        b.take(5.0, t0);
        assert_eq!(b.wait_for(1.0, t0), Duration::from_millis(500));
        assert!((b.available(t0 + Duration::from_secs(1)) - 2.0).abs() < 1e-9);
        b.throttled(t0 + Duration::from_secs(1));
        // Empty, and refilling at half the rate.
        assert_eq!(
            b.wait_for(1.0, t0 + Duration::from_secs(1)),
            Duration::from_secs(1)
        );
        for _ in 0..10 {
            b.succeeded();
        }
        assert!(
            (b.rate() - 2.0).abs() < 1e-9,
            "crept back to the documented rate"
        );
        for _ in 0..100 {
            b.throttled(t0);
        }
        assert!(b.rate() >= 2.0 * MIN_RATE_FACTOR - 1e-12, "never stops");
    }

    #[test]
    fn batches_are_spread_over_subnets_and_sized_by_the_bucket() {
        let t0 = Instant::now();
        let mut p = pools();
        let mut l = Limits::documented(1.0, t0);
        let w = Duration::from_millis(500);
        // 1000 tokens: two calls of 500, one per subnet.
        assert_eq!(
            next_batch(1000, 1000, &mut p, &mut l, 1000, w, t0),
            Step::Launch {
                pool: 0,
                count: 500
            }
        );
        l.run_requests.take(1.0, t0);
        l.run_instances.take(500.0, t0);
        assert_eq!(
            next_batch(500, 1000, &mut p, &mut l, 1000, w, t0),
            Step::Launch {
                pool: 2,
                count: 500
            }
        );
        l.run_requests.take(1.0, t0);
        l.run_instances.take(500.0, t0);
        // Drained: wait for a useful batch (2/s for 0.5 s = 1 instance here), not a spin.
        assert_eq!(
            next_batch(10, 1000, &mut p, &mut l, 1000, w, t0),
            Step::Wait(Duration::from_millis(500))
        );
        // 3 s later the bucket holds 6: all of them go in one call.
        let later = t0 + Duration::from_secs(3);
        assert_eq!(
            next_batch(10, 1000, &mut p, &mut l, 1000, w, later),
            Step::Launch { pool: 0, count: 6 }
        );
        assert_eq!(
            next_batch(0, 1000, &mut p, &mut l, 1000, w, later),
            Step::Done
        );
    }

    #[test]
    fn capacity_errors_move_to_other_pools_until_none_is_left() {
        let t0 = Instant::now();
        let mut p = pools();
        // subnet-a/c6i out: subnet-a falls back to c5, subnet-b keeps its preferred type.
        p.bench(0, t0);
        assert_eq!(p.pick(t0), Some(1));
        assert_eq!(p.pick(t0), Some(2));
        p.bench(1, t0);
        // subnet-a entirely out: every call goes to subnet-b.
        assert_eq!(p.usable_subnets(t0), 1);
        assert_eq!(p.pick(t0), Some(2));
        assert_eq!(p.pick(t0), Some(2));
        p.bench(2, t0);
        p.bench(3, t0);
        let mut l = Limits::documented(1.0, t0);
        assert_eq!(
            next_batch(5, 5, &mut p, &mut l, 1000, Duration::ZERO, t0),
            Step::Exhausted
        );
        // Benched pools come back after a while.
        let later = t0 + ICE_BENCH;
        assert_eq!(
            next_batch(5, 5, &mut p, &mut l, 1000, Duration::ZERO, later),
            Step::Launch { pool: 0, count: 3 }
        );
    }
}
