//! `GET /api/events`: the dashboard's live feed, a Server-Sent Events stream (docs/protocol.md).
//!
//! The stream carries what the dashboard shows above its node table, in four parts, each its
//! own event sent only when it changed: `spec` (the publication and its history), `nodes` (the
//! node table in counts: by standing, by status, by running bundle, and a version), `master`,
//! and `locust` (the live totals). The first chunk holds all four; after that the state is
//! checked every [`CHECK_EVERY`] and only the parts whose JSON differs from what this stream
//! last sent go out ([`Sent::diff`]). Node rows never travel on the stream: with 1000 nodes a
//! full table each second is ~0.5 MB per open dashboard. The page fetches the one page of rows
//! it shows (`GET /api/nodes?standing=...&limit=50`) when the `nodes` part says they changed.
//! Heartbeat ages, uptimes and source ports move with every heartbeat and change no part. A
//! comment line keeps an idle stream open every [`KEEP_ALIVE_EVERY`].
//!
//! The body is written by hand (the workspace builds axum without a `Stream` crate): a
//! `hyper::body::Body` that builds the parts when the connection asks for more data and a tick
//! has passed. Nothing runs outside that poll, no task is spawned per client and no lock is held
//! across an await, so the stream ends with the connection: hyper drops the body when the
//! client goes away (it notices EOF mid-response, or the next write fails).
//!
//! Locust's numbers come from [`crate::master::view::StatsView`], which reads every master's
//! stats once a second for the whole controller and merges them: clients of this stream never
//! reach Locust.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use fleet_common::wire::{MasterView, SpecView};
use hyper::body::Frame;
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::daemon::nodes::overview::NodeSummary;
use crate::daemon::nodes::standing::Current;
use crate::daemon::router::{AppState, Shared};
use crate::master::merge::{ErrorRow, Report, Row};
use crate::master::view;

/// The route.
pub const ROUTE: &str = "/api/events";
/// The node summary alone, for clients that poll.
pub const SUMMARY_ROUTE: &str = "/api/summary";
/// How often a stream checks whether anything changed.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Longest silence on a stream: a comment line goes out after it.
pub const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);
/// The reconnection delay the first event asks browsers for (the SSE `retry` field), in ms.
pub const RETRY_MS: u64 = 2000;

/// The most endpoint rows the stream carries, in Locust's order (its own page shows 500);
/// `GET /api/stats` has them all.
pub const MAX_ROWS: usize = 100;
/// The most error rows the stream carries, the most frequent first.
pub const MAX_ERRORS: usize = 20;

/// The test's numbers, merged over its masters ([`crate::master::view`]): Locust's live
/// totals (the first five fields, as before the merged view) and its rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocustView {
    pub state: String,
    pub user_count: u64,
    pub worker_count: u64,
    pub total_rps: f64,
    pub fail_ratio: f64,
    pub current_rps: f64,
    pub current_fail_per_sec: f64,
    /// How many masters the numbers come from.
    pub masters: usize,
    /// From the masters' histograms (fleet's stats plugin), merged exactly; false for a master
    /// without the plugin, whose own `/stats/requests` it is.
    pub exact: bool,
    /// Endpoint rows in Locust's order (at most [`MAX_ROWS`]), then the `Aggregated` row; the
    /// keys of Locust's `/stats/requests` rows.
    pub stats: Vec<Row>,
    /// How many endpoints the test has (rows beyond [`MAX_ROWS`] are left out).
    pub endpoints: usize,
    /// Errors, the most frequent first (at most [`MAX_ERRORS`]).
    pub errors: Vec<ErrorRow>,
    /// How many distinct errors there are.
    pub error_kinds: usize,
}

