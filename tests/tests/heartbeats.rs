//! Heartbeat fuzz against a real `fleet serve`: whatever a holder of the agent token posts
//! (oversize bodies, non-hex shas, control characters, unknown statuses, 10^5 distinct node
//! ids), it is refused or bounded, the controller's memory stays bounded, silent nodes are
//! forgotten, and `fleet status`, the summary and the dashboard still render.
//!
//! Two real agents with stub workers run alongside, as the nodes the backend lists.

use std::time::{Duration, Instant};

use bytes::Bytes;
use fleet_common::wire::Standing;
use fleet_tests::{wait_for, Fleet, Options};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

const T: Duration = Duration::from_secs(10);
/// `controller.max_nodes_tracked` for this test.
const MAX_NODES: usize = 1500;
/// `controller.forget_silent_after_s` in the forgetting test.
const FORGET_AFTER_S: u64 = 3;
const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// One kept-alive TLS connection posting heartbeats with the agent token.
struct Poster {
    sender: SendRequest<Full<Bytes>>,
    host: String,
    auth: String,
}

impl Poster {
    async fn open(f: &Fleet) -> Poster {
        let tls = fleet_common::client::tls_config(&f.ca_pem()).unwrap();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", f.port))
            .await
            .unwrap();
        let name = ServerName::try_from("127.0.0.1".to_string()).unwrap();
        let stream = TlsConnector::from(tls).connect(name, tcp).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Poster {
            sender,
            host: format!("127.0.0.1:{}", f.port),
            auth: format!("Bearer {}", f.secret("agent.token")),
        }
    }

