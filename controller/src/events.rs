//! `GET /api/events`: the dashboard's live feed, a Server-Sent Events stream (docs/protocol.md).
//!
//! Each event is one `snapshot` of everything the dashboard shows: the spec, the nodes and
//! which of them lag behind the current bundle, the master, and Locust's live totals. The
//! first one is sent at once; after that the state is checked every [`CHECK_EVERY`] and a new
//! snapshot goes out only when something changed ([`Snapshot::key`]: heartbeat ages, agent
//! uptimes and heartbeat source ports alone do not count, they change with every heartbeat;
//! the page ages its rows itself). A comment line keeps an idle stream open every
//! [`KEEP_ALIVE_EVERY`].
//!
//! The body is written by hand (the workspace builds axum without a `Stream` crate): a
//! `hyper::body::Body` that builds a snapshot when the connection asks for more data and a tick
//! has passed. Nothing runs outside that poll, no task is spawned per client and no lock is held
//! across an await, so the stream ends with the connection: hyper drops the body when the
//! client goes away (it notices EOF mid-response, or the next write fails).
//!
//! Locust's numbers come from [`crate::master::Master::stats`], which the swarm keeper polls
//! once a second for the whole controller: clients of this stream never reach Locust.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use fleet_common::wire::{MasterView, NodeView, SpecView};
use hyper::body::Frame;
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::master::Stats;
use crate::server::{AppState, Shared};

/// The route.
pub const ROUTE: &str = "/api/events";
/// How often a stream checks whether anything changed.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Longest silence on a stream: a comment line goes out after it.
pub const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);
/// The reconnection delay the first event asks browsers for (the SSE `retry` field), in ms.
pub const RETRY_MS: u64 = 2000;

/// Locust's live totals, as last polled by the swarm keeper.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocustView {
    pub state: String,
    pub user_count: u64,
    pub worker_count: u64,
    pub total_rps: f64,
    pub fail_ratio: f64,
}

impl From<&Stats> for LocustView {
    fn from(s: &Stats) -> LocustView {
        LocustView {
            state: s.state.clone(),
            user_count: s.user_count,
            worker_count: s.worker_count,
            // JSON has no NaN or infinity: serde_json would write null, which the page
            // would then have to guard against.
            total_rps: finite(s.total_rps),
            fail_ratio: finite(s.fail_ratio),
        }
    }
}

fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

/// One `snapshot` event: everything the dashboard shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The fleet's name.
    pub fleet: String,
    /// As `GET /api/spec`.
    pub spec: SpecView,
    /// As `GET /api/nodes`.
    pub nodes: Vec<NodeView>,
    /// Ids of the nodes whose running bundle is not the current one (in `nodes` order).
    pub lagging: Vec<String>,
    /// As `GET /api/master`.
    pub master: MasterView,
    /// Locust's live totals; null before the first poll and while a managed master is down.
    pub locust: Option<LocustView>,
}

/// Ids of the nodes that do not run `current` (a node running nothing lags too). With nothing
/// published there is nothing to lag behind.
pub fn lagging(current: Option<&str>, nodes: &[NodeView]) -> Vec<String> {
    let Some(cur) = current else {
        return Vec::new();
    };
    nodes
        .iter()
        .filter(|n| n.heartbeat.running.as_ref().map(|r| r.sha256.as_str()) != Some(cur))
        .map(|n| n.heartbeat.node_id.clone())
        .collect()
}

/// A snapshot from its parts.
pub fn build(
    fleet: &str,
    spec: SpecView,
    nodes: Vec<NodeView>,
    master: MasterView,
    stats: Option<&Stats>,
) -> Snapshot {
    let lagging = lagging(spec.current.as_ref().map(|c| c.sha256.as_str()), &nodes);
    // A managed master that does not run has no live numbers: the last ones polled are stale.
    let locust = stats
        .filter(|_| !master.managed || master.pid.is_some())
        .map(LocustView::from);
    Snapshot {
        fleet: fleet.to_string(),
        spec,
        nodes,
        lagging,
        master,
        locust,
    }
}