impl LocustView {
    pub fn new(r: &Report, exact: bool) -> LocustView {
        // Both Locust and the merge put the Aggregated row last.
        let (rows, total) = match r.stats.split_last() {
            Some((t, rows)) if t.name == "Aggregated" && t.method.is_empty() => (rows, Some(t)),
            _ => (&r.stats[..], None),
        };
        let endpoints = rows.len();
        let stats: Vec<Row> = rows.iter().take(MAX_ROWS).chain(total).cloned().collect();
        let mut errors = r.errors.clone();
        errors.sort_by_key(|e| std::cmp::Reverse(e.occurrences));
        errors.truncate(MAX_ERRORS);
        LocustView {
            state: r.state.clone(),
            user_count: r.user_count,
            worker_count: r.worker_count,
            // JSON has no NaN or infinity: serde_json would write null, which the page
            // would then have to guard against.
            total_rps: finite(r.total_rps),
            fail_ratio: finite(r.fail_ratio),
            current_rps: finite(r.current_rps),
            current_fail_per_sec: finite(r.current_fail_per_sec),
            masters: r.masters,
            exact,
            stats: stats.into_iter().map(finite_row).collect(),
            endpoints,
            errors,
            error_kinds: r.errors.len(),
        }
    }
}

fn finite_row(mut r: Row) -> Row {
    for x in [
        &mut r.min_response_time,
        &mut r.max_response_time,
        &mut r.current_rps,
        &mut r.current_fail_per_sec,
        &mut r.avg_response_time,
        &mut r.median_response_time,
        &mut r.total_rps,
        &mut r.total_fail_per_sec,
        &mut r.avg_content_length,
    ] {
        *x = finite(*x);
    }
    r
}

fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

/// Everything the dashboard shows, in the parts the stream sends separately.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parts {
    /// As `GET /api/spec`.
    pub spec: SpecView,
    /// The node table in counts, as `GET /api/summary`.
    pub nodes: NodeSummary,
    /// As `GET /api/master`.
    pub master: MasterView,
    /// The test's numbers; null before the first read and while a managed master is down.
    pub locust: Option<LocustView>,
}

/// The parts from their sources.
pub fn build(
    spec: SpecView,
    nodes: NodeSummary,
    master: MasterView,
    view: Option<&view::Current>,
) -> Parts {
    // A managed master that does not run has no live numbers: the last ones read are stale.
    let locust = view
        .filter(|_| !master.managed || master.pid.is_some())
        .map(|v| LocustView::new(&v.report(), v.exact()));
    Parts {
        spec,
        nodes,
        master,
        locust,
    }
}

/// The node table in counts, classified against the current publication.
pub fn node_summary(st: &AppState) -> NodeSummary {
    let spec = st.publisher.view();
    summary_for(st, &spec)
}

fn summary_for(st: &AppState, spec: &SpecView) -> NodeSummary {
    let current = spec.current.as_ref().map(Current::from);
    st.nodes.summary(current, std::time::Instant::now())
}

/// The controller's state now. Each part is read under its own lock, one after the other.
pub fn parts(st: &AppState) -> Parts {
    let spec = st.publisher.view();
    let nodes = summary_for(st, &spec);
    let mut master = st.master.view();
    master.capacity_warning = st.master.capacity_warning(st.nodes.listed_count());
    let view = st.stats.latest();
    build(spec, nodes, master, view.as_deref())
}

/// What one stream has sent: the JSON of each part as last sent. Node rows are not part of
/// the stream; the page fetches the page of rows it shows from `GET /api/nodes` when the
/// `nodes` summary says they changed (its `version` or counts).
#[derive(Debug, Default)]
pub struct Sent {
    spec: Option<String>,
    nodes: Option<String>,
    master: Option<String>,
    locust: Option<String>,
}

impl Sent {
    /// The events for the parts that changed since the last call (every part the first time),
    /// in the order `spec`, `nodes`, `master`, `locust`; empty when nothing changed. Each event
    /// is its name and the part's JSON on one `data:` line (serde_json writes no raw newline).
    pub fn diff(&mut self, p: &Parts) -> String {
        let mut out = String::new();
        for (name, slot, data) in [
            ("spec", &mut self.spec, json(&p.spec)),
            ("nodes", &mut self.nodes, json(&p.nodes)),
            ("master", &mut self.master, json(&p.master)),
            ("locust", &mut self.locust, json(&p.locust)),
        ] {
            if slot.as_deref() != Some(data.as_str()) {
                out.push_str(&format!("event: {name}\ndata: {data}\n\n"));
                *slot = Some(data);
            }
        }
        out
    }
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("a dashboard part serialises")
}