    /// Posts `body`; the status and the answer's text.
    async fn post(&mut self, body: Vec<u8>) -> (u16, String) {
        self.sender.ready().await.unwrap();
        let req = hyper::Request::post("/v1/heartbeat")
            .header(HOST, &self.host)
            .header(AUTHORIZATION, &self.auth)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = tokio::time::timeout(T, self.sender.send_request(req))
            .await
            .expect("an answer in time")
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// `fleet serve` with these node table bounds and two local agents (stub workers) on the
/// first publication.
async fn fleet(max_nodes: usize, forget_after_s: u64) -> Fleet {
    let mut f = Fleet::new(Options {
        managed_master: false,
        worker_command: Some(vec!["sleep".into(), "3600".into()]),
        controller_settings: vec![
            (
                "max_nodes_tracked".into(),
                toml::Value::Integer(max_nodes as i64),
            ),
            (
                "forget_silent_after_s".into(),
                toml::Value::Integer(forget_after_s as i64),
            ),
        ],
        ..Default::default()
    });
    f.start_serve();
    wait_for("first publication", T, || async { f.current_sha().await }).await;
    let out = f.cli(&["scale", "--nodes", "2"]);
    assert!(
        out.status.success(),
        "scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    f
}

/// A small valid heartbeat, written out directly (the flood below sends 10^5 of them).
fn small(id: &str) -> Vec<u8> {
    format!(
        r#"{{"node_id":"{id}","backend":"local","agent_version":"0.1.0","running":{{"sha256":"{SHA}","sequence":1,"master_epoch":1,"since_ms":1}},"last_good":null,"workers":[{{"index":0,"pid":42,"state":"running","restarts":0,"last_exit":null}}],"status":"running","last_error":null,"rejected":null,"uptime_s":5}}"#
    )
    .into_bytes()
}

/// A valid heartbeat as JSON, for `id`, with `workers` worker reports.
fn heartbeat(id: &str, workers: usize) -> serde_json::Value {
    serde_json::json!({
        "node_id": id,
        "backend": "local",
        "agent_version": "0.1.0",
        "running": {"sha256": SHA, "sequence": 1, "master_epoch": 1, "since_ms": 1},
        "last_good": null,
        "workers": (0..workers).map(|i| serde_json::json!({
            "index": i, "pid": 4_000_000 + i, "state": "backoff", "restarts": 7,
            "last_exit": "signal 9"
        })).collect::<Vec<_>>(),
        "status": "running",
        "last_error": null,
        "rejected": null,
        "uptime_s": 5
    })
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeat_fuzz_is_refused_or_bounded() {
    let f = fleet(MAX_NODES, 3600).await;
    let pid = f.serve_pid().unwrap();
    let mut p = Poster::open(&f).await;

    // Each malformed heartbeat: the status and a word of the one-line reason.
    let mut bad = vec![];
    let mut big = heartbeat("big", 2);
    big["last_error"] = "x".repeat(40 << 10).into();
    bad.push((
        "oversize body",
        serde_json::to_vec(&big).unwrap(),
        413,
        "KiB",
    ));
    let mut h = heartbeat("n1", 1);
    h["running"]["sha256"] = "ééééééééééééééééééééééééééééééééé".into();
    bad.push((
        "multi-byte sha",
        serde_json::to_vec(&h).unwrap(),
        400,
        "running.sha256",
    ));
    let mut h = heartbeat("n1", 1);
    h["last_good"] = "../../etc/passwd".into();
    bad.push((
        "non-hex sha",
        serde_json::to_vec(&h).unwrap(),
        400,
        "last_good",
    ));
    let mut h = heartbeat("n1", 1);
    h["last_error"] = "fine\u{1b}[2J\u{1b}[Hforged line".into();
    bad.push((
        "control characters",
        serde_json::to_vec(&h).unwrap(),
        400,
        "control character",
    ));
    let h = heartbeat("n1\u{7}", 1);
    bad.push((
        "bell in the id",
        serde_json::to_vec(&h).unwrap(),
        400,
        "node_id",
    ));
    let mut h = heartbeat("n1", 1);
    h["status"] = "pwned".into();
    bad.push((
        "unknown status",
        serde_json::to_vec(&h).unwrap(),
        400,
        "unknown variant",
    ));
    // serde_json quotes an unknown variant as it came (found by fuzzing, docs/reliability.md).
    let mut h = heartbeat("n1", 1);
    h["status"] = "pw\nned\u{1b}[2J".into();
    bad.push((
        "newline in an unknown status",
        serde_json::to_vec(&h).unwrap(),
        400,
        "unknown variant `pw ned",
    ));
    let h = heartbeat(&"n".repeat(129), 1);
    bad.push(("long id", serde_json::to_vec(&h).unwrap(), 400, "node_id"));
    let h = heartbeat("n1", 193);
    bad.push((
        "too many workers",
        serde_json::to_vec(&h).unwrap(),
        400,
        "workers",
    ));
    for (what, body, status, word) in bad {
        let (got, text) = p.post(body).await;
        assert_eq!(got, status, "{what}: {text}");
        assert!(text.contains(word), "{what}: {text}");
        assert!(!text.trim_end().contains('\n'), "{what}: one line: {text}");
        if got == 413 {
            // The controller stops reading an oversize body: a fresh connection for the rest.
            p = Poster::open(&f).await;
        }
    }
    // Nothing of it was stored.
    let summary = f.get_json("/api/summary").await.unwrap();
    assert_eq!(summary["total"], 2, "{summary}");

    // 10^5 distinct node ids over four kept-alive connections, the first ones as large as
    // the checks allow. The table takes MAX_NODES of them and refuses the rest with 503.
    let rss_before = rss_kib(pid);
    let t = Instant::now();
    let mut tasks = vec![];
    for c in 0..4 {
        let mut p = Poster::open(&f).await;
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut full, mut other) = (0usize, 0usize, vec![]);
            for i in (c..100_000).step_by(4) {
                let h = heartbeat(
                    &format!("fuzz-{i:06}"),
                    if i < 2 * MAX_NODES { 192 } else { 1 },
                );
                match p.post(serde_json::to_vec(&h).unwrap()).await {
                    (200, _) => ok += 1,
                    (503, text) if text.contains("node table full") => full += 1,
                    (s, text) => other.push(format!("{s} {text}")),
                }
            }
            (ok, full, other)
        }));
    }
    let (mut ok, mut full) = (0, 0);
    for t in tasks {
        let (o, f_, other) = t.await.unwrap();
        assert!(
            other.is_empty(),
            "unexpected answers: {:?}",
            &other[..other.len().min(3)]
        );
        ok += o;
        full += f_;
    }
    let flood = t.elapsed();
    let rss_after = rss_kib(pid);
    assert_eq!(ok + full, 100_000);
    // The two agents hold two of the places.
    assert_eq!(ok, MAX_NODES - 2, "fuzz nodes accepted in {flood:?}");
    let summary = f.get_json("/api/summary").await.unwrap();
    assert_eq!(summary["total"].as_u64().unwrap() as usize, MAX_NODES);
    // Each entry is at most 24 KiB (nodes.rs, ENTRY_BOUND); these are ~14 KiB. Beyond the
    // table itself allow 32 MiB for the allocator and buffers.
    let grew_mib = rss_after.saturating_sub(rss_before) / 1024;
    let bound_mib = (MAX_NODES * 24 / 1024 + 32) as u64;
    println!(
        "10^5 heartbeats in {flood:?}: {ok} stored, {full} refused; RSS {} -> {} MiB",
        rss_before / 1024,
        rss_after / 1024
    );
    assert!(
        grew_mib <= bound_mib,
        "RSS grew {grew_mib} MiB (bound {bound_mib} MiB)"
    );

