//! One test's numbers from several Locust masters: their `/fleet/stats` snapshots merged
//! exactly, and the merged view in the shape of Locust's own `/stats/requests`.
//!
//! A master's snapshot (written by `fleet_merged_stats.py`, the plugin fleet adds to every
//! managed master) carries what Locust derives its numbers from, not the numbers: counts, sums,
//! min and max, the response-time histogram as Locust keeps it, and requests per second. Those
//! add up across masters the way Locust adds up its workers' reports (`StatsEntry.extend`), so
//! the merged view is what one master fed every shard's samples would show. Percentiles are
//! taken from the merged histogram with Locust's own algorithm; a percentile of shards'
//! percentiles (or their average) is not a percentile of the test (docs/locust.md, "The merged
//! view's source").
//!
//! Everything here is pure: [`merge`] and [`Merged::report`] take snapshots and give numbers.
//! Where a Locust formula is ported, the comment names the Locust function.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The snapshot format this controller reads; the plugin's `FORMAT`.
pub const FORMAT: u64 = 1;
/// The plugin's route, under the master's web base path.
pub const PATH: &str = "/fleet/stats";
/// The percentiles Locust's CSV and HTML reports show (`locust.stats.PERCENTILES_TO_REPORT`).
pub const PERCENTILES_TO_REPORT: [f64; 11] = [
    0.50, 0.66, 0.75, 0.80, 0.90, 0.95, 0.98, 0.99, 0.999, 0.9999, 1.0,
];
/// Locust's `current_rps` averages the seconds from `last - 12` up to `last - 3`.
const CURRENT_FROM: i64 = 12;
const CURRENT_UNTIL: i64 = 2;

/// Counts by an integer key: a response-time histogram (rounded ms → requests) or requests
/// per unix second. On the wire a list of `[key, count]` pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<(K, u64)>", into = "Vec<(K, u64)>")]
pub struct Counts<K: Ord + Copy>(pub BTreeMap<K, u64>);

impl<K: Ord + Copy> From<Vec<(K, u64)>> for Counts<K> {
    fn from(pairs: Vec<(K, u64)>) -> Counts<K> {
        let mut c = Counts(BTreeMap::new());
        for (k, n) in pairs {
            c.add(k, n);
        }
        c
    }
}

impl<K: Ord + Copy> From<Counts<K>> for Vec<(K, u64)> {
    fn from(c: Counts<K>) -> Vec<(K, u64)> {
        c.0.into_iter().collect()
    }
}

impl<K: Ord + Copy> Counts<K> {
    pub fn add(&mut self, k: K, n: u64) {
        if n > 0 {
            *self.0.entry(k).or_default() += n;
        }
    }

    pub fn extend(&mut self, other: &Counts<K>) {
        for (k, n) in &other.0 {
            self.add(*k, *n);
        }
    }

    pub fn get(&self, k: K) -> u64 {
        self.0.get(&k).copied().unwrap_or(0)
    }
}

/// One endpoint's (or the total's) raw numbers, as the plugin sends them and as they merge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub method: String,
    pub name: String,
    pub num_requests: u64,
    /// Requests logged without a response time: counted, but in no histogram or sum.
    #[serde(default)]
    pub num_none_requests: u64,
    pub num_failures: u64,
    pub total_response_time: f64,
    pub min_response_time: Option<f64>,
    pub max_response_time: f64,
    pub total_content_length: u64,
    /// Locust's `response_times`: response time rounded by Locust's bucketing → requests.
    pub response_times: Counts<u64>,
    /// Requests and failures per unix second, the last seconds before the last request.
    pub reqs_per_sec: Counts<i64>,
    pub fails_per_sec: Counts<i64>,
}

/// One error, keyed by method, name and error text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorRow {
    pub method: String,
    pub name: String,
    pub error: String,
    pub occurrences: u64,
    pub first_seen: Option<f64>,
    pub last_seen: Option<f64>,
}

