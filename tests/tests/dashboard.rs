//! The dashboard and its live feed, end to end: `GET /api/events` streams a `snapshot` at once
//! and again when the fleet changes (a spec edit, agents switching bundles), only to human
//! credentials; the page itself carries no secret and loads nothing from elsewhere.
//!
//! No Locust: stub workers (`sleep 3600`) and no managed master.

use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use fleet_common::wire::{MasterView, NodeView, SpecView};
use fleet_tests::{wait_for, Fleet, Options};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::header::{ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Deserialize;
use tokio_rustls::TlsConnector;

const T: Duration = Duration::from_secs(10);

/// The `snapshot` event's JSON.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Snapshot {
    fleet: String,
    spec: SpecView,
    nodes: Vec<NodeView>,
    lagging: Vec<String>,
    master: MasterView,
    locust: Option<serde_json::Value>,
}

impl Snapshot {
    fn current(&self) -> &str {
        self.spec
            .current
            .as_ref()
            .map(|c| c.sha256.as_str())
            .unwrap_or("")
    }

    fn runs(&self, sha: &str) -> bool {
        self.nodes.iter().all(|n| {
            n.heartbeat
                .running
                .as_ref()
                .is_some_and(|r| r.sha256 == sha)
        })
    }

    /// `lagging` is exactly the nodes whose running bundle is not the current one.
    fn check_lagging(&self) {
        let want: Vec<&str> = self
            .nodes
            .iter()
            .filter(|n| {
                n.heartbeat.running.as_ref().map(|r| r.sha256.as_str()) != Some(self.current())
            })
            .map(|n| n.heartbeat.node_id.as_str())
            .collect();
        assert_eq!(self.lagging, want, "lagging disagrees with the nodes");
    }
}

/// One event of the stream: a named event with its data, or a comment.
#[derive(Debug)]
enum Event {
    Named { name: String, data: String },
    Comment(String),
}

/// A `GET /api/events` stream over its own TLS connection, read as it comes.
struct Events {
    status: u16,
    headers: hyper::HeaderMap,
    body: Incoming,
    buf: String,
    /// Every `data:` payload seen, to check for secrets.
    seen: Vec<String>,
}

impl Events {
    async fn open(f: &Fleet, auth: Option<&str>) -> Events {
        let tls = fleet_common::client::tls_config(&f.ca_pem()).unwrap();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", f.port))
            .await
            .unwrap();
        let name = ServerName::try_from("127.0.0.1".to_string()).unwrap();
        let stream = TlsConnector::from(tls).connect(name, tcp).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = hyper::Request::get("/api/events")
            .header(HOST, format!("127.0.0.1:{}", f.port))
            .header(ACCEPT, "text/event-stream");
        if let Some(a) = auth {
            req = req.header(AUTHORIZATION, a);
        }
        let resp = tokio::time::timeout(
            T,
            sender.send_request(req.body(Empty::<Bytes>::new()).unwrap()),
        )
        .await
        .expect("response headers in time")
        .unwrap();
        let (parts, body) = resp.into_parts();
        Events {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
            buf: String::new(),
            seen: vec![],
        }
    }

    fn header(&self, name: hyper::header::HeaderName) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The next event or comment, within `within`.
    async fn next(&mut self, within: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut name, mut data, mut comment) = (None, Vec::new(), None);
                for line in block.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        comment = Some(c.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        name = Some(v.trim_start().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                    }
                }
                if !data.is_empty() {
                    let data = data.join("\n");
                    self.seen.push(data.clone());
                    return Event::Named {
                        name: name.unwrap_or_else(|| "message".into()),
                        data,
                    };
                }
                if let Some(c) = comment {
                    return Event::Comment(c);
                }
                continue; // `retry:` alone, or an empty block
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .unwrap_or_else(|_| panic!("no event within {within:?}; have {:?}", self.buf))
                .expect("the stream does not end")
                .expect("the stream does not break");
            if let Ok(data) = frame.into_data() {
                self.buf
                    .push_str(std::str::from_utf8(&data).expect("UTF-8 events"));
            }
        }
    }

    /// The next `snapshot` event, skipping comments.
    async fn snapshot(&mut self, within: Duration) -> Snapshot {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Event::Named { name, data } => {
                    assert_eq!(name, "snapshot", "only snapshots are sent: {data}");
                    let s: Snapshot = serde_json::from_str(&data)
                        .unwrap_or_else(|e| panic!("bad snapshot ({e}): {data}"));
                    s.check_lagging();
                    return s;
                }
                Event::Comment(_) => continue,
            }
        }
    }

    /// Snapshots until one satisfies `ok`.
    async fn until(
        &mut self,
        what: &str,
        within: Duration,
        ok: impl Fn(&Snapshot) -> bool,
    ) -> Snapshot {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out after {within:?} waiting for {what}"
            );
            let s = self.snapshot(left).await;
            if ok(&s) {
                return s;
            }
        }
    }
}

