//! Rotation on a running fleet: the agent token (`fleet token rotate`, then `finish`) while
//! agents keep heartbeating, and the server certificate and UI password reloaded on SIGHUP or
//! `fleet passwd` without dropping open connections.

use std::time::{Duration, Instant};

use base64::Engine;
use fleet_tests::{wait_for, Fleet, Options};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const T: Duration = Duration::from_secs(10);

fn basic(user: &str, pw: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    )
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn agent_pid(f: &Fleet, node: &str) -> Pid {
    let p = std::fs::read_to_string(f.path().join(format!("local/{node}/agent.pid"))).unwrap();
    Pid::from_raw(p.trim().parse().unwrap())
}

fn agent_log(f: &Fleet, node: &str) -> String {
    std::fs::read_to_string(f.path().join(format!("local/{node}/agent.log"))).unwrap_or_default()
}

async fn status_with(f: &Fleet, token: &str) -> u16 {
    f.client_with(Some(&format!("Bearer {token}")))
        .get("/v1/manifest", T, 1 << 20)
        .await
        .unwrap()
        .status
}

/// Every node heartbeated within the last `within`, `n` of them.
async fn all_fresh(f: &Fleet, n: usize, within: f64) -> bool {
    let nodes = f.nodes().await;
    nodes.len() == n && nodes.iter().all(|v| v.heartbeat_age_s < within)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_token_rotates_on_a_running_fleet_without_a_refused_heartbeat_window() {
    let mut f = Fleet::new(Options {
        managed_master: false,
        worker_command: Some(vec!["sleep".into(), "3600".into()]),
        ..Options::default()
    });
    f.start_serve();
    let sha = wait_for("first publication", T, || async { f.current_sha().await }).await;
    let out = f.cli(&["scale", "--nodes", "2", "--wait", "60"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    f.wait_all_running(2, &sha, Duration::from_secs(30)).await;
    let old = f.secret("agent.token");

    // Rotate: a new token, both accepted, the controller told at once.
    let r = json_of(&f.cli(&["--output", "json", "token", "rotate"]));
    assert_eq!(r["controller"]["state"], "reloaded", "{r}");
    assert_eq!(r["controller"]["agent_token"], true, "{r}");
    assert_eq!(r["controller"]["rotating"], true, "{r}");
    let new = f.secret("agent.token");
    assert_ne!(new, old);
    assert_eq!(status_with(&f, &old).await, 200);
    assert_eq!(status_with(&f, &new).await, 200);
    let again = f.cli(&["token", "rotate"]);
    assert_eq!(again.status.code(), Some(1), "one rotation at a time");
    assert!(String::from_utf8_lossy(&again.stderr).contains("fleet token finish"));

    // The agents still send the old token (heartbeats every second): finishing now would lock
    // them out, so it is refused.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let early = f.cli(&["token", "finish", "--quiet-for", "3s"]);
    assert_eq!(early.status.code(), Some(1));
    let err = String::from_utf8_lossy(&early.stderr);
    assert!(
        err.contains("previous agent token was used") && err.contains("--force"),
        "{err}"
    );

    // SIGHUP: the first agent reads its token_file (the fleet's agent.token) again.
    kill(agent_pid(&f, "local-0001"), Signal::SIGHUP).unwrap();
    wait_for("agent 1 on the new token", T, || async {
        agent_log(&f, "local-0001")
            .contains("SIGHUP: read a new agent token")
            .then_some(())
    })
    .await;
    // The second is not told: finishing refuses it, and its next heartbeat's 401 makes it
    // read the file itself.
    let forced = json_of(&f.cli(&["--output", "json", "token", "finish", "--force"]));
    assert_eq!(forced["controller"]["state"], "reloaded", "{forced}");
    assert_eq!(forced["controller"]["rotating"], false, "{forced}");
    assert!(!f.path().join("secrets/agent.token.previous").exists());
    assert_eq!(status_with(&f, &old).await, 401, "the old token is refused");
    assert_eq!(status_with(&f, &new).await, 200);
    wait_for("agent 2 on the new token", T, || async {
        agent_log(&f, "local-0002")
            .contains("heartbeat refused (HTTP 401): read a new agent token")
            .then_some(())
    })
    .await;

    // Both keep heartbeating, on the new token only (the old one is refused), and run on.
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(all_fresh(&f, 2, 2.0).await, "{:?}", f.nodes().await);
    f.wait_all_running(2, &sha, T).await;
    assert!(t0.elapsed() < T);
    assert!(!agent_log(&f, "local-0001").contains("HTTP 401"));
    let out = f.cli(&["down"]);
    assert!(out.status.success());
    f.stop_serve();
}

/// An HTTP/1.1 connection over TLS to the controller, trusting `ca_pem`, kept open; and the
/// DER of the certificate the server presented.
async fn open_connection(
    port: u16,
    ca_pem: &str,
) -> (
    hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    Vec<u8>,
) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(fleet_common::client::tls_config(ca_pem).unwrap())
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS handshake");
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    (send, cert)
}

async fn health_on(
    send: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
) -> u16 {
    use http_body_util::BodyExt;
    send.ready().await.expect("the connection is still open");
    let req = hyper::Request::get("/healthz")
        .header("host", "localhost")
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = send.send_request(req).await.expect("request");
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_and_fleet_passwd_reload_the_certificate_and_password_and_keep_connections() {
    let mut f = Fleet::new(Options {
        managed_master: false,
        ..Options::default()
    });
    f.start_serve();
    let old_ca = f.ca_pem();
    let (mut kept, first) = open_connection(f.port, &old_ca).await;
    assert_eq!(
        first,
        pem_der(&std::fs::read_to_string(f.path().join("certs/server.pem")).unwrap())
    );
    assert_eq!(health_on(&mut kept).await, 200);
    let ui_old = f.client_with(Some(&basic("fleet", &f.password)));
    assert_eq!(
        ui_old.get("/api/spec", T, 1 << 20).await.unwrap().status,
        200
    );

    // A new certificate (here from another CA, so a handshake tells which one it got).
    let ca = fleet_tests::pki::new_ca("rotated CA");
    let (cert, key) = fleet_tests::pki::server_cert_pem(&ca, &["localhost", "127.0.0.1"]);
    // A key with the wrong mode is refused by the reload, which keeps the old certificate.
    let key_path = f.path().join("certs/server.key");
    std::fs::write(f.path().join("certs/server.pem"), &cert).unwrap();
    std::fs::write(&key_path, &key).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let refused = json_of(&f.cli(&["--output", "json", "passwd"]));
    assert_eq!(refused["controller"]["state"], "failed", "{refused}");
    assert!(
        refused["controller"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("chmod 600")),
        "{refused}"
    );
    assert!(
        f.serve_log().contains("reload refused"),
        "{}",
        f.serve_log()
    );
    assert_eq!(
        open_connection(f.port, &old_ca).await.1,
        first,
        "nothing changed"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    kill(Pid::from_raw(f.serve_pid().unwrap() as i32), Signal::SIGHUP).unwrap();
    wait_for("the reload", T, || async {
        f.serve_log()
            .contains("SIGHUP: reloaded: new server certificate, UI password")
            .then_some(())
    })
    .await;
    // New handshakes get the new certificate; the connection opened before keeps working.
    let (_, presented) = open_connection(f.port, &ca.pem()).await;
    assert_eq!(presented, pem_der(&cert));
    let e = fleet_common::client::Client::new(&f.url, &old_ca, None)
        .unwrap()
        .get("/healthz", T, 1024)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("TLS handshake"), "{e}");
    assert_eq!(health_on(&mut kept).await, 200);

    // The password `fleet passwd` made before is the one in force; the first one is refused,
    // also for the client that had it verified (and cached) before.
    let password = refused["password"].as_str().unwrap();
    let client =
        |auth: &str| fleet_common::client::Client::new(&f.url, &ca.pem(), Some(auth)).unwrap();
    let ui_new = client(&basic("fleet", password));
    assert_eq!(
        ui_new.get("/api/spec", T, 1 << 20).await.unwrap().status,
        200
    );
    let ui_first = client(&basic("fleet", &f.password));
    assert_eq!(
        ui_first.get("/api/spec", T, 1 << 20).await.unwrap().status,
        401
    );
    f.stop_serve();
}