/// One master's `GET /fleet/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub format: u64,
    /// The master's clock when it answered.
    pub time: f64,
    pub state: String,
    pub user_count: u64,
    pub worker_count: u64,
    /// When the master's stats started (its start, or the last reset).
    pub start_time: f64,
    pub last_request_timestamp: Option<f64>,
    pub total: Entry,
    pub entries: Vec<Entry>,
    pub errors: Vec<ErrorRow>,
}

/// A snapshot that cannot be read. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the Locust master's fleet stats plugin speaks format {found}, this controller reads format {FORMAT}; restart the master from this controller so it loads the plugin this version ships")]
    Format { found: u64 },
    #[error("the Locust master's {PATH} is not the JSON fleet expects ({0}); restart the master from this controller so it loads the plugin this version ships")]
    Json(serde_json::Error),
}

impl Snapshot {
    /// Reads a snapshot, checking its format before anything else.
    pub fn from_json(body: &[u8]) -> Result<Snapshot, SnapshotError> {
        #[derive(Deserialize)]
        struct Head {
            #[serde(default)]
            format: u64,
        }
        let head: Head = serde_json::from_slice(body).map_err(SnapshotError::Json)?;
        if head.format != FORMAT {
            return Err(SnapshotError::Format { found: head.format });
        }
        serde_json::from_slice(body).map_err(SnapshotError::Json)
    }
}

/// The stats-wide times Locust's rates are computed against (`RequestStats.start_time` and
/// `last_request_timestamp`, the total's).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Clock {
    pub start_time: f64,
    pub last_request_timestamp: Option<f64>,
}

/// Python's `int()` of a positive timestamp.
fn second(t: f64) -> i64 {
    t.trunc() as i64
}

/// `locust.stats.calculate_response_time_percentile`: walking the histogram down from the
/// slowest bucket, the first response time at which at most `int(num_requests * percent)`
/// requests remain below. The float product and its truncation are Locust's (`int(100 *
/// 0.57)` is 56), so the result is the bucket Locust reports, not the textbook one.
pub fn percentile_of(response_times: &Counts<u64>, num_requests: u64, percent: f64) -> u64 {
    let wanted = (num_requests as f64 * percent) as u64;
    let mut processed = 0u64;
    for (&ms, &n) in response_times.0.iter().rev() {
        processed += n;
        if num_requests.saturating_sub(processed) <= wanted {
            return ms;
        }
    }
    0
}

/// `locust.util.rounding.proper_round` for the non-negative values it is given (response
/// times): half rounds up. Python adds `10 ** -(len(str(x)) + 1)` and rounds half to even,
/// which only changes the result at an exact half; `f64::round` rounds halves away from zero.
fn proper_round(x: f64) -> f64 {
    x.round()
}

/// `locust.stats.avg`: the mean, 0 for no values.
fn avg(values: impl Iterator<Item = u64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v as f64, n + 1));
    sum / n.max(1) as f64
}

impl Entry {
    pub fn new(method: &str, name: &str) -> Entry {
        Entry {
            method: method.to_string(),
            name: name.to_string(),
            num_requests: 0,
            num_none_requests: 0,
            num_failures: 0,
            total_response_time: 0.0,
            min_response_time: None,
            max_response_time: 0.0,
            total_content_length: 0,
            response_times: Counts::default(),
            reqs_per_sec: Counts::default(),
            fails_per_sec: Counts::default(),
        }
    }

    /// `StatsEntry.extend`: sums, the smaller min, the larger max, histograms and per-second
    /// counts added key by key.
    pub fn extend(&mut self, o: &Entry) {
        self.num_requests += o.num_requests;
        self.num_none_requests += o.num_none_requests;
        self.num_failures += o.num_failures;
        self.total_response_time += o.total_response_time;
        self.max_response_time = self.max_response_time.max(o.max_response_time);
        self.min_response_time = match (self.min_response_time, o.min_response_time) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.total_content_length += o.total_content_length;
        self.response_times.extend(&o.response_times);
        self.reqs_per_sec.extend(&o.reqs_per_sec);
        self.fails_per_sec.extend(&o.fails_per_sec);
    }

