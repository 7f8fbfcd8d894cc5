//! The failed-authentication table: a token bucket per client key (docs/security.md).
//!
//! Only failures take tokens. A key whose bucket is empty is *over budget*: its further failures
//! are answered `429`, and its password checks wait in a narrow lane (`auth.rs`). Nothing here
//! ever refuses a credential; it only says how a key has behaved.
//!
//! The table is bounded: when it is full, the entry that failed least recently is dropped (its
//! bucket has refilled the most, so forgetting it costs the least), one at a time.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Instant;

struct Bucket {
    tokens: f64,
    at: Instant,
    /// Position in `order`: when this key last failed, as a counter.
    seq: u64,
}

pub struct FailureTable {
    burst: f64,
    refill_per_s: f64,
    max: usize,
    buckets: HashMap<IpAddr, Bucket>,
    /// Keys by when they last failed, oldest first.
    order: BTreeMap<u64, IpAddr>,
    next_seq: u64,
}

impl FailureTable {
    /// `burst` failures at once, `refill_per_s` more per second after that, `max` keys tracked.
    pub fn new(burst: f64, refill_per_s: f64, max: usize) -> FailureTable {
        FailureTable {
            burst: burst.max(1.0),
            refill_per_s: refill_per_s.max(0.0),
            max: max.max(1),
            buckets: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
        }
    }

    fn tokens(&self, b: &Bucket, now: Instant) -> f64 {
        (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * self.refill_per_s)
            .min(self.burst)
    }

    /// Whether `key` has used up its failures at `now`.
    pub fn over_budget(&self, key: IpAddr, now: Instant) -> bool {
        self.buckets
            .get(&key)
            .is_some_and(|b| self.tokens(b, now) < 1.0)
    }

    /// Records a failure of `key` at `now`; returns whether `key` was already over budget.
    pub fn fail(&mut self, key: IpAddr, now: Instant) -> bool {
        let seq = self.next_seq;
        self.next_seq += 1;
        let (tokens, old_seq) = match self.buckets.get(&key) {
            Some(b) => (self.tokens(b, now), Some(b.seq)),
            None => (self.burst, None),
        };
        match old_seq {
            Some(s) => {
                self.order.remove(&s);
            }
            None => {
                while self.buckets.len() >= self.max {
                    let Some((_, oldest)) = self.order.pop_first() else {
                        break;
                    };
                    self.buckets.remove(&oldest);
                }
            }
        }
        self.order.insert(seq, key);
        self.buckets.insert(
            key,
            Bucket {
                // Bounded below, so a key that keeps failing is back under budget 1/refill
                // seconds after it stops, however long it went on.
                tokens: (tokens - 1.0).max(0.0),
                at: now,
                seq,
            },
        );
        tokens < 1.0
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_key_is_over_budget_after_its_burst_and_recovers_at_the_refill_rate() {
        let t0 = Instant::now();
        let mut t = FailureTable::new(10.0, 0.5, 100);
        let a = ip("10.0.0.1");
        for i in 0..10 {
            assert!(!t.over_budget(a, t0), "failure {i}");
            assert!(!t.fail(a, t0), "failure {i} was within the burst");
        }
        assert!(t.over_budget(a, t0));
        assert!(t.fail(a, t0), "the 11th failure is over budget");
        assert!(
            !t.over_budget(ip("10.0.0.2"), t0),
            "other keys are not affected"
        );
        // One token after 2 s at 0.5/s, not before.
        assert!(t.over_budget(a, t0 + Duration::from_millis(1900)));
        assert!(!t.over_budget(a, t0 + Duration::from_secs(2)));
        // However long it kept failing, it recovers as fast once it stops.
        for _ in 0..1000 {
            t.fail(a, t0);
        }
        assert!(!t.over_budget(a, t0 + Duration::from_secs(2)));
        // Refills never exceed the burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..10 {
            assert!(!t.fail(a, later));
        }
        assert!(t.fail(a, later));
    }

    #[test]
    fn a_full_table_drops_the_least_recently_failed_key_only() {
        let t0 = Instant::now();
        let mut t = FailureTable::new(2.0, 0.0, 3);
        let (a, b, c, d) = (
            ip("10.0.0.1"),
            ip("10.0.0.2"),
            ip("10.0.0.3"),
            ip("10.0.0.4"),
        );
        for k in [a, b, c] {
            t.fail(k, t0);
            t.fail(k, t0);
        }
        // `a` fails again: now `b` is the least recently failed.
        t.fail(a, t0);
        t.fail(d, t0);
        assert_eq!(t.len(), 3);
        assert!(!t.over_budget(b, t0), "b was dropped");
        assert!(t.over_budget(a, t0), "a is still counted");
        assert!(t.over_budget(c, t0), "c is still counted");
        assert!(!t.over_budget(d, t0), "d has one failure left");
        t.fail(b, t0);
        assert!(!t.over_budget(c, t0), "then c, the oldest, goes");
        assert!(t.over_budget(a, t0));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn a_zero_refill_means_over_budget_until_dropped() {
        let t0 = Instant::now();
        let mut t = FailureTable::new(1.0, 0.0, 10);
        t.fail(ip("::1"), t0);
        assert!(t.over_budget(ip("::1"), t0 + Duration::from_secs(86_400)));
    }
}