/// The controller's state now. Each part is read under its own lock, one after the other.
pub fn snapshot(st: &AppState) -> Snapshot {
    let spec = st.publisher.view();
    let nodes = st.nodes.list();
    let master = st.master.view();
    let stats = st.master.stats();
    build(&st.name, spec, nodes, master, stats.as_ref())
}

impl Snapshot {
    /// This snapshot without what changes with every heartbeat while nothing happens: the
    /// heartbeat age, the agent's uptime, and the source port of the heartbeat's connection
    /// (a new one each time). Two snapshots with equal keys show the same state.
    pub fn key(&self) -> Snapshot {
        let mut k = self.clone();
        for n in &mut k.nodes {
            n.heartbeat_age_s = 0.0;
            n.heartbeat.uptime_s = 0;
            if let Ok(a) = n.addr.parse::<std::net::SocketAddr>() {
                n.addr = a.ip().to_string();
            }
        }
        k
    }

    /// The SSE event: `event: snapshot` and the JSON on one `data:` line (serde_json writes
    /// no raw newline).
    pub fn to_event(&self) -> String {
        let json = serde_json::to_string(self).expect("a snapshot serialises");
        format!("event: snapshot\ndata: {json}\n\n")
    }
}

/// The event stream as a response body: snapshots from `source` when they change.
pub struct EventStream<F> {
    source: F,
    tick: Interval,
    keep_alive_every: Duration,
    /// The key of the last snapshot sent; `None` before the first.
    last: Option<Snapshot>,
    last_sent: Instant,
}

impl<F: FnMut() -> Snapshot> EventStream<F> {
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
            last: None,
            last_sent: Instant::now(),
        }
    }

    /// The next chunk to send, if one is due now (called once per tick).
    fn next_chunk(&mut self) -> Option<Bytes> {
        let snap = (self.source)();
        let key = snap.key();
        if self.last.as_ref() != Some(&key) {
            let first = self.last.is_none();
            self.last = Some(key);
            self.last_sent = Instant::now();
            let event = snap.to_event();
            return Some(Bytes::from(if first {
                format!("retry: {RETRY_MS}\n{event}")
            } else {
                event
            }));
        }
        if self.last_sent.elapsed() >= self.keep_alive_every {
            self.last_sent = Instant::now();
            return Some(Bytes::from_static(b": keep-alive\n\n"));
        }
        None
    }
}

impl<F: FnMut() -> Snapshot + Unpin> hyper::body::Body for EventStream<F> {
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
    let body = EventStream::new(move || snapshot(&st));
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
    use std::sync::Arc;

    use fleet_common::bundle::{pack_dir, Limits};
    use fleet_common::manifest::{MasterAddr, SigningKey};
    use fleet_common::wire::{
        Heartbeat, NodeStatus, Running, SpecVersion, WorkerReport, WorkerState,
    };
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn version(seq: u64, sha: &str) -> SpecVersion {
        SpecVersion {
            sequence: seq,
            sha256: sha.to_string(),
            size: 100,
            master_epoch: 1,
            created: "2025-01-01T00:00:00Z".into(),
        }
    }