    /// Requests that have a response time: the histogram's count.
    fn timed(&self) -> u64 {
        self.num_requests.saturating_sub(self.num_none_requests)
    }

    /// `StatsEntry.get_response_time_percentile`.
    pub fn percentile(&self, percent: f64) -> u64 {
        percentile_of(&self.response_times, self.timed(), percent)
    }

    /// `StatsEntry.median_response_time`: the 50th percentile, kept within min and max (a
    /// bucket can round above the slowest request: one request of 147 ms is in bucket 150).
    pub fn median_response_time(&self) -> f64 {
        if self.response_times.0.is_empty() {
            return 0.0;
        }
        let median = percentile_of(&self.response_times, self.timed(), 0.5) as f64;
        if median > self.max_response_time {
            self.max_response_time
        } else {
            match self.min_response_time {
                Some(min) if median < min => min,
                _ => median,
            }
        }
    }

    /// `StatsEntry.avg_response_time`.
    pub fn avg_response_time(&self) -> f64 {
        match self.timed() {
            0 => 0.0,
            n => self.total_response_time / n as f64,
        }
    }

    /// `StatsEntry.fail_ratio`.
    pub fn fail_ratio(&self) -> f64 {
        match (self.num_requests, self.num_failures) {
            (0, 0) => 0.0,
            (0, _) => 1.0,
            (r, f) => f as f64 / r as f64,
        }
    }

    /// `StatsEntry.avg_content_length`.
    pub fn avg_content_length(&self) -> f64 {
        match self.num_requests {
            0 => 0.0,
            n => self.total_content_length as f64 / n as f64,
        }
    }

    /// `StatsEntry.current_rps` (and `current_fail_per_sec` with the failures): the mean of
    /// the seconds from 12 before the last request to 3 before it, not before the stats began.
    fn current(&self, per_sec: &Counts<i64>, clock: Clock) -> f64 {
        let Some(last) = clock.last_request_timestamp else {
            return 0.0;
        };
        let from = (second(last) - CURRENT_FROM).max(second(clock.start_time));
        avg((from..second(last) - CURRENT_UNTIL).map(|t| per_sec.get(t)))
    }

    pub fn current_rps(&self, clock: Clock) -> f64 {
        self.current(&self.reqs_per_sec, clock)
    }

    pub fn current_fail_per_sec(&self, clock: Clock) -> f64 {
        self.current(&self.fails_per_sec, clock)
    }

    /// `StatsEntry.total_rps` (and `total_fail_per_sec`): over the stats' whole time.
    fn over_all(&self, n: u64, clock: Clock) -> f64 {
        match clock.last_request_timestamp {
            Some(last) if last != 0.0 && clock.start_time != 0.0 && last != clock.start_time => {
                n as f64 / (last - clock.start_time)
            }
            _ => 0.0,
        }
    }

    pub fn total_rps(&self, clock: Clock) -> f64 {
        self.over_all(self.num_requests, clock)
    }

    pub fn total_fail_per_sec(&self, clock: Clock) -> f64 {
        self.over_all(self.num_failures, clock)
    }

    /// The row Locust's `/stats/requests` shows for this entry (`StatsEntry.to_dict`).
    pub fn row(&self, clock: Clock) -> Row {
        Row {
            method: self.method.clone(),
            name: self.name.clone(),
            num_requests: self.num_requests,
            num_failures: self.num_failures,
            min_response_time: self.min_response_time.map_or(0.0, proper_round),
            max_response_time: proper_round(self.max_response_time),
            current_rps: self.current_rps(clock),
            current_fail_per_sec: self.current_fail_per_sec(clock),
            avg_response_time: self.avg_response_time(),
            median_response_time: self.median_response_time(),
            total_rps: self.total_rps(clock),
            total_fail_per_sec: self.total_fail_per_sec(clock),
            p95: self.percentile(0.95),
            p99: self.percentile(0.99),
            avg_content_length: self.avg_content_length(),
        }
    }
}

