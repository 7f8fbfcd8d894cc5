//! Authentication over the real socket: TLS only, each secret opens only its own routes, one
//! 401 for every failure, failures rate-limited.

use std::io::{Read, Write};
use std::time::Duration;

use base64::Engine;
use fleet_tests::{Fleet, Options};

const T: Duration = Duration::from_secs(10);

fn basic(user: &str, pw: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_but_health_needs_the_right_secret() {
    // This test fails on purpose more often than the default allowance: raise it here, the
    // next test checks the limit itself.
    let mut f = Fleet::new(Options {
        managed_master: false,
        controller_settings: vec![("auth_fail_burst".into(), 1000.0.into())],
        ..Options::default()
    });
    f.start_serve();
    let none = f.client_with(None);
    let agent = f.agent();
    let operator = f.operator();
    let ui = f.client_with(Some(&basic("fleet", &f.password)));
    let wrong_pw = f.client_with(Some(&basic("fleet", "not-the-password")));
    let wrong_user = f.client_with(Some(&basic("admin", &f.password)));

    assert_eq!(none.get("/healthz", T, 1024).await.unwrap().status, 200);

    let sha =
        fleet_tests::wait_for("first publication", T, || async { f.current_sha().await }).await;
    let agent_routes = ["/v1/manifest".to_string(), format!("/v1/bundles/{sha}")];
    let human_routes = ["/", "/api/nodes", "/api/spec", "/api/master", "/locust/"];
    for r in &agent_routes {
        assert_eq!(
            agent.get(r, T, 1 << 20).await.unwrap().status,
            200,
            "agent token on {r}"
        );
        for (who, c) in [
            ("nobody", &none),
            ("operator token", &operator),
            ("UI password", &ui),
        ] {
            let resp = c.get(r, T, 1 << 20).await.unwrap();
            assert_eq!(resp.status, 401, "{who} on {r}");
        }
    }
    for r in human_routes {
        let ok = ui.get(r, T, 1 << 20).await.unwrap().status;
        // /locust/ needs a master; this fleet points at none, so the proxy answers 502.
        assert!(
            ok == 200 || (r == "/locust/" && ok == 502),
            "UI password on {r}: {ok}"
        );
        assert_eq!(
            operator.get(r, T, 1 << 20).await.unwrap().status,
            ok,
            "operator token on {r}"
        );
        for (who, c) in [
            ("nobody", &none),
            ("agent token", &agent),
            ("wrong password", &wrong_pw),
            ("wrong user", &wrong_user),
        ] {
            let resp = c.get(r, T, 1 << 20).await.unwrap();
            assert_eq!(resp.status, 401, "{who} on {r}");
            // The same answer whatever was wrong.
            assert_eq!(&resp.body[..], b"credentials required\n", "{who} on {r}");
        }
    }
    // Unknown routes do not tell that they do not exist.
    assert_eq!(
        none.get("/no/such/route", T, 1024).await.unwrap().status,
        401
    );
    assert_eq!(
        agent
            .post_json("/v1/heartbeat", b"{}".to_vec(), T)
            .await
            .unwrap()
            .status,
        400
    );
    assert_eq!(
        operator
            .post_json("/v1/heartbeat", b"{}".to_vec(), T)
            .await
            .unwrap()
            .status,
        401
    );
    f.stop_serve();
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_gets_no_http_answer_and_failures_are_rate_limited() {
    let mut f = Fleet::new(Options {
        managed_master: false,
        ..Options::default()
    });
    f.start_serve();
    // Plain HTTP on the port: the TLS server never answers in HTTP.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", f.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = vec![0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    assert!(
        !buf[..n].starts_with(b"HTTP/"),
        "plaintext got an HTTP answer: {:?}",
        String::from_utf8_lossy(&buf[..n])
    );

    // A client that does not trust the fleet CA fails the handshake.
    let other = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(fleet_tests::bin("fleet"))
        .arg("--dir")
        .arg(other.path())
        .args(["init", "--listen", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let foreign_ca = std::fs::read_to_string(other.path().join("certs/ca.pem")).unwrap();
    let c = fleet_common::client::Client::new(&f.url, &foreign_ca, None).unwrap();
    let e = c.get("/healthz", T, 1024).await.unwrap_err();
    assert!(e.to_string().contains("TLS handshake"), "{e}");

    // Wrong passwords: 401 until the per-address allowance is spent, then 429.
    let wrong = f.client_with(Some(&basic("fleet", "guess")));
    let mut statuses = vec![];
    for _ in 0..12 {
        statuses.push(wrong.get("/api/spec", T, 1024).await.unwrap().status);
    }
    assert!(statuses[..10].iter().all(|s| *s == 401), "{statuses:?}");
    assert_eq!(statuses[11], 429, "{statuses:?}");
    // Even the right password waits out the limit from that address.
    let right = f.client_with(Some(&basic("fleet", &f.password)));
    assert_eq!(right.get("/api/spec", T, 1024).await.unwrap().status, 429);
    f.stop_serve();
}