    fn spec(current: Option<&str>) -> SpecView {
        let cur = current.map(|s| version(2, s));
        SpecView {
            current: cur.clone(),
            history: cur.into_iter().chain([version(1, "old")]).collect(),
            last_error: None,
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

    fn node(id: &str, running: Option<&str>) -> NodeView {
        NodeView {
            heartbeat: heartbeat(id, running),
            heartbeat_age_s: 0.5,
            addr: "127.0.0.1:5000".into(),
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
        }
    }

    fn stats() -> Stats {
        Stats {
            state: "running".into(),
            user_count: 10,
            worker_count: 3,
            total_rps: 41.5,
            fail_ratio: 0.25,
        }
    }

    #[test]
    fn lagging_nodes_are_those_not_running_the_current_bundle() {
        let nodes = vec![
            node("a", Some("new")),
            node("b", Some("old")),
            node("c", None),
            node("d", Some("new")),
        ];
        assert_eq!(lagging(Some("new"), &nodes), vec!["b", "c"]);
        assert_eq!(lagging(Some("old"), &nodes), vec!["a", "c", "d"]);
        assert!(
            lagging(None, &nodes).is_empty(),
            "nothing published: nothing to lag behind"
        );
        assert!(lagging(Some("new"), &[]).is_empty());
    }

    #[test]
    fn build_fills_lagging_and_locust() {
        let s = build(
            "f",
            spec(Some("new")),
            vec![node("a", Some("new")), node("b", Some("old"))],
            master(true, Some(9)),
            Some(&stats()),
        );
        assert_eq!(s.fleet, "f");
        assert_eq!(s.lagging, vec!["b"]);
        assert_eq!(s.nodes.len(), 2);
        let l = s.locust.as_ref().unwrap();
        assert_eq!(
            (l.state.as_str(), l.user_count, l.worker_count),
            ("running", 10, 3)
        );
        assert_eq!((l.total_rps, l.fail_ratio), (41.5, 0.25));

        // The wire shape the dashboard reads.
        let v: serde_json::Value = serde_json::from_str(
            s.to_event()
                .strip_prefix("event: snapshot\ndata: ")
                .unwrap()
                .strip_suffix("\n\n")
                .unwrap(),
        )
        .unwrap();
        assert_eq!(v["spec"]["current"]["sha256"], "new");
        assert_eq!(v["spec"]["history"][1]["sha256"], "old");
        assert_eq!(v["nodes"][1]["node_id"], "b");
        assert_eq!(v["nodes"][1]["running"]["sha256"], "old");
        assert_eq!(v["lagging"], serde_json::json!(["b"]));
        assert_eq!(v["master"]["epoch"], 1);
        assert_eq!(v["locust"]["total_rps"], 41.5);
        assert_eq!(v["locust"]["fail_ratio"], 0.25);

        // A managed master that is down: its last numbers are not live.
        let down = build("f", spec(None), vec![], master(true, None), Some(&stats()));
        assert!(down.locust.is_none());
        assert!(down.lagging.is_empty());
        // An external master is not supervised: its numbers are all there is.
        let ext = build("f", spec(None), vec![], master(false, None), Some(&stats()));
        assert!(ext.locust.is_some());
        assert!(build("f", spec(None), vec![], master(false, None), None)
            .locust
            .is_none());
        // No NaN on the wire.
        let nan = Stats {
            fail_ratio: f64::NAN,
            ..stats()
        };
        let s = build("f", spec(None), vec![], master(false, None), Some(&nan));
        assert_eq!(s.locust.unwrap().fail_ratio, 0.0);
    }

    #[test]
    fn ages_and_uptimes_are_not_changes() {
        let a = build(
            "f",
            spec(Some("x")),
            vec![node("a", Some("x"))],
            master(false, None),
            None,
        );
        let mut b = a.clone();
        b.nodes[0].heartbeat_age_s = 12.0;
        b.nodes[0].heartbeat.uptime_s = 99;
        b.nodes[0].addr = "127.0.0.1:5001".into();
        assert_ne!(a, b);
        assert_eq!(a.key(), b.key());
        b.nodes[0].addr = "10.0.0.7:5001".into();
        assert_ne!(a.key(), b.key(), "another address is news");
        b.nodes[0].addr = a.nodes[0].addr.clone();
        assert_eq!(a.key(), b.key());
        b.nodes[0].heartbeat.status = NodeStatus::RolledBack;
        assert_ne!(a.key(), b.key());
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
            "f",
            spec(Some("one")),
            vec![node("a", Some("one"))],
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
            first.starts_with("retry: 2000\nevent: snapshot\ndata: {"),
            "{first}"
        );
        assert!(first.ends_with("}\n\n"));
        assert!(first.contains("\"sha256\":\"one\""));

        // Only time passes: the next frame is a keep-alive comment, not a snapshot.
        state.lock().unwrap().nodes[0].heartbeat_age_s = 3.0;
        state.lock().unwrap().nodes[0].heartbeat.uptime_s = 100;
        let t = std::time::Instant::now();
        let ka = next(&mut body, Duration::from_secs(2)).await;
        assert_eq!(ka, ": keep-alive\n\n");
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );

        // A change goes out within a tick or two.
        {
            let mut s = state.lock().unwrap();
            *s = build(
                "f",
                spec(Some("two")),
                vec![node("a", Some("one"))],
                master(false, None),
                None,
            );
        }
        let ev = next(&mut body, Duration::from_millis(200)).await;
        assert!(ev.starts_with("event: snapshot\ndata: {"), "{ev}");
        let snap: Snapshot = serde_json::from_str(
            ev.strip_prefix("event: snapshot\ndata: ")
                .unwrap()
                .trim_end(),
        )
        .unwrap();
        assert_eq!(snap.spec.current.unwrap().sha256, "two");
        assert_eq!(snap.lagging, vec!["a"]);
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
                        build("f", spec(None), vec![], master(false, None), None)
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
        while !got.contains("event: snapshot") {
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

    /// A stand-in for Locust's web UI: answers every request with `stats` JSON.
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
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tcp.write_all(resp.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}/locust")
    }

    #[tokio::test]
    async fn snapshot_of_the_app_state() {
        let web_url = fake_locust(
            r#"{"state":"running","user_count":4,"worker_count":2,"total_rps":12.5,"fail_ratio":0.5,"stats":[]}"#,
        )
        .await;
        let spec_dir = tempfile::tempdir().unwrap();
        let state_dir = tempfile::tempdir().unwrap();
        let (key, _) = SigningKey::generate();
        let publisher = Arc::new(
            crate::publish::Publisher::open(
                "snap",
                "locustfile.py",
                key,
                &state_dir.path().join("published"),
                5,
            )
            .unwrap(),
        );
        let target = crate::publish::Target {
            master: MasterAddr {
                host: "127.0.0.1".into(),
                port: 5557,
            },
            master_epoch: 0,
            worker_args: vec![],
        };
        std::fs::write(spec_dir.path().join("locustfile.py"), "one").unwrap();
        let one = pack_dir(spec_dir.path(), "locustfile.py", &Limits::default()).unwrap();
        publisher.publish(&one, &target).unwrap();
        std::fs::write(spec_dir.path().join("locustfile.py"), "two").unwrap();
        let two = pack_dir(spec_dir.path(), "locustfile.py", &Limits::default()).unwrap();
        publisher.publish(&two, &target).unwrap();

        let cfg = crate::config::MasterConfig {
            managed: false,
            web_url,
            ..Default::default()
        };
        let master = crate::master::Master::start(cfg, "locustfile.py", state_dir.path());
        let ui = crate::secrets::PasswordHash::parse(&crate::secrets::hash_password("pw")).unwrap();
        let st = AppState {
            publisher,
            nodes: Arc::new(crate::nodes::Nodes::default()),
            master,
            auth: Arc::new(crate::auth::Auth::new("agent-tok", "operator-tok", ui)),
            name: "snap".into(),
        };
        let addr: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(st.nodes.update(heartbeat("n2", Some(&one.sha256)), addr));
        assert!(st.nodes.update(heartbeat("n1", Some(&two.sha256)), addr));
        assert!(st.nodes.update(heartbeat("n3", None), addr));

        let s = snapshot(&st);
        assert_eq!(s.fleet, "snap");
        let cur = s.spec.current.as_ref().unwrap();
        assert_eq!(
            (cur.sequence, cur.sha256.as_str()),
            (2, two.sha256.as_str())
        );
        let hist: Vec<u64> = s.spec.history.iter().map(|v| v.sequence).collect();
        assert_eq!(hist, vec![2, 1], "newest first");
        let ids: Vec<&str> = s
            .nodes
            .iter()
            .map(|n| n.heartbeat.node_id.as_str())
            .collect();
        assert_eq!(ids, vec!["n1", "n2", "n3"]);
        assert_eq!(s.lagging, vec!["n2", "n3"]);
        assert!(!s.master.managed);

        // Locust's totals arrive with the swarm keeper's next poll (once a second).
        let t = std::time::Instant::now();
        let locust = loop {
            if let Some(l) = snapshot(&st).locust {
                break l;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "no Locust stats");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(
            locust,
            LocustView {
                state: "running".into(),
                user_count: 4,
                worker_count: 2,
                total_rps: 12.5,
                fail_ratio: 0.5,
            }
        );

        // No secret of the state in the event.
        let ev = snapshot(&st).to_event();
        for secret in ["agent-tok", "operator-tok", "pbkdf2"] {
            assert!(!ev.contains(secret), "{secret} in {ev}");
        }
    }
}