/// One row of `/stats/requests`, with Locust 2.47's key names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub method: String,
    pub name: String,
    pub num_requests: u64,
    pub num_failures: u64,
    pub min_response_time: f64,
    pub max_response_time: f64,
    pub current_rps: f64,
    pub current_fail_per_sec: f64,
    pub avg_response_time: f64,
    pub median_response_time: f64,
    pub total_rps: f64,
    pub total_fail_per_sec: f64,
    #[serde(rename = "response_time_percentile_0.95")]
    pub p95: u64,
    #[serde(rename = "response_time_percentile_0.99")]
    pub p99: u64,
    pub avg_content_length: f64,
}

/// The merged view: `/stats/requests` for the whole test (without Locust's worker list and
/// its windowed chart percentiles).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Endpoints sorted by (name, method) as Locust sorts them, then the `Aggregated` row.
    pub stats: Vec<Row>,
    pub errors: Vec<ErrorRow>,
    pub current_rps: f64,
    pub current_fail_per_sec: f64,
    pub total_rps: f64,
    pub total_fail_per_sec: f64,
    pub fail_ratio: f64,
    pub state: String,
    pub user_count: u64,
    pub worker_count: u64,
    /// How many masters' snapshots went into it.
    pub masters: usize,
}

/// Several masters' snapshots added up.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    pub masters: usize,
    pub state: String,
    pub user_count: u64,
    pub worker_count: u64,
    pub clock: Clock,
    pub total: Entry,
    /// By (name, method), Locust's own sort key.
    pub entries: BTreeMap<(String, String), Entry>,
    /// By (method, name, error).
    pub errors: BTreeMap<(String, String, String), ErrorRow>,
}

/// Locust's runner states, the busiest first: a test that runs on any master runs.
const STATES: [&str; 7] = [
    "spawning", "running", "stopping", "cleanup", "stopped", "ready", "missing",
];

/// The test's state from its masters' states: the busiest of them (unknown states count
/// least), `missing` for no master.
pub fn merged_state<'a>(states: impl IntoIterator<Item = &'a str>) -> String {
    let rank = |s: &str| STATES.iter().position(|k| *k == s).unwrap_or(STATES.len());
    states
        .into_iter()
        .min_by_key(|s| rank(s))
        .unwrap_or("missing")
        .to_string()
}

/// Adds up the masters' snapshots: counts and sums add, min and max are the extremes,
/// histograms and per-second counts add key by key, errors add by key (first seen the
/// earliest, last seen the latest); the stats began when the earliest master's did and last
/// saw a request when the latest did.
pub fn merge(snapshots: &[Snapshot]) -> Merged {
    let mut m = Merged {
        masters: snapshots.len(),
        state: merged_state(snapshots.iter().map(|s| s.state.as_str())),
        user_count: snapshots.iter().map(|s| s.user_count).sum(),
        worker_count: snapshots.iter().map(|s| s.worker_count).sum(),
        clock: Clock {
            start_time: snapshots
                .iter()
                .map(|s| s.start_time)
                .reduce(f64::min)
                .unwrap_or(0.0),
            last_request_timestamp: snapshots
                .iter()
                .filter_map(|s| s.last_request_timestamp)
                .reduce(f64::max),
        },
        total: Entry::new("", "Aggregated"),
        entries: BTreeMap::new(),
        errors: BTreeMap::new(),
    };
    for s in snapshots {
        m.total.extend(&s.total);
        for e in &s.entries {
            m.entries
                .entry((e.name.clone(), e.method.clone()))
                .or_insert_with(|| Entry::new(&e.method, &e.name))
                .extend(e);
        }
        for e in &s.errors {
            let key = (e.method.clone(), e.name.clone(), e.error.clone());
            match m.errors.get_mut(&key) {
                None => {
                    m.errors.insert(key, e.clone());
                }
                Some(have) => {
                    have.occurrences += e.occurrences;
                    have.first_seen = extreme(have.first_seen, e.first_seen, f64::min);
                    have.last_seen = extreme(have.last_seen, e.last_seen, f64::max);
                }
            }
        }
    }
    m
}

