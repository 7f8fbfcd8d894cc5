//! The test's statistics now: one answer for everything that shows the test (the dashboard's
//! event stream, `GET /api/stats` and `fleet run`'s reports), whatever the number of masters.
//!
//! [`read`] asks every master of [`super::Master::shard_apis`] for its plugin snapshot
//! (`GET <base>/fleet/stats`) and merges them exactly ([`super::merge`]). A master without the
//! plugin (an external master answers 404) gives its own `/stats/requests` instead: that is
//! the test's view when it is the only master, as before the plugin existed; with several
//! masters it cannot be merged exactly (no histogram), and the view says which master lacks
//! the plugin ([`combine`], the pure decision). [`Current::stats_csv`] writes the merged
//! numbers as Locust's `stats.csv`, so the thresholds `fleet run` judges on it are exact
//! across masters.
//!
//! [`StatsView`] keeps the last view for the event stream, refreshed once a second by
//! [`StatsView::run`]: clients of the stream never reach a master themselves.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

use super::merge::{self, Entry, ErrorRow, Merged, Report, Row, PERCENTILES_TO_REPORT};
use super::{ApiError, LocustApi, Master};

/// How often [`StatsView::run`] reads the masters.
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// What one master answered.
#[derive(Debug, Clone)]
pub enum Answer {
    /// Its plugin's snapshot.
    Snapshot(merge::Snapshot),
    /// No plugin: its own `/stats/requests`.
    Requests(Report),
}

/// The test's statistics, as [`combine`] made them.
#[derive(Debug, Clone, PartialEq)]
pub enum Current {
    /// Every master's snapshot, merged: exact, histograms included.
    Merged(Merged),
    /// The only master, without the plugin: its own `/stats/requests`.
    Requests(Report),
}

/// Why there is no view. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("there is no Locust master to read the test's stats from; start `fleet serve`")]
    NoMaster,
    #[error("Locust master {index} ({url}) has no fleet stats plugin (it answered 404), so the test over {masters} masters cannot be merged exactly; let `fleet serve` manage every master")]
    NoPlugin {
        index: usize,
        url: String,
        masters: usize,
    },
    #[error("Locust master {index}: {source}")]
    Api {
        index: usize,
        #[source]
        source: ApiError,
    },
}

impl ViewError {
    /// A master did not answer at all (it may be restarting).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ViewError::Api { source, .. } if source.is_unreachable())
    }
}

/// The view from every master's answer (in the order of [`super::Master::shard_apis`], each
/// with its web URL): all snapshots merge; one master without the plugin stands for itself;
/// several masters of which one has no plugin cannot be merged.
pub fn combine(answers: Vec<(String, Answer)>) -> Result<Current, ViewError> {
    let masters = answers.len();
    if masters == 0 {
        return Err(ViewError::NoMaster);
    }
    let mut snapshots = Vec::with_capacity(masters);
    for (index, (url, a)) in answers.into_iter().enumerate() {
        match a {
            Answer::Snapshot(s) => snapshots.push(s),
            Answer::Requests(r) if masters == 1 => return Ok(Current::Requests(r)),
            Answer::Requests(_) => {
                return Err(ViewError::NoPlugin {
                    index,
                    url,
                    masters,
                })
            }
        }
    }
    Ok(Current::Merged(merge::merge(&snapshots)))
}

impl Current {
    /// The numbers in the shape of Locust's `/stats/requests`.
    pub fn report(&self) -> Report {
        match self {
            Current::Merged(m) => m.report(),
            Current::Requests(r) => r.clone(),
        }
    }

    /// Whether the numbers come from the masters' histograms (the plugin), merged exactly.
    pub fn exact(&self) -> bool {
        matches!(self, Current::Merged(_))
    }

    /// The merged numbers as Locust's `stats.csv` (`/stats/requests/csv`); `None` for a
    /// master without the plugin, whose own CSV is the answer.
    pub fn stats_csv(&self) -> Option<String> {
        match self {
            Current::Merged(m) => Some(stats_csv(m)),
            Current::Requests(_) => None,
        }
    }
}

