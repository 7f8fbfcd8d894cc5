//! The dashboard and its live feed, end to end: `GET /api/events` streams every part at once
//! and then the parts that change (a spec edit, agents switching bundles), only to human
//! credentials; `GET /api/nodes` filters and pages the rows; the page itself carries no secret
//! and loads nothing from elsewhere.
//!
//! No Locust: stub workers (`sleep 3600`) and no managed master.

use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use fleet_common::wire::{MasterView, NodeView, SpecView, Standing};
use fleet_tests::{wait_for, Fleet, Options};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::header::{ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

const T: Duration = Duration::from_secs(10);

/// What the stream has said so far: the last value of each part.
#[derive(Debug, Default, Clone)]
struct Seen {
    spec: Option<SpecView>,
    nodes: Option<serde_json::Value>,
    master: Option<MasterView>,
    locust: Option<serde_json::Value>,
}

impl Seen {
    fn current(&self) -> &str {
        self.spec
            .as_ref()
            .and_then(|s| s.current.as_ref())
            .map(|c| c.sha256.as_str())
            .unwrap_or("")
    }

    fn count(&self, standing: &str) -> u64 {
        self.nodes.as_ref().map_or(0, |n| {
            n["standing"][standing]
                .as_u64()
                .expect("every standing is counted")
        })
    }

    fn total(&self) -> u64 {
        self.nodes
            .as_ref()
            .map_or(0, |n| n["total"].as_u64().unwrap())
    }

    /// Every node on `sha`, by the summary.
    fn all_on(&self, sha: &str) -> bool {
        let n = self.nodes.as_ref().unwrap();
        n["bundles"].as_array().unwrap().len() == 1
            && n["bundles"][0]["sha256"] == sha
            && n["bundles"][0]["nodes"].as_u64() == Some(self.total())
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

    /// The next named event, applied to `seen`, skipping comments; returns its name.
    async fn part(&mut self, seen: &mut Seen, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Event::Named { name, data } => {
                    match name.as_str() {
                        "spec" => seen.spec = Some(parse(&name, &data)),
                        "nodes" => seen.nodes = Some(parse(&name, &data)),
                        "master" => seen.master = Some(parse(&name, &data)),
                        "locust" => seen.locust = parse(&name, &data),
                        other => panic!("unknown event {other}: {data}"),
                    }
                    return name;
                }
                Event::Comment(_) => continue,
            }
        }
    }

    /// Events until what they said satisfies `ok`.
    async fn until(
        &mut self,
        seen: &mut Seen,
        what: &str,
        within: Duration,
        ok: impl Fn(&Seen) -> bool,
    ) {
        let deadline = Instant::now() + within;
        while !ok(seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out after {within:?} waiting for {what}; seen {seen:?}"
            );
            self.part(seen, left).await;
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(name: &str, data: &str) -> T {
    serde_json::from_str(data).unwrap_or_else(|e| panic!("bad {name} event ({e}): {data}"))
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

    // The first chunk comes at once, every part of it: the fleet as it is.
    let t = Instant::now();
    let mut seen = Seen::default();
    let mut first = vec![];
    for _ in 0..4 {
        first.push(ev.part(&mut seen, Duration::from_secs(5)).await);
    }
    assert_eq!(first, ["spec", "nodes", "master", "locust"]);
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "first chunk took {:?}",
        t.elapsed()
    );
    assert_eq!(seen.current(), sha1);
    assert_eq!(seen.spec.as_ref().unwrap().history.len(), 1);
    assert_eq!(seen.total(), 2, "{seen:?}");
    assert_eq!(
        seen.count("current"),
        2,
        "scale waited for both agents to run it"
    );
    assert!(seen.all_on(&sha1));
    assert!(!seen.master.as_ref().unwrap().managed);
    assert!(
        seen.locust.is_none(),
        "no master runs, so no Locust numbers"
    );

    // An edit: the new publication comes, then a summary where both agents run it.
    f.write_spec("from locust import User, task\n\n\nclass Edited(User):\n    @task\n    def t(self):\n        pass\n");
    ev.until(
        &mut seen,
        "the new publication",
        Duration::from_secs(20),
        |s| s.current() != sha1,
    )
    .await;
    let sha2 = seen.current().to_string();
    assert_eq!(sha2, f.current_sha().await.unwrap());
    let spec = seen.spec.clone().unwrap();
    let seqs: Vec<u64> = spec.history.iter().map(|v| v.sequence).collect();
    assert_eq!(seqs, vec![2, 1], "history newest first");
    assert_eq!(spec.history[1].sha256, sha1);
    ev.until(
        &mut seen,
        "both agents on the new bundle",
        Duration::from_secs(30),
        |s| s.count("current") == 2 && s.all_on(&sha2),
    )
    .await;
    // The rows, fetched as the page does, say the same.
    let rows = f.nodes().await;
    assert_eq!(rows.len(), 2);
    assert!(rows
        .iter()
        .all(|n| n.standing == Standing::Current
            && n.heartbeat.running.as_ref().unwrap().sequence == 2));

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
    let mut seen = Seen::default();
    assert_eq!(ui.part(&mut seen, Duration::from_secs(5)).await, "spec");
    assert_eq!(seen.current(), sha2);
}

#[tokio::test(flavor = "multi_thread")]
async fn node_rows_are_filtered_and_paged() {
    let mut f = stub_fleet();
    f.start_serve();
    let sha = wait_for("first publication", T, || async { f.current_sha().await }).await;
    let out = f.cli(&["scale", "--nodes", "3"]);
    assert!(
        out.status.success(),
        "scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let get = |q: &str| {
        let q = q.to_string();
        let c = f.operator();
        async move {
            let r = c.get(&format!("/api/nodes{q}"), T, 1 << 20).await.unwrap();
            assert_eq!(r.status, 200, "{q}: {}", String::from_utf8_lossy(&r.body));
            let total: usize = r.header("x-total-count").unwrap().parse().unwrap();
            let rows: Vec<NodeView> = serde_json::from_slice(&r.body).unwrap();
            (
                total,
                rows.into_iter()
                    .map(|n| n.heartbeat.node_id)
                    .collect::<Vec<_>>(),
            )
        }
    };
    assert_eq!(get("").await.0, 3);
    assert_eq!(
        get("?standing=current&offset=1&limit=1").await,
        (3, vec!["local-0002".to_string()])
    );
    assert_eq!(get("?standing=lagging").await, (0, vec![]));
    assert_eq!(get(&format!("?bundle={}", &sha[..8])).await.0, 3);
    assert_eq!(get("?bundle=none").await.0, 0);
    assert_eq!(
        get("?q=LOCAL-0003").await,
        (1, vec!["local-0003".to_string()])
    );
    // Stub workers never join a master: their agents say `starting`, or `running` once the join
    // grace is over. Whatever they say, the filter agrees with the rows.
    // (Retried: a status may move between the two reads.)
    wait_for("the status filter to agree with the rows", T, || async {
        let all = f.nodes().await;
        for status in ["starting", "running", "crash_loop"] {
            let want = all
                .iter()
                .filter(|n| n.heartbeat.status.as_str() == status)
                .count();
            if get(&format!("?status={status}")).await.0 != want {
                return None;
            }
        }
        Some(())
    })
    .await;
    let r = f
        .operator()
        .get("/api/nodes?standing=bogus", T, 1 << 20)
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    // The summary for clients that poll.
    let s = f.get_json("/api/summary").await.unwrap();
    assert_eq!(s["total"], 3);
    assert_eq!(s["standing"]["current"], 3);
    assert_eq!(s["bundles"][0]["sha256"], sha.as_str());
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
        "/api/summary",
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
        "locust-source",
        "locust-rows-body",
        "locust-rows-note",
        "locust-errors-body",
        "lagging-count",
        "count-current",
        "count-retrying",
        "count-refused",
        "count-silent",
        "status-counts",
        "bundle-counts",
        "f-standing",
        "f-status",
        "f-bundle",
        "f-text",
        "page-info",
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
        "\"data-standing\"",
        "\"lag\"",
        "\"live\"",
        "\"polling\"",
    ] {
        assert!(page.contains(s), "{s}");
    }
    // Nothing loaded from anywhere else: every file the page names is the controller's own,
    // under /ui/, and is there.
    let mut own = vec![];
    for attr in ["src=\"", "href=\""] {
        for (at, _) in page.match_indices(attr) {
            let rest = &page[at + attr.len()..];
            let url = &rest[..rest.find('"').unwrap()];
            assert!(
                url.starts_with("/ui/") || url.starts_with('#') || url == "/locust/",
                "the page links {url}"
            );
            if url.starts_with("/ui/") {
                own.push(url.to_string());
            }
        }
    }
    assert_eq!(own.len(), 5, "{own:?}");
    for url in &own {
        let r = f.operator().get(url, T, 1 << 20).await.unwrap();
        assert_eq!(r.status, 200, "{url}");
        // The Spec view's own code follows the page's rules below too.
        if url.starts_with("/ui/spec.") {
            let text = String::from_utf8(r.body.to_vec()).unwrap();
            for bad in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "eval(",
                "http://",
                "https://",
            ] {
                assert!(!text.contains(bad), "{url} contains {bad:?}");
            }
        }
    }
    // No HTML built from data.
    for bad in [
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