fn extreme(a: Option<f64>, b: Option<f64>, pick: fn(f64, f64) -> f64) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(pick(a, b)),
        (a, b) => a.or(b),
    }
}

impl Merged {
    /// The merged numbers in the shape of Locust's `/stats/requests`.
    pub fn report(&self) -> Report {
        let clock = self.clock;
        let total = self.total.row(clock);
        let mut stats: Vec<Row> = self.entries.values().map(|e| e.row(clock)).collect();
        let (current_rps, current_fail_per_sec) = (total.current_rps, total.current_fail_per_sec);
        let (total_rps, total_fail_per_sec) = (total.total_rps, total.total_fail_per_sec);
        stats.push(total);
        Report {
            stats,
            errors: self.errors.values().cloned().collect(),
            current_rps,
            current_fail_per_sec,
            total_rps,
            total_fail_per_sec,
            fail_ratio: self.total.fail_ratio(),
            state: self.state.clone(),
            user_count: self.user_count,
            worker_count: self.worker_count,
            masters: self.masters,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(pairs: &[(u64, u64)]) -> Counts<u64> {
        Counts::from(pairs.to_vec())
    }

    /// `locust.stats.bucket_response_time` for whole milliseconds: two significant digits,
    /// halves to even (Python's `round`), so 145 → 140 and 155 → 160.
    fn bucket(ms: u64) -> u64 {
        let step = match ms {
            0..=99 => return ms,
            100..=999 => 10,
            1000..=9999 => 100,
            _ => 1000,
        };
        let (q, r) = (ms / step, ms % step);
        let up = r * 2 > step || (r * 2 == step && q % 2 == 1);
        (q + u64::from(up)) * step
    }

    /// `StatsEntry.log` for one request at unix second `t`.
    fn log(e: &mut Entry, ms: u64, t: i64, failed: bool) {
        e.num_requests += 1;
        e.reqs_per_sec.add(t, 1);
        e.total_response_time += ms as f64;
        e.min_response_time = Some(e.min_response_time.map_or(ms as f64, |m| m.min(ms as f64)));
        e.max_response_time = e.max_response_time.max(ms as f64);
        e.response_times.add(bucket(ms), 1);
        e.total_content_length += 100;
        if failed {
            e.num_failures += 1;
            e.fails_per_sec.add(t, 1);
        }
    }

    fn snapshot(state: &str, total: Entry, entries: Vec<Entry>) -> Snapshot {
        Snapshot {
            format: FORMAT,
            time: 1000.0,
            state: state.into(),
            user_count: 10,
            worker_count: 2,
            start_time: 900.0,
            last_request_timestamp: Some(999.5),
            total,
            entries,
            errors: vec![],
        }
    }

    #[test]
    fn bucketing_follows_locusts_rounding_at_its_edges() {
        let got: Vec<u64> = [
            99, 100, 104, 105, 115, 145, 155, 995, 1050, 1150, 9950, 10500,
        ]
        .iter()
        .map(|&ms| bucket(ms))
        .collect();
        // What locust.stats.bucket_response_time answers for the same values.
        assert_eq!(
            got,
            [99, 100, 100, 100, 120, 140, 160, 1000, 1000, 1200, 10000, 10000]
        );
    }

    #[test]
    fn a_percentile_is_the_bucket_where_locusts_walk_from_the_slowest_stops() {
        let h = hist(&[(10, 50), (20, 30), (150, 15), (1000, 5)]);
        let got: Vec<u64> = [0.5, 0.8, 0.81, 0.95, 0.96, 1.0]
            .iter()
            .map(|&p| percentile_of(&h, 100, p))
            .collect();
        // At a bucket boundary Locust answers the slower bucket: 80 of 100 requests took at
        // most 20 ms, yet its 80th percentile is 150 (as calculate_response_time_percentile).
        assert_eq!(got, [20, 150, 150, 1000, 1000, 1000]);
        assert_eq!(percentile_of(&Counts::default(), 0, 0.5), 0);
    }

    #[test]
    fn the_wanted_count_is_truncated_from_a_float_as_locust_does() {
        // int(100 * 0.57) is 56 in Python (0.57 * 100 = 56.99999999999999): 57 requests
        // remaining are too many, so the walk goes on to the 10 ms bucket.
        let h = hist(&[(10, 57), (20, 43)]);
        assert_eq!(percentile_of(&h, 100, 0.57), 10);
        assert_eq!(percentile_of(&h, 100, 0.58), 20);
    }

    #[test]
    fn the_median_stays_within_min_and_max_but_percentiles_keep_the_bucket() {
        let mut slow = Entry::new("GET", "/a");
        log(&mut slow, 147, 1, false); // bucket 150
        assert_eq!(slow.response_times, hist(&[(150, 1)]));
        assert_eq!(slow.median_response_time(), 147.0);
        assert_eq!(slow.percentile(0.95), 150);
        let mut fast = Entry::new("GET", "/a");
        fast.num_requests = 1;
        fast.total_response_time = 96.4;
        fast.min_response_time = Some(96.4);
        fast.max_response_time = 96.4;
        fast.response_times = hist(&[(96, 1)]);
        assert_eq!(fast.median_response_time(), 96.4);
        // Merged, the clamp uses the merged min and max: of two requests Locust's median is
        // the slower one's bucket, 150, which is above the merged max.
        fast.extend(&slow);
        assert_eq!(fast.median_response_time(), 147.0);
        assert_eq!(fast.percentile(1.0), 150);
        assert_eq!(Entry::new("GET", "/none").median_response_time(), 0.0);
    }

    #[test]
    fn histograms_merge_bucket_by_bucket_and_buckets_either_side_of_an_edge_stay_apart() {
        let mut a = Entry::new("GET", "/a");
        let mut b = Entry::new("GET", "/a");
        for ms in [99, 99, 99, 100, 104] {
            log(&mut a, ms, 1, false);
        }
        for ms in [105, 110, 114, 995, 1050, 1150] {
            log(&mut b, ms, 2, false);
        }
        a.extend(&b);
        assert_eq!(
            a.response_times,
            hist(&[(99, 3), (100, 3), (110, 2), (1000, 2), (1200, 1)])
        );
        assert_eq!(
            (a.num_requests, a.min_response_time, a.max_response_time),
            (11, Some(99.0), 1150.0)
        );
        // 11 requests: int(11 * 0.5) = 5 may stay below, so the median is the 100 bucket.
        assert_eq!(a.median_response_time(), 100.0);
        assert_eq!(a.percentile(0.9), 1000);
    }

    /// A deterministic spread of response times: mostly fast, a slow tail.
    fn samples(seed: u64, n: usize, slow_every: usize) -> Vec<u64> {
        let mut x = seed;
        (0..n)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = (x >> 33) % 1000;
                if i % slow_every == 0 {
                    800 + r * 12
                } else {
                    5 + r / 8
                }
            })
            .collect()
    }