/// `/stats/requests` of a master without the plugin, read into the merged view's shape.
/// Missing or null numbers read as zero.
pub fn report_from_requests(body: &[u8]) -> Result<Report, serde_json::Error> {
    #[derive(Deserialize)]
    struct Requests {
        #[serde(default)]
        stats: Vec<Row>,
        #[serde(default)]
        errors: Vec<ErrorRow>,
        current_rps: Option<f64>,
        current_fail_per_sec: Option<f64>,
        total_rps: Option<f64>,
        total_fail_per_sec: Option<f64>,
        fail_ratio: Option<f64>,
        #[serde(default)]
        state: String,
        #[serde(default)]
        user_count: u64,
        #[serde(default)]
        worker_count: u64,
    }
    let r: Requests = serde_json::from_slice(body)?;
    let z = |x: Option<f64>| x.unwrap_or(0.0);
    Ok(Report {
        stats: r.stats,
        errors: r.errors,
        current_rps: z(r.current_rps),
        current_fail_per_sec: z(r.current_fail_per_sec),
        total_rps: z(r.total_rps),
        total_fail_per_sec: z(r.total_fail_per_sec),
        fail_ratio: z(r.fail_ratio),
        state: r.state,
        user_count: r.user_count,
        worker_count: r.worker_count,
        masters: 1,
    })
}

/// One master's answer: its snapshot, or without the plugin (404) its `/stats/requests`.
async fn answer(api: &LocustApi) -> Result<Answer, ApiError> {
    match api.snapshot().await {
        Ok(s) => Ok(Answer::Snapshot(s)),
        Err(ApiError::Status { status: 404, .. }) => Ok(Answer::Requests(api.report().await?)),
        Err(e) => Err(e),
    }
}

/// The workers connected to one master now: its plugin's count, fresh; without the plugin
/// (an external master) its `/stats/requests`' (cached by Locust ~2 s).
pub async fn worker_count(api: &LocustApi) -> Result<u64, ApiError> {
    Ok(match answer(api).await? {
        Answer::Snapshot(s) => s.worker_count,
        Answer::Requests(r) => r.worker_count,
    })
}

/// Reads every master (at the same time) and combines their answers.
pub async fn read(apis: &[LocustApi]) -> Result<Current, ViewError> {
    let mut set = tokio::task::JoinSet::new();
    for (index, api) in apis.iter().enumerate() {
        let api = api.clone();
        set.spawn(async move { (index, answer(&api).await) });
    }
    let mut answers: Vec<Option<Answer>> = vec![None; apis.len()];
    while let Some(joined) = set.join_next().await {
        let (index, a) = joined.expect("a master's stats call does not panic");
        answers[index] = Some(a.map_err(|source| ViewError::Api { index, source })?);
    }
    combine(
        apis.iter()
            .zip(answers)
            .map(|(api, a)| (api.base().to_string(), a.expect("every master answered")))
            .collect(),
    )
}

/// `stats.csv` for the view: the merged CSV, or the only master's own when it has no plugin.
pub async fn read_csv(apis: &[LocustApi]) -> Result<String, ViewError> {
    let current = read(apis).await?;
    match current.stats_csv() {
        Some(csv) => Ok(csv),
        None => apis[0]
            .requests_csv()
            .await
            .map_err(|source| ViewError::Api { index: 0, source }),
    }
}

/// Locust's `stats.csv` header percentile names (`get_readable_percentiles`): `50%` ...
/// `99.9%`, `99.99%`, `100%`.
fn readable_percentile(p: f64) -> String {
    let x = p * 100.0;
    if x.fract() == 0.0 {
        format!("{}%", x as u64)
    } else {
        format!("{}%", (x * 1e6).round() / 1e6)
    }
}

/// The header of Locust's `stats.csv`.
pub fn stats_csv_header() -> Vec<String> {
    let mut h: Vec<String> = [
        "Type",
        "Name",
        "Request Count",
        "Failure Count",
        "Median Response Time",
        "Average Response Time",
        "Min Response Time",
        "Max Response Time",
        "Average Content Size",
        "Requests/s",
        "Failures/s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    h.extend(
        PERCENTILES_TO_REPORT
            .iter()
            .map(|p| readable_percentile(*p)),
    );
    h
}