fn stub_fleet() -> Fleet {
    Fleet::new(Options {
        managed_master: false,
        worker_command: Some(vec!["sleep".into(), "3600".into()]),
        ..Default::default()
    })
}

fn basic(user: &str, pw: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    )
}

/// Every secret of the fleet directory that must never reach a page or an event.
fn secrets(f: &Fleet) -> Vec<(String, String)> {
    let mut v = vec![
        ("agent token".to_string(), f.secret("agent.token")),
        ("operator token".to_string(), f.secret("operator.token")),
        ("UI password".to_string(), f.password.clone()),
        ("UI password hash".to_string(), f.secret("ui.hash")),
    ];
    let key = std::fs::read(f.path().join("secrets/signing.pk8")).unwrap();
    v.push((
        "signing key (base64)".to_string(),
        base64::engine::general_purpose::STANDARD.encode(&key),
    ));
    for (what, s) in &v {
        assert!(s.len() >= 16, "{what} looks empty");
    }
    v
}

fn assert_no_secret(f: &Fleet, where_: &str, text: &str) {
    for (what, s) in secrets(f) {
        assert!(!text.contains(&s), "the {what} appears in {where_}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn events_follow_a_spec_edit_to_the_agents() {
    let mut f = stub_fleet();
    f.start_serve();
    let sha1 = wait_for("first publication", T, || async { f.current_sha().await }).await;
    let out = f.cli(&["scale", "--nodes", "2"]);
    assert!(
        out.status.success(),
        "scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let operator = format!("Bearer {}", f.secret("operator.token"));
    let mut ev = Events::open(&f, Some(&operator)).await;
    assert_eq!(ev.status, 200);
    assert_eq!(ev.header(CONTENT_TYPE), "text/event-stream");
    assert_eq!(ev.header(CACHE_CONTROL), "no-store");

    // The first event comes at once: the fleet as it is.
    let t = Instant::now();
    let first = ev.snapshot(Duration::from_secs(5)).await;
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "first snapshot took {:?}",
        t.elapsed()
    );
    assert_eq!(first.fleet, "e2e");
    assert_eq!(first.nodes.len(), 2, "{first:?}");
    assert_eq!(first.current(), sha1);
    assert_eq!(first.spec.history.len(), 1);
    assert!(first.runs(&sha1), "scale waited for both agents to run it");
    assert!(first.lagging.is_empty(), "{:?}", first.lagging);
    assert!(!first.master.managed);
    assert!(
        first.locust.is_none(),
        "no master runs, so no Locust numbers"
    );

    // An edit: a snapshot with the new bundle comes, then one where both agents run it.
    f.write_spec("from locust import User, task\n\n\nclass Edited(User):\n    @task\n    def t(self):\n        pass\n");
    let s2 = ev
        .until("the new publication", Duration::from_secs(20), |s| {
            s.current() != sha1
        })
        .await;
    let sha2 = s2.current().to_string();
    assert_eq!(sha2, f.current_sha().await.unwrap());
    let seqs: Vec<u64> = s2.spec.history.iter().map(|v| v.sequence).collect();
    assert_eq!(seqs, vec![2, 1], "history newest first");
    assert_eq!(s2.spec.history[1].sha256, sha1);
    let done = ev
        .until(
            "both agents on the new bundle",
            Duration::from_secs(30),
            |s| s.current() == sha2 && s.runs(&sha2) && s.lagging.is_empty(),
        )
        .await;
    assert_eq!(done.nodes.len(), 2);
    assert!(done
        .nodes
        .iter()
        .all(|n| n.heartbeat.running.as_ref().unwrap().sequence == 2));

    // Idle, the stream stays open with a keep-alive comment every 15 s.
    let t = Instant::now();
    loop {
        match ev.next(Duration::from_secs(20)).await {
            Event::Comment(c) => {
                assert_eq!(c, "keep-alive");
                break;
            }
            Event::Named { .. } => assert!(t.elapsed() < Duration::from_secs(20)),
        }
    }

    for data in &ev.seen {
        assert_no_secret(&f, "an event", data);
    }

    // The UI password opens the stream too.
    let mut ui = Events::open(&f, Some(&basic("fleet", &f.password))).await;
    assert_eq!(ui.status, 200);
    assert_eq!(ui.snapshot(Duration::from_secs(5)).await.current(), sha2);
}

#[tokio::test(flavor = "multi_thread")]
async fn events_need_human_credentials() {
    let mut f = stub_fleet();
    f.start_serve();
    wait_for("first publication", T, || async { f.current_sha().await }).await;
    for (who, auth) in [
        ("nobody", None),
        (
            "agent token",
            Some(format!("Bearer {}", f.secret("agent.token"))),
        ),
        ("wrong password", Some(basic("fleet", "not-the-password"))),
    ] {
        let r = f
            .client_with(auth.as_deref())
            .get("/api/events", T, 1 << 20)
            .await
            .unwrap();
        assert_eq!(r.status, 401, "{who}");
        assert_eq!(&r.body[..], b"credentials required\n", "{who}");
        assert!(
            r.header("www-authenticate")
                .is_some_and(|v| v.starts_with("Basic")),
            "{who}"
        );
        // The stream reader sees the same.
        let ev = Events::open(&f, auth.as_deref()).await;
        assert_eq!(ev.status, 401, "{who}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_page_holds_no_secret_and_follows_the_dom_contract() {
    let mut f = stub_fleet();
    f.start_serve();
    wait_for("first publication", T, || async { f.current_sha().await }).await;
    let r = f.operator().get("/", T, 1 << 20).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|v| v.starts_with("text/html")));
    let page = String::from_utf8(r.body.to_vec()).unwrap();
    assert_no_secret(&f, "the dashboard", &page);
    // The same page for the UI password.
    let r = f
        .client_with(Some(&basic("fleet", &f.password)))
        .get("/", T, 1 << 20)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(String::from_utf8(r.body.to_vec()).unwrap(), page);

    assert!(page.contains("<em id=\"fleet-name\">e2e</em>"));
    assert!(page.contains("new EventSource(\"/api/events\")"));
    for p in [
        "/api/nodes",
        "/api/spec",
        "/api/master",
        "href=\"/locust/\"",
    ] {
        assert!(page.contains(p), "{p}");
    }
    // The DOM contract a browser test relies on.
    for id in [
        "spec-seq",
        "spec-sha",
        "history",
        "locust-state",
        "locust-users",
        "locust-rps",
        "locust-fail",
        "lagging-count",
        "conn",
    ] {
        assert_eq!(
            page.matches(&format!("id=\"{id}\"")).count(),
            1,
            "#{id} once"
        );
    }
    assert!(page.contains("<table id=\"nodes\">"));
    assert!(page.contains("<ol id=\"history\">"));
    for s in [
        "dataset.ready = \"1\"",
        "dataset.node",
        "\"data-sha\"",
        "\"lag\"",
        "\"live\"",
        "\"polling\"",
    ] {
        assert!(page.contains(s), "{s}");
    }
    // Self-contained: nothing loaded from anywhere else, no HTML built from data.
    for bad in [
        "<script src",
        "<link",
        "@import",
        "http://",
        "https://",
        "//cdn",
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
    ] {
        assert!(!page.contains(bad), "the page contains {bad:?}");
    }
}