    #[test]
    fn merged_shards_equal_one_master_fed_every_sample_and_averaged_percentiles_do_not() {
        // Three shards with different loads and tails; one master sees all their requests.
        let shards_samples = [samples(1, 3000, 50), samples(2, 800, 5), samples(3, 200, 2)];
        let mut one = Entry::new("GET", "/a");
        let mut snaps = vec![];
        for (k, s) in shards_samples.iter().enumerate() {
            let mut e = Entry::new("GET", "/a");
            for (i, &ms) in s.iter().enumerate() {
                let t = 990 + (i % 10) as i64;
                let failed = (i + k) % 7 == 0;
                log(&mut e, ms, t, failed);
                log(&mut one, ms, t, failed);
            }
            let mut total = e.clone();
            total.method = String::new();
            total.name = "Aggregated".into();
            snaps.push(snapshot("running", total, vec![e]));
        }
        let m = merge(&snaps);
        let merged = &m.entries[&("/a".to_string(), "GET".to_string())];
        assert_eq!(
            merged, &one,
            "every raw number adds up to the single master's"
        );
        for p in PERCENTILES_TO_REPORT {
            assert_eq!(merged.percentile(p), one.percentile(p), "percentile {p}");
        }
        assert_eq!(merged.median_response_time(), one.median_response_time());
        // What averaging the shards' percentiles would report instead.
        let avg_p = |p: f64| {
            snaps
                .iter()
                .map(|s| s.entries[0].percentile(p) as f64)
                .sum::<f64>()
                / 3.0
        };
        for p in [0.5, 0.95, 0.99] {
            assert_ne!(avg_p(p), one.percentile(p) as f64, "percentile {p}");
        }
        assert_eq!(m.total.num_requests, 4000);
        assert_eq!(m.report().stats.last().unwrap().p95, one.percentile(0.95));
    }