/// The event stream as a response body: the parts from `source` that changed.
pub struct EventStream<F> {
    source: F,
    tick: Interval,
    keep_alive_every: Duration,
    sent: Sent,
    first: bool,
    last_sent: Instant,
}

impl<F: FnMut() -> Parts> EventStream<F> {
    /// A stream with the standard timing. Needs a Tokio runtime.
    pub fn new(source: F) -> EventStream<F> {
        EventStream::with_timing(source, CHECK_EVERY, KEEP_ALIVE_EVERY)
    }

    pub fn with_timing(source: F, check_every: Duration, keep_alive_every: Duration) -> Self {
        let mut tick = tokio::time::interval(check_every);
        // A client that reads slowly is not owed a burst of checks.
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        EventStream {
            source,
            tick,
            keep_alive_every,
            sent: Sent::default(),
            first: true,
            last_sent: Instant::now(),
        }
    }

    /// The next chunk to send, if one is due now (called once per tick).
    fn next_chunk(&mut self) -> Option<Bytes> {
        let events = self.sent.diff(&(self.source)());
        if !events.is_empty() {
            self.last_sent = Instant::now();
            if std::mem::take(&mut self.first) {
                return Some(Bytes::from(format!("retry: {RETRY_MS}\n{events}")));
            }
            return Some(Bytes::from(events));
        }
        if self.last_sent.elapsed() >= self.keep_alive_every {
            self.last_sent = Instant::now();
            return Some(Bytes::from_static(b": keep-alive\n\n"));
        }
        None
    }
}

impl<F: FnMut() -> Parts + Unpin> hyper::body::Body for EventStream<F> {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            std::task::ready!(this.tick.poll_tick(cx));
            if let Some(chunk) = this.next_chunk() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        false
    }
}

