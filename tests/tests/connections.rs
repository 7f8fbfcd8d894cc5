//! Connection reuse: an agent talks to the controller over one HTTP/2 connection (long-poll,
//! heartbeats and bundle downloads together) and makes a new one when the controller comes
//! back; against a server that offers only HTTP/1.1 the client keeps idle keep-alive
//! connections and reuses them, opening another only for a request made while all are busy.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleet_common::client::Client;
use fleet_tests::{wait_for, Fleet, Options};
use http_body_util::Full;
use hyper_util::rt::TokioIo;

/// The TCP sockets `pid` holds open, by inode: `socket:[N]` links in /proc/PID/fd that are in
/// the TCP tables (the rest are Unix sockets, such as tokio's signal pipe).
fn sockets(pid: i32) -> BTreeSet<u64> {
    let mut tcp = BTreeSet::<u64>::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            if let Some(inode) = line.split_whitespace().nth(9).and_then(|i| i.parse().ok()) {
                tcp.insert(inode);
            }
        }
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    l.to_str()?
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse()
                        .ok()
                })
                .filter(|i| tcp.contains(i))
                .collect()
        })
        .unwrap_or_default()
}

/// Every TCP socket the agent had open, sampled every 50 ms for `d`.
async fn sockets_over(pid: i32, d: Duration) -> BTreeSet<u64> {
    let mut seen = BTreeSet::new();
    let end = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < end {
        seen.extend(sockets(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen
}

fn agent_pid(f: &Fleet) -> i32 {
    std::fs::read_to_string(f.path().join("local/local-0001/agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

async fn running(f: &Fleet, sha: &str) {
    wait_for(
        &format!("the agent on {sha}"),
        Duration::from_secs(30),
        || async {
            f.nodes().await.into_iter().find(|n| {
                n.heartbeat
                    .running
                    .as_ref()
                    .is_some_and(|r| r.sha256 == sha)
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_keeps_one_connection_for_polls_heartbeats_and_downloads() {
    let mut f = Fleet::new(Options {
        managed_master: false,
        worker_command: Some(vec!["sleep".into(), "3600".into()]),
        // Heartbeats every 300 ms: a new connection per request would show at once.
        agent_settings: vec![
            ("heartbeat_ms".into(), 300.into()),
            ("stable_ms".into(), 300.into()),
            ("join_grace_ms".into(), 100.into()),
        ],
        ..Options::default()
    });
    f.start_serve();
    let sha = wait_for("first publication", Duration::from_secs(20), || async {
        f.current_sha().await
    })
    .await;
    let out = f.cli(&["scale", "--nodes", "1"]);
    assert!(out.status.success());
    running(&f, &sha).await;
    let pid = agent_pid(&f);

    let idle = sockets_over(pid, Duration::from_secs(3)).await;
    assert_eq!(
        idle.len(),
        1,
        "one connection for ten heartbeats and the long-poll: {idle:?}"
    );

    // A publication: the long-poll answers, the bundle is downloaded, heartbeats report it.
    let edits = async {
        f.write_spec("from locust import User\n\n\nclass Stub(User):\n    pass\n# 2\n");
        let new = f.wait_new_sha(&sha, Duration::from_secs(20)).await;
        running(&f, &new).await;
    };
    let (busy, ()) = tokio::join!(sockets_over(pid, Duration::from_secs(4)), edits);
    assert_eq!(busy, idle, "the download used the same connection");

    // The controller restarts: the connection drops and one new connection replaces it.
    f.stop_serve();
    f.start_serve();
    wait_for(
        "the agent back on a new connection",
        Duration::from_secs(30),
        || async {
            let now = sockets(pid);
            (now.len() == 1 && now != idle).then_some(())
        },
    )
    .await;
    let after = sockets_over(pid, Duration::from_secs(2)).await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(f.nodes().await.len() == 1);
}

/// A TLS server offering only HTTP/1.1, with keep-alive, that counts its connections.
/// `/slow` answers after 500 ms.
async fn h1_only_server(f: &Fleet) -> (u16, Arc<AtomicUsize>) {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> =
        rustls_pemfile_certs(&std::fs::read(f.path().join("certs/server.pem")).unwrap());
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(
        &std::fs::read(f.path().join("certs/server.key")).unwrap(),
    )
    .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let n = count.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            n.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|req: hyper::Request<_>| async move {
                    if req.uri().path() == "/slow" {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"ok\n"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, count)
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn over_http1_idle_connections_are_reused_and_busy_ones_are_not() {
    let f = Fleet::new(Options {
        managed_master: false,
        ..Options::default()
    });
    let (port, conns) = h1_only_server(&f).await;
    let c = Client::new(&format!("https://127.0.0.1:{port}"), &f.ca_pem(), None).unwrap();
    let t = Duration::from_secs(10);
    for _ in 0..10 {
        assert_eq!(c.get("/", t, 1024).await.unwrap().status, 200);
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "ten requests, one connection"
    );

    // Three at once: the idle connection serves one, two more are opened.
    let c2 = c.clone();
    let (a, b, d) = tokio::join!(
        c.get("/slow", t, 1024),
        c2.get("/slow", t, 1024),
        c.get("/slow", t, 1024)
    );
    assert!([a, b, d].iter().all(|r| r.as_ref().unwrap().status == 200));
    assert_eq!(conns.load(Ordering::SeqCst), 3);

    // All three are idle again and kept: sequential requests and clones open nothing new.
    for _ in 0..5 {
        assert_eq!(c.clone().get("/", t, 1024).await.unwrap().status, 200);
    }
    assert_eq!(conns.load(Ordering::SeqCst), 3);
}