    #[test]
    fn current_rps_averages_the_seconds_locust_averages_against_the_merged_clock() {
        let mut a = Entry::new("GET", "/a");
        let mut b = Entry::new("GET", "/a");
        for t in 980..=1000 {
            a.reqs_per_sec.add(t, 2);
            a.fails_per_sec.add(t, 1);
        }
        b.reqs_per_sec.add(997, 30); // in the window [988, 997]
        b.reqs_per_sec.add(998, 1000); // 2 s before the last request: not yet counted
        a.extend(&b);
        let clock = Clock {
            start_time: 900.0,
            last_request_timestamp: Some(1000.7),
        };
        assert_eq!(a.current_rps(clock), (10.0 * 2.0 + 30.0) / 10.0);
        assert_eq!(a.current_fail_per_sec(clock), 1.0);
        // Stats that began at 995.2: only 995, 996 and 997.
        let late = Clock {
            start_time: 995.2,
            ..clock
        };
        assert_eq!(a.current_rps(late), (3.0 * 2.0 + 30.0) / 3.0);
        assert_eq!(a.current_rps(Clock::default()), 0.0);
    }

    #[test]
    fn total_rates_run_over_the_stats_time_and_are_zero_without_one() {
        let mut e = Entry::new("GET", "/a");
        e.num_requests = 500;
        e.num_failures = 5;
        let clock = |start, last| Clock {
            start_time: start,
            last_request_timestamp: last,
        };
        assert_eq!(e.total_rps(clock(900.0, Some(1000.0))), 5.0);
        assert_eq!(e.total_fail_per_sec(clock(900.0, Some(1000.0))), 0.05);
        assert_eq!(e.total_rps(clock(900.0, None)), 0.0);
        assert_eq!(e.total_rps(clock(0.0, Some(1000.0))), 0.0);
        assert_eq!(e.total_rps(clock(1000.0, Some(1000.0))), 0.0);
    }

    #[test]
    fn ratios_and_averages_follow_locusts_zero_cases() {
        let mut e = Entry::new("GET", "/a");
        assert_eq!(
            (
                e.fail_ratio(),
                e.avg_response_time(),
                e.avg_content_length()
            ),
            (0.0, 0.0, 0.0)
        );
        e.num_failures = 2;
        assert_eq!(e.fail_ratio(), 1.0, "failures without requests");
        e.num_requests = 4;
        e.num_none_requests = 2;
        e.total_response_time = 30.0;
        e.total_content_length = 1000;
        assert_eq!(e.fail_ratio(), 0.5);
        assert_eq!(
            e.avg_response_time(),
            15.0,
            "None-time requests are not averaged"
        );
        assert_eq!(e.avg_content_length(), 250.0);
        assert_eq!(
            (proper_round(2.5), proper_round(0.5), proper_round(147.23)),
            (3.0, 1.0, 147.0)
        );
    }