/// A float as Python's `str` writes it for the values here (`2.0`, `0.125`).
fn py_float(x: f64) -> String {
    if !x.is_finite() {
        return "0".into();
    }
    if x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// A field as Python's `csv` module writes it (minimal quoting).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One row of `stats.csv` (`StatsCSV._requests_data_rows`): the whole-run rates, the raw min
/// and max, and the percentiles as integers (`N/A` without requests).
fn csv_row(e: &Entry, clock: merge::Clock) -> String {
    let median = e.median_response_time();
    let median = if median == e.percentile(0.5) as f64 {
        format!("{}", median as u64)
    } else {
        py_float(median)
    };
    let zero_or = |x: f64| {
        if x == 0.0 {
            "0".to_string()
        } else {
            py_float(x)
        }
    };
    let mut f = vec![
        csv_field(&e.method),
        csv_field(&e.name),
        e.num_requests.to_string(),
        e.num_failures.to_string(),
        median,
        py_float(e.avg_response_time()),
        zero_or(e.min_response_time.unwrap_or(0.0)),
        zero_or(e.max_response_time),
        py_float(e.avg_content_length()),
        py_float(e.total_rps(clock)),
        py_float(e.total_fail_per_sec(clock)),
    ];
    for p in PERCENTILES_TO_REPORT {
        f.push(match e.num_requests {
            0 => "N/A".into(),
            _ => e.percentile(p).to_string(),
        });
    }
    f.join(",")
}

/// The merged numbers as Locust's `stats.csv`: endpoints sorted by (name, method), then the
/// `Aggregated` row; `\r\n` line ends, as Python's `csv` writes them.
pub fn stats_csv(m: &Merged) -> String {
    let mut out = stats_csv_header().join(",");
    out.push_str("\r\n");
    for e in m.entries.values().chain([&m.total]) {
        out.push_str(&csv_row(e, m.clock));
        out.push_str("\r\n");
    }
    out
}

/// The last view, for readers that cannot wait (the event stream): refreshed once a second by
/// [`StatsView::run`]. `None` before the first read and while no view could be made.
#[derive(Clone)]
pub struct StatsView {
    last: Arc<watch::Sender<Option<Arc<Current>>>>,
}

impl Default for StatsView {
    fn default() -> StatsView {
        StatsView {
            last: Arc::new(watch::Sender::new(None)),
        }
    }
}

impl StatsView {
    pub fn latest(&self) -> Option<Arc<Current>> {
        self.last.borrow().clone()
    }

    /// Reads the test's view every [`REFRESH_EVERY`], for as long as it runs.
    pub async fn run(self, master: Master) {
        let mut tick = tokio::time::interval(REFRESH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let view = master.merged_stats().await.ok().map(Arc::new);
            self.last.send_replace(view);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use merge::{Counts, Snapshot, FORMAT};

    fn entry(method: &str, name: &str, times: &[(u64, f64)]) -> Entry {
        let mut e = Entry::new(method, name);
        for &(t, ms) in times {
            e.num_requests += 1;
            e.total_response_time += ms;
            e.min_response_time = Some(e.min_response_time.map_or(ms, |m| m.min(ms)));
            e.max_response_time = e.max_response_time.max(ms);
            e.response_times.add(ms.round() as u64, 1);
            e.reqs_per_sec.add(t as i64, 1);
            e.total_content_length += 10;
        }
        e
    }

    fn snapshot(entries: Vec<Entry>) -> Snapshot {
        let mut total = Entry::new("", "Aggregated");
        for e in &entries {
            total.extend(e);
        }
        Snapshot {
            format: FORMAT,
            time: 110.0,
            state: "running".into(),
            user_count: 2,
            worker_count: 1,
            start_time: 100.0,
            last_request_timestamp: Some(108.0),
            total,
            entries,
            errors: vec![],
        }
    }

    fn requests_report() -> Report {
        report_from_requests(
            br#"{"state": "running", "user_count": 3, "worker_count": 2, "total_rps": 4.5,
                "fail_ratio": null, "current_response_time_percentile_1": null,
                "stats": [{"method": "", "name": "Aggregated", "num_requests": 9,
                  "num_failures": 1, "min_response_time": 2, "max_response_time": 30,
                  "current_rps": 1.0, "current_fail_per_sec": 0, "avg_response_time": 7.5,
                  "median_response_time": 5, "total_rps": 4.5, "total_fail_per_sec": 0.5,
                  "response_time_percentile_0.95": 30, "response_time_percentile_0.99": 30,
                  "avg_content_length": 10, "safe_name": "Aggregated"}],
                "errors": [{"method": "GET", "name": "/a", "error": "500", "occurrences": 1}],
                "workers": []}"#,
        )
        .unwrap()
    }

    #[test]
    fn snapshots_merge_and_a_lone_master_without_the_plugin_stands_for_itself() {
        let a = snapshot(vec![entry("GET", "/a", &[(101, 5.0), (102, 7.0)])]);
        let b = snapshot(vec![entry("GET", "/a", &[(103, 50.0)])]);
        let got = combine(vec![
            ("http://a".into(), Answer::Snapshot(a.clone())),
            ("http://b".into(), Answer::Snapshot(b.clone())),
        ])
        .unwrap();
        assert!(got.exact());
        assert_eq!(got, Current::Merged(merge::merge(&[a.clone(), b])));
        let r = got.report();
        assert_eq!((r.masters, r.stats.last().unwrap().num_requests), (2, 3));

        let lone = combine(vec![(
            "http://x".into(),
            Answer::Requests(requests_report()),
        )])
        .unwrap();
        assert!(!lone.exact());
        assert_eq!(lone.report(), requests_report());
        assert_eq!(lone.stats_csv(), None, "its own CSV is the answer");
    }

    #[test]
    fn several_masters_of_which_one_has_no_plugin_are_not_merged_and_say_which() {
        let a = snapshot(vec![]);
        let e = combine(vec![
            ("http://a".into(), Answer::Snapshot(a)),
            ("http://b".into(), Answer::Requests(requests_report())),
        ])
        .unwrap_err();
        assert!(
            matches!(&e, ViewError::NoPlugin { index: 1, url, masters: 2 } if url == "http://b"),
            "{e}"
        );
        assert!(e
            .to_string()
            .contains("let `fleet serve` manage every master"));
        assert!(matches!(combine(vec![]), Err(ViewError::NoMaster)));
    }

    #[test]
    fn a_requests_answer_reads_missing_and_null_numbers_as_zero() {
        let r = requests_report();
        assert_eq!((r.fail_ratio, r.current_rps, r.total_rps), (0.0, 0.0, 4.5));
        assert_eq!(
            (r.state.as_str(), r.user_count, r.worker_count),
            ("running", 3, 2)
        );
        assert_eq!(r.stats[0].p95, 30);
        assert_eq!((r.errors[0].occurrences, r.errors[0].first_seen), (1, None));
        assert!(report_from_requests(b"<html>").is_err());
    }

    #[test]
    fn the_csv_header_is_locusts() {
        assert_eq!(
            stats_csv_header().join(","),
            "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,\
             Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,\
             50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%"
        );
    }

    #[test]
    fn the_csv_rows_are_locusts_numbers_of_the_merge() {
        let a = snapshot(vec![
            entry("GET", "/a", &[(101, 5.0), (102, 7.25)]),
            entry("POST", "/b,\"c\"", &[]),
        ]);
        let b = snapshot(vec![entry("GET", "/a", &[(103, 147.0)])]);
        let m = merge::merge(&[a, b]);
        let csv = stats_csv(&m);
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(lines.len(), 5, "{csv}");
        // /a: 3 requests over the 8 s since the stats began; the median is the 7 ms bucket;
        // the 147 ms request sits in bucket 147 here (this test buckets by rounding only).
        assert_eq!(
            lines[1],
            "GET,/a,3,0,7,53.083333333333336,5.0,147.0,10.0,0.375,0.0,7,7,147,147,147,147,147,147,147,147,147"
        );
        assert_eq!(
            lines[2],
            "POST,\"/b,\"\"c\"\"\",0,0,0,0.0,0,0,0.0,0.0,0.0,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A"
        );
        assert!(lines[3].starts_with(",Aggregated,3,0,7,"), "{}", lines[3]);
        assert_eq!(lines[4], "");
        // A median clamped to the slowest request keeps its fraction, as Locust's does.
        let mut e = Entry::new("GET", "/c");
        e.num_requests = 1;
        e.total_response_time = 96.4;
        e.min_response_time = Some(96.4);
        e.max_response_time = 96.4;
        e.response_times = Counts::from(vec![(96, 1)]);
        assert!(csv_row(&e, m.clock).starts_with("GET,/c,1,0,96.4,96.4,96.4,96.4,"));
    }
}