/// The `GET /api/events` answer for the controller's state.
pub fn response(st: Shared) -> Response {
    let body = EventStream::new(move || parts(&st));
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            // A buffering reverse proxy in front (nginx) would hold the events back.
            (
                HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        Body::new(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use fleet_common::bundle::{pack_dir, Limits};
    use fleet_common::manifest::{MasterAddr, SigningKey};
    use fleet_common::wire::{
        Heartbeat, NodeStatus, Running, SpecVersion, Standing, WorkerReport, WorkerState,
    };
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::daemon::nodes::overview::BundleCount;

    const ONE: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const TWO: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    fn version(seq: u64, sha: &str) -> SpecVersion {
        SpecVersion {
            sequence: seq,
            sha256: sha.to_string(),
            size: 100,
            master_epoch: 1,
            created: "2025-01-01T00:00:00Z".into(),
            origin: "directory".into(),
        }
    }

    fn spec(current: Option<&str>) -> SpecView {
        let cur = current.map(|s| version(2, s));
        SpecView {
            current: cur.clone(),
            history: cur.into_iter().chain([version(1, ONE)]).collect(),
            ..SpecView::default()
        }
    }

    fn heartbeat(id: &str, running: Option<&str>) -> Heartbeat {
        Heartbeat {
            node_id: id.to_string(),
            backend: "local".into(),
            agent_version: "0.1.0".into(),
            running: running.map(|s| Running {
                sha256: s.to_string(),
                sequence: 2,
                master_epoch: 1,
                since_ms: 1,
            }),
            last_good: None,
            workers: vec![WorkerReport {
                index: 0,
                pid: Some(42),
                state: WorkerState::Running,
                restarts: 0,
                last_exit: None,
            }],
            status: NodeStatus::Running,
            last_error: None,
            rejected: None,
            uptime_s: 7,
            update: None,
            seen_sequence: None,
        }
    }

    /// A summary of `n` nodes, all current on `sha`.
    fn summary(n: usize, sha: &str, version: u64) -> NodeSummary {
        let mut standing: BTreeMap<Standing, usize> =
            Standing::ALL.iter().map(|s| (*s, 0)).collect();
        standing.insert(Standing::Current, n);
        NodeSummary {
            total: n,
            standing,
            status: [(NodeStatus::Running, n)].into(),
            bundles: vec![BundleCount {
                sha256: Some(sha.into()),
                nodes: n,
            }],
            other_bundles: 0,
            version,
        }
    }

    fn master(managed: bool, pid: Option<u32>) -> MasterView {
        MasterView {
            managed,
            pid,
            epoch: 1,
            restarts: 0,
            user_classes: vec!["Web".into()],
            web_url: "http://127.0.0.1:8089/locust".into(),
            swarm: None,
            shards: vec![],
            capacity_warning: None,
        }
    }

    fn row(method: &str, name: &str, n: u64) -> Row {
        Row {
            method: method.into(),
            name: name.into(),
            num_requests: n,
            num_failures: 0,
            min_response_time: 1.0,
            max_response_time: 9.0,
            current_rps: 1.0,
            current_fail_per_sec: 0.0,
            avg_response_time: 2.5,
            median_response_time: 2.0,
            total_rps: 1.0,
            total_fail_per_sec: 0.0,
            p95: 8,
            p99: 9,
            avg_content_length: 100.0,
        }
    }

    fn report(endpoints: usize) -> Report {
        let mut stats: Vec<Row> = (0..endpoints)
            .map(|i| row("GET", &format!("/e{i:03}"), 1))
            .collect();
        stats.push(row("", "Aggregated", endpoints as u64));
        Report {
            stats,
            errors: vec![],
            current_rps: 40.0,
            current_fail_per_sec: 0.5,
            total_rps: 41.5,
            total_fail_per_sec: 0.5,
            fail_ratio: 0.25,
            state: "running".into(),
            user_count: 10,
            worker_count: 3,
            masters: 1,
        }
    }

    fn stats() -> view::Current {
        view::Current::Requests(report(2))
    }

    /// The events of a chunk: (name, JSON).
    fn events(chunk: &str) -> Vec<(String, serde_json::Value)> {
        chunk
            .split("\n\n")
            .filter(|b| b.contains("data: "))
            .map(|b| {
                let name = b
                    .lines()
                    .find_map(|l| l.strip_prefix("event: "))
                    .expect("a named event");
                let data = b.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
                (name.to_string(), serde_json::from_str(data).unwrap())
            })
            .collect()
    }

    fn names(chunk: &str) -> Vec<String> {
        events(chunk).into_iter().map(|e| e.0).collect()
    }

    #[test]
    fn build_keeps_locust_numbers_only_while_they_are_live() {
        let p = build(
            spec(Some(TWO)),
            summary(2, TWO, 1),
            master(true, Some(9)),
            Some(&stats()),
        );
        let l = p.locust.as_ref().unwrap();
        assert_eq!(
            (l.state.as_str(), l.user_count, l.worker_count),
            ("running", 10, 3)
        );
        assert_eq!((l.total_rps, l.fail_ratio), (41.5, 0.25));
        // A managed master that is down: its last numbers are not live.
        let down = build(
            spec(None),
            summary(0, TWO, 0),
            master(true, None),
            Some(&stats()),
        );
        assert!(down.locust.is_none());
        // An external master is not supervised: its numbers are all there is.
        let ext = build(
            spec(None),
            summary(0, TWO, 0),
            master(false, None),
            Some(&stats()),
        );
        assert!(ext.locust.is_some());
        // No NaN on the wire.
        let mut nan = report(1);
        nan.fail_ratio = f64::NAN;
        nan.stats[0].avg_response_time = f64::INFINITY;
        let p = build(
            spec(None),
            summary(0, TWO, 0),
            master(false, None),
            Some(&view::Current::Requests(nan)),
        );
        let l = p.locust.unwrap();
        assert_eq!((l.fail_ratio, l.stats[0].avg_response_time), (0.0, 0.0));
    }

    #[test]
    fn the_locust_part_carries_the_rows_up_to_a_limit_and_the_aggregated_row_always() {
        let mut r = report(MAX_ROWS + 5);
        let err = |name: &str, n| ErrorRow {
            method: "GET".into(),
            name: name.into(),
            error: "500".into(),
            occurrences: n,
            first_seen: None,
            last_seen: None,
        };
        r.errors = (0..MAX_ERRORS as u64 + 3)
            .map(|n| err(&format!("/x{n}"), n))
            .collect();
        let l = LocustView::new(&r, true);
        assert_eq!((l.endpoints, l.stats.len()), (MAX_ROWS + 5, MAX_ROWS + 1));
        assert_eq!(l.stats[0].name, "/e000");
        assert_eq!(l.stats.last().unwrap().name, "Aggregated");
        assert_eq!(l.stats.last().unwrap().num_requests, MAX_ROWS as u64 + 5);
        assert_eq!(
            (l.errors.len(), l.error_kinds),
            (MAX_ERRORS, MAX_ERRORS + 3)
        );
        assert_eq!(
            l.errors[0].occurrences,
            MAX_ERRORS as u64 + 2,
            "most frequent first"
        );
        assert!(l.exact && l.masters == 1);
        // The wire keeps Locust's row keys, and the totals the page read before.
        let json = serde_json::to_value(&l).unwrap();
        assert_eq!(json["stats"][0]["response_time_percentile_0.95"], 8);
        assert_eq!(json["total_rps"], 41.5);
        assert_eq!(json["current_rps"], 40.0);
        // Without an Aggregated row (no such Locust answer, but no panic either).
        r.stats.pop();
        assert_eq!(LocustView::new(&r, false).endpoints, MAX_ROWS + 5);
    }

    #[test]
    fn diff_sends_every_part_first_then_only_what_changed() {
        let mut sent = Sent::default();
        let mut p = build(
            spec(Some(TWO)),
            summary(2, TWO, 1),
            master(false, None),
            Some(&stats()),
        );
        let first = sent.diff(&p);
        assert_eq!(names(&first), ["spec", "nodes", "master", "locust"]);
        // The wire shape the dashboard reads.
        let ev: BTreeMap<String, serde_json::Value> = events(&first).into_iter().collect();
        assert_eq!(ev["locust"]["stats"][2]["name"], "Aggregated");
        assert_eq!(ev["spec"]["current"]["sha256"], TWO);
        assert_eq!(ev["spec"]["history"][1]["sha256"], ONE);
        assert_eq!(ev["nodes"]["total"], 2);
        assert_eq!(ev["nodes"]["standing"]["current"], 2);
        assert_eq!(ev["nodes"]["standing"]["refused"], 0);
        assert_eq!(ev["nodes"]["status"]["running"], 2);
        assert_eq!(ev["nodes"]["bundles"][0]["sha256"], TWO);
        assert_eq!(ev["nodes"]["version"], 1);
        assert_eq!(ev["master"]["epoch"], 1);
        assert_eq!(ev["locust"]["total_rps"], 41.5);

        // Nothing changed: nothing to send.
        assert_eq!(sent.diff(&p), "");
        // Locust's numbers move every second under load: only they go out (about 330 bytes
        // a row, here two endpoints and the Aggregated row).
        p.locust.as_mut().unwrap().total_rps = 50.0;
        let only = sent.diff(&p);
        assert_eq!(names(&only), ["locust"]);
        assert!(only.len() < 1300, "{} bytes: {only}", only.len());
        // A node row changed: the (small) summary goes out, no row.
        p.nodes.version = 2;
        assert_eq!(names(&sent.diff(&p)), ["nodes"]);
        p.spec = spec(Some(ONE));
        p.master.epoch = 2;
        assert_eq!(names(&sent.diff(&p)), ["spec", "master"]);
        p.locust = None;
        let gone = sent.diff(&p);
        assert_eq!(gone, "event: locust\ndata: null\n\n");
    }

    #[test]
    fn a_summary_of_a_thousand_nodes_stays_small() {
        let nodes = crate::daemon::nodes::Nodes::default();
        let t = std::time::Instant::now();
        let addr: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
        for i in 0..1000 {
            let sha = if i % 3 == 0 { ONE } else { TWO };
            nodes
                .update(heartbeat(&format!("node-{i:04}"), Some(sha)), addr, t)
                .unwrap();
        }
        let cur = version(2, TWO);
        let s = nodes.summary(Some(Current::from(&cur)), t);
        assert_eq!(s.total, 1000);
        assert_eq!(s.standing[&Standing::Current], 666);
        assert_eq!(s.standing[&Standing::Lagging], 334);
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.len() < 600, "{} bytes: {json}", json.len());
    }

    /// Reads the next data frame of `body` as text, or panics after `within`.
    async fn next<B>(body: &mut B, within: Duration) -> String
    where
        B: hyper::body::Body<Data = Bytes, Error = Infallible> + Unpin,
    {
        let f = tokio::time::timeout(within, body.frame())
            .await
            .expect("a frame in time")
            .expect("the stream does not end")
            .unwrap();
        String::from_utf8(f.into_data().unwrap().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn stream_sends_at_once_then_changes_and_keep_alives() {
        let state = Arc::new(std::sync::Mutex::new(build(
            spec(Some(ONE)),
            summary(1, ONE, 1),
            master(false, None),
            None,
        )));
        let src = state.clone();
        let mut body = EventStream::with_timing(
            move || src.lock().unwrap().clone(),
            Duration::from_millis(20),
            Duration::from_millis(300),
        );
        let t = std::time::Instant::now();
        let first = next(&mut body, Duration::from_millis(200)).await;
        assert!(t.elapsed() < Duration::from_millis(100), "sent at once");
        assert!(
            first.starts_with("retry: 2000\nevent: spec\ndata: {"),
            "{first}"
        );
        assert_eq!(names(&first), ["spec", "nodes", "master", "locust"]);

        // Only time passes: the next frame is a keep-alive comment.
        let t = std::time::Instant::now();
        let ka = next(&mut body, Duration::from_secs(2)).await;
        assert_eq!(ka, ": keep-alive\n\n");
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );

        // A change goes out within a tick or two, and only the part that changed.
        state.lock().unwrap().spec = spec(Some(TWO));
        let ev = next(&mut body, Duration::from_millis(200)).await;
        let ev = events(&ev);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0].0, "spec");
        assert_eq!(ev[0].1["current"]["sha256"], TWO);
    }

    /// The stream over a real HTTP/1.1 connection: the body (and with it everything the
    /// source holds) is dropped once the client goes away.
    #[tokio::test]
    async fn stream_ends_when_the_client_goes_away() {
        let alive = Arc::new(());
        let held = alive.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let held = std::sync::Mutex::new(Some(held));
            let svc = hyper::service::service_fn(move |_req| {
                let guard = held.lock().unwrap().take().expect("one request");
                let body = EventStream::with_timing(
                    move || {
                        let _ = &guard;
                        build(spec(None), summary(0, ONE, 0), master(false, None), None)
                    },
                    Duration::from_millis(20),
                    Duration::from_secs(15),
                );
                async move { Ok::<_, Infallible>(hyper::Response::new(body)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = String::new();
        while !got.contains("event: spec") {
            let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0);
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert_eq!(Arc::strong_count(&alive), 2, "the stream holds its source");
        drop(c);
        let t = std::time::Instant::now();
        while Arc::strong_count(&alive) > 1 {
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "the stream outlived its client"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .expect("the connection ended")
            .unwrap();
    }

    /// A stand-in for Locust's web UI without fleet's plugin: answers every request with
    /// `stats` JSON, and the plugin's route with 404.
    async fn fake_locust(body: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let plugin =
                        String::from_utf8_lossy(&req).starts_with("GET /locust/fleet/stats ");
                    let (status, body) = match plugin {
                        true => ("404 NOT FOUND", ""),
                        false => ("200 OK", body),
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tcp.write_all(resp.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}/locust")
    }

    #[tokio::test]
    async fn parts_of_the_app_state() {
        let web_url = fake_locust(
            r#"{"state":"running","user_count":4,"worker_count":2,"total_rps":12.5,"fail_ratio":0.5,"stats":[]}"#,
        )
        .await;
        let spec_dir = tempfile::tempdir().unwrap();
        let state_dir = tempfile::tempdir().unwrap();
        let (key, _) = SigningKey::generate();
        let publisher = Arc::new(
            crate::daemon::publish::Publisher::open(
                "snap",
                "locustfile.py",
                key,
                &state_dir.path().join("published"),
                5,
            )
            .unwrap(),
        );
        let target = crate::daemon::publish::Target {
            master: MasterAddr {
                host: "127.0.0.1".into(),
                port: 5557,
            },
            master_epoch: 0,
            worker_args: vec![],
            masters: vec![],
        };
        std::fs::write(spec_dir.path().join("locustfile.py"), "one").unwrap();
        let one = pack_dir(spec_dir.path(), "locustfile.py", &Limits::default()).unwrap();
        publisher.publish(&one, &target, "directory").unwrap();
        std::fs::write(spec_dir.path().join("locustfile.py"), "two").unwrap();
        let two = pack_dir(spec_dir.path(), "locustfile.py", &Limits::default()).unwrap();
        publisher.publish(&two, &target, "directory").unwrap();

        let cfg = crate::config::MasterConfig {
            managed: false,
            web_url,
            ..Default::default()
        };
        let master = crate::master::Master::start(cfg, "locustfile.py", state_dir.path());
        let ui = crate::secrets::PasswordHash::parse(&crate::secrets::hash_password("pw")).unwrap();
        let st = AppState {
            publisher,
            nodes: Arc::new(crate::daemon::nodes::Nodes::default()),
            master,
            auth: Arc::new(crate::daemon::auth::Auth::new(
                "agent-tok",
                "operator-tok",
                ui,
            )),
            reload: Arc::new(|| anyhow::bail!("no reload in this test")),
            name: "snap".into(),
            spec: crate::daemon::spec::Handle::new(
                spec_dir.path().to_path_buf(),
                "locustfile.py".into(),
                Limits::default(),
            )
            .0,
            stats: view::StatsView::default(),
        };
        tokio::spawn(st.stats.clone().run(st.master.clone()));
        let addr: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
        let now = std::time::Instant::now();
        for (id, running) in [
            ("n2", Some(&one.sha256)),
            ("n1", Some(&two.sha256)),
            ("n3", None),
        ] {
            st.nodes
                .update(heartbeat(id, running.map(|s| s.as_str())), addr, now)
                .unwrap();
        }

        let p = parts(&st);
        let cur = p.spec.current.as_ref().unwrap();
        assert_eq!(
            (cur.sequence, cur.sha256.as_str()),
            (2, two.sha256.as_str())
        );
        let hist: Vec<u64> = p.spec.history.iter().map(|v| v.sequence).collect();
        assert_eq!(hist, vec![2, 1], "newest first");
        assert_eq!(p.nodes.total, 3);
        assert_eq!(p.nodes.standing[&Standing::Current], 1);
        assert_eq!(p.nodes.standing[&Standing::Lagging], 2);
        assert_eq!(p.nodes, node_summary(&st));
        assert!(!p.master.managed);

        // Locust's totals arrive with the stats view's next read (once a second): this master
        // has no plugin, so they are its own /stats/requests.
        let t = std::time::Instant::now();
        let locust = loop {
            if let Some(l) = parts(&st).locust {
                break l;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "no Locust stats");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(
            (
                locust.state.as_str(),
                locust.user_count,
                locust.worker_count
            ),
            ("running", 4, 2)
        );
        assert_eq!((locust.total_rps, locust.fail_ratio), (12.5, 0.5));
        assert_eq!((locust.masters, locust.exact), (1, false));

        // No secret of the state in the events.
        let ev = Sent::default().diff(&parts(&st));
        for secret in ["agent-tok", "operator-tok", "pbkdf2"] {
            assert!(!ev.contains(secret), "{secret} in {ev}");
        }
    }
}