    #[test]
    fn errors_merge_by_method_name_and_text() {
        let err = |name: &str, error: &str, n, first, last| ErrorRow {
            method: "GET".into(),
            name: name.into(),
            error: error.into(),
            occurrences: n,
            first_seen: first,
            last_seen: last,
        };
        let mut a = snapshot("running", Entry::new("", "Aggregated"), vec![]);
        let mut b = a.clone();
        a.errors = vec![
            err("/a", "500", 3, Some(10.0), Some(20.0)),
            err("/a", "404", 1, None, None),
        ];
        b.errors = vec![
            err("/a", "500", 4, Some(5.0), Some(15.0)),
            err("/b", "500", 2, Some(1.0), Some(2.0)),
        ];
        let r = merge(&[a, b]).report();
        assert_eq!(
            r.errors,
            vec![
                err("/a", "404", 1, None, None),
                err("/a", "500", 7, Some(5.0), Some(20.0)),
                err("/b", "500", 2, Some(1.0), Some(2.0)),
            ]
        );
    }

    #[test]
    fn the_test_state_is_the_busiest_masters() {
        assert_eq!(merged_state(["ready", "running", "stopped"]), "running");
        assert_eq!(merged_state(["running", "spawning"]), "spawning");
        assert_eq!(merged_state(["ready", "stopped"]), "stopped");
        assert_eq!(merged_state(["ready", "ready"]), "ready");
        assert_eq!(merged_state(["ready", "something new"]), "ready");
        assert_eq!(merged_state([]), "missing");
    }

    #[test]
    fn the_report_sorts_endpoints_like_locust_and_ends_with_the_aggregated_row() {
        let mut total = Entry::new("", "Aggregated");
        let mut entries = vec![];
        for (method, name) in [("POST", "/b"), ("GET", "/b"), ("GET", "/a")] {
            let mut e = Entry::new(method, name);
            log(&mut e, 20, 995, false);
            total.extend(&e);
            entries.push(e);
        }
        let mut a = snapshot("running", total, entries);
        a.last_request_timestamp = Some(1000.5);
        let mut b = snapshot("ready", Entry::new("", "Aggregated"), vec![]);
        b.start_time = 800.0;
        b.last_request_timestamp = None;
        b.user_count = 0;
        let m = merge(&[a, b]);
        assert_eq!(
            m.clock,
            Clock {
                start_time: 800.0,
                last_request_timestamp: Some(1000.5)
            }
        );
        let r = m.report();
        let names: Vec<(&str, &str)> = r
            .stats
            .iter()
            .map(|r| (r.name.as_str(), r.method.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("/a", "GET"),
                ("/b", "GET"),
                ("/b", "POST"),
                ("Aggregated", "")
            ]
        );
        assert_eq!(
            (r.state.as_str(), r.user_count, r.worker_count, r.masters),
            ("running", 10, 4, 2)
        );
        assert_eq!(
            r.current_rps, 0.3,
            "3 requests in second 995 of the 10 averaged"
        );
        assert_eq!(r.total_rps, 3.0 / 200.5);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["stats"][3]["response_time_percentile_0.95"], 20);
    }

    #[test]
    fn a_snapshot_of_another_format_or_not_json_is_refused_with_what_to_do() {
        let s = snapshot("ready", Entry::new("", "Aggregated"), vec![]);
        let json = serde_json::to_vec(&s).unwrap();
        assert_eq!(Snapshot::from_json(&json).unwrap(), s);
        for (body, found) in [(&br#"{"format": 2, "x": 1}"#[..], 2), (&b"{}"[..], 0)] {
            match Snapshot::from_json(body) {
                Err(e @ SnapshotError::Format { .. }) => {
                    assert!(e.to_string().contains(&format!("format {found}")), "{e}");
                    assert!(e.to_string().contains("restart the master"), "{e}");
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            Snapshot::from_json(b"<html>"),
            Err(SnapshotError::Json(_))
        ));
    }

    #[test]
    fn histograms_travel_as_sorted_pairs_and_repeated_keys_add_up() {
        let h: Counts<u64> = serde_json::from_str("[[150, 2], [20, 1], [150, 3], [7, 0]]").unwrap();
        assert_eq!(h, hist(&[(20, 1), (150, 5)]));
        assert_eq!(serde_json::to_string(&h).unwrap(), "[[20,1],[150,5]]");
    }
}
