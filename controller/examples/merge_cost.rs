//! What one read of the test's merged stats costs the controller: parse K masters' plugin
//! snapshots, merge them, compute the report and the `stats.csv`, as `GET /api/stats/csv` does
//! (the stats view does all but the CSV once a second). Every master holds E endpoints whose
//! histograms fill Locust's buckets from 0 to 3 s (about 300 buckets each, the worst case for
//! a test whose responses spread that wide).
//!
//! `cargo run --release -p fleet --example merge_cost -- [MASTERS] [ENDPOINTS]` (3 and 50 by
//! default). Results: docs/benchmarks.md, "The merged view's cost".

use std::time::Instant;

use fleet::master::merge::{self, Entry, Snapshot};
use fleet::master::view::stats_csv;

/// Locust's `bucket_response_time` for whole milliseconds below 10 s.
fn bucket(ms: u64) -> u64 {
    match ms {
        0..=99 => ms,
        100..=999 => (ms + 5) / 10 * 10,
        _ => (ms + 50) / 100 * 100,
    }
}

fn snapshot(seed: u64, endpoints: u64) -> Snapshot {
    let mut entries = vec![];
    let mut x = seed;
    for i in 0..endpoints {
        let mut e = Entry::new("GET", &format!("/endpoint/{i}"));
        for t in 0..20_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let ms = (x >> 33) % 3000;
            e.num_requests += 1;
            e.total_response_time += ms as f64;
            e.max_response_time = e.max_response_time.max(ms as f64);
            e.min_response_time = Some(e.min_response_time.map_or(ms as f64, |m| m.min(ms as f64)));
            e.response_times.add(bucket(ms), 1);
            e.reqs_per_sec.add(1000 + (t % 20) as i64, 1);
        }
        entries.push(e);
    }
    let mut total = Entry::new("", "Aggregated");
    for e in &entries {
        total.extend(e);
    }
    Snapshot {
        format: merge::FORMAT,
        time: 1020.0,
        state: "running".into(),
        user_count: 10,
        worker_count: 10,
        start_time: 900.0,
        last_request_timestamp: Some(1019.0),
        total,
        entries,
        errors: vec![],
    }
}

fn main() {
    let arg = |i: usize, default: u64| {
        std::env::args()
            .nth(i)
            .map(|a| a.parse().expect("MASTERS and ENDPOINTS are numbers"))
            .unwrap_or(default)
    };
    let (masters, endpoints) = (arg(1, 3), arg(2, 50));
    let bodies: Vec<Vec<u8>> = (0..masters)
        .map(|k| serde_json::to_vec(&snapshot(k + 1, endpoints)).unwrap())
        .collect();
    let rounds = 100;
    let t = Instant::now();
    let mut csv_len = 0;
    let mut report_len = 0;
    for _ in 0..rounds {
        let snaps: Vec<Snapshot> = bodies
            .iter()
            .map(|b| Snapshot::from_json(b).unwrap())
            .collect();
        let m = merge::merge(&snaps);
        report_len = serde_json::to_vec(&m.report()).unwrap().len();
        csv_len = stats_csv(&m).len();
    }
    let per = t.elapsed().as_secs_f64() * 1000.0 / rounds as f64;
    println!(
        "{masters} masters x {endpoints} endpoints: snapshot {} bytes each; parse + merge + report + csv {per:.2} ms; report {report_len} bytes, stats.csv {csv_len} bytes",
        bodies[0].len()
    );
}