    // Everything still renders: the dashboard page, its stream, a page of rows, fleet status.
    let r = f.operator().get("/", T, 1 << 20).await.unwrap();
    assert_eq!(r.status, 200);
    let r = f
        .operator()
        .get("/api/nodes?standing=current&limit=50", T, 1 << 20)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.body.len() < 1 << 20,
        "one page of rows: {} bytes",
        r.body.len()
    );
    let first = first_chunk(&f).await;
    assert!(first.contains("event: nodes"), "{first}");
    assert!(
        first.len() < 16 << 10,
        "the first chunk with {MAX_NODES} nodes is {} bytes",
        first.len()
    );
    let out = f.cli(&["status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("local-0001") && text.contains("local-0002"),
        "{text}"
    );
    let out = f.cli(&["--output", "json", "status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);
    for r in rows.as_array().unwrap() {
        assert_eq!(r["silent"], false, "{r}");
        assert!(r["standing"].is_string(), "{r}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_nodes_are_forgotten_unless_the_backend_lists_them() {
    let f = fleet(MAX_NODES, FORGET_AFTER_S).await;
    let mut p = Poster::open(&f).await;
    for i in 0..50 {
        let (status, text) = p.post(small(&format!("gone-{i:02}"))).await;
        assert_eq!(status, 200, "{text}");
    }
    assert_eq!(f.get_json("/api/summary").await.unwrap()["total"], 52);

    // local-0002 stops answering but its process is still there: the backend lists it.
    let pid: i32 = std::fs::read_to_string(f.path().join("local/local-0002/agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let resume = Resume(pid);
    // `fleet status` tells the controller which nodes the backend lists.
    let out = f.cli(&["status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let t = Instant::now();
    wait_for(
        "the silent fuzz nodes to be forgotten",
        Duration::from_secs(FORGET_AFTER_S + 15),
        || async {
            let s = f.get_json("/api/summary").await?;
            (s["total"] == 2).then_some(())
        },
    )
    .await;
    assert!(t.elapsed() >= Duration::from_secs(FORGET_AFTER_S - 1));
    // Long past FORGET_AFTER_S and past the silent mark, the listed node is still there.
    tokio::time::sleep(Duration::from_secs(16)).await;
    let nodes = f.nodes().await;
    let ids: Vec<(&str, Standing)> = nodes
        .iter()
        .map(|n| (n.heartbeat.node_id.as_str(), n.standing))
        .collect();
    assert_eq!(
        ids,
        [
            ("local-0001", Standing::Current),
            ("local-0002", Standing::Silent)
        ]
    );
    let out = f.cli(&["status"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("SILENT"), "{text}");
    assert!(text.contains("1 node(s) running but silent"), "{text}");
    drop(resume);
    wait_for("local-0002 back", T, || async {
        let n = f.nodes().await;
        n.iter()
            .all(|n| n.standing == Standing::Current)
            .then_some(())
    })
    .await;
}

/// Sends SIGCONT when dropped, so a failed assertion leaves no stopped agent behind.
struct Resume(nix::unistd::Pid);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// The first chunk of `GET /api/events`, as a dashboard receives it.
async fn first_chunk(f: &Fleet) -> String {
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
    let req = hyper::Request::get("/api/events")
        .header(HOST, format!("127.0.0.1:{}", f.port))
        .header(
            AUTHORIZATION,
            format!("Bearer {}", f.secret("operator.token")),
        )
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(T, sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = String::new();
    while !got.contains("event: locust") {
        let frame = tokio::time::timeout(T, body.frame())
            .await
            .expect("the first chunk in time")
            .unwrap()
            .unwrap();
        if let Ok(d) = frame.into_data() {
            got.push_str(std::str::from_utf8(&d).unwrap());
        }
    }
    got
}
