//! Authentication over the real socket: TLS only, each secret opens only its own routes, one
//! 401 for every failure, failures rate-limited per client without ever refusing valid
//! credentials, and `X-Real-IP` believed only from a trusted proxy.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use base64::Engine;
use fleet_tests::{get_from, Fleet, Options};

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

    // Wrong credentials: 401 until the per-address allowance is spent, then 429. (Tokens,
    // which are checked in microseconds: wrong passwords take a PBKDF2 check each, slow in a
    // debug build, and the allowance would refill meanwhile.)
    let wrong = f.client_with(Some("Bearer guess"));
    let mut statuses = vec![];
    for _ in 0..12 {
        statuses.push(wrong.get("/api/spec", T, 1024).await.unwrap().status);
    }
    assert!(statuses[..10].iter().all(|s| *s == 401), "{statuses:?}");
    assert_eq!(statuses[11], 429, "{statuses:?}");
    f.stop_serve();
}

#[tokio::test(flavor = "multi_thread")]
async fn valid_credentials_are_never_locked_out_by_failures_from_the_same_address() {
    let mut f = Fleet::new(Options {
        managed_master: false,
        ..Options::default()
    });
    f.start_serve();
    fleet_tests::wait_for("first publication", T, || async { f.current_sha().await }).await;

    // 50 wrong passwords (ten at a time) and 50 wrong tokens from 127.0.0.1.
    let wrong_token = f.client_with(Some("Bearer 0000000000000000000000000000000000000000000"));
    let mut statuses = vec![];
    for batch in 0..5 {
        let guesses: Vec<_> = (0..10)
            .map(|i| {
                let c = f.client_with(Some(&basic("fleet", &format!("guess-{batch}-{i}"))));
                tokio::spawn(async move { c.get("/api/spec", T, 1024).await.unwrap().status })
            })
            .collect();
        for g in guesses {
            statuses.push(g.await.unwrap());
        }
    }
    for _ in 0..50 {
        statuses.push(
            wrong_token
                .get("/v1/manifest", T, 1024)
                .await
                .unwrap()
                .status,
        );
    }
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 429),
        "{statuses:?}"
    );
    assert_eq!(statuses.last(), Some(&429), "over budget: {statuses:?}");

    // Then, from the same address, the right credentials succeed at once: the UI password
    // (never used before, so it is checked with PBKDF2, not found in the cache), the operator
    // token, and the agent token on an agent route.
    let right = f.client_with(Some(&basic("fleet", &f.password)));
    for (who, c, path) in [
        ("UI password", &right, "/api/spec"),
        ("operator token", &f.operator(), "/api/spec"),
        ("agent token", &f.agent(), "/v1/manifest"),
        ("UI password again (cached)", &right, "/api/nodes"),
    ] {
        let t0 = Instant::now();
        let status = c.get(path, T, 1 << 20).await.unwrap().status;
        assert_eq!(status, 200, "{who} on {path}");
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "{who}: {:?}",
            t0.elapsed()
        );
    }
    f.stop_serve();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forwarded_address_counts_only_from_a_trusted_proxy() {
    let mut f = Fleet::new(Options {
        managed_master: false,
        controller_settings: vec![(
            "trusted_proxies".into(),
            toml::Value::Array(vec!["127.0.0.1".into()]),
        )],
        ..Options::default()
    });
    f.start_serve();
    let ca = f.ca_pem();
    let wrong = ("authorization", "Bearer wrong");
    // 127.0.0.2 is not trusted: naming a new address in every request does not help, its
    // eleventh failure is over budget.
    let mut untrusted = vec![];
    for i in 0..11 {
        let real_ip = format!("198.51.100.{i}");
        let h = [wrong, ("x-real-ip", real_ip.as_str())];
        untrusted
            .push(get_from(f.port, &ca, Ipv4Addr::new(127, 0, 0, 2), "/v1/manifest", &h).await);
    }
    assert_eq!(untrusted[..10], [401; 10], "{untrusted:?}");
    assert_eq!(
        untrusted[10], 429,
        "the header from 127.0.0.2 was believed: {untrusted:?}"
    );
    // 127.0.0.1 is a trusted proxy: each request counts for the address it names.
    let mut trusted = vec![];
    for i in 0..20 {
        let real_ip = format!("203.0.113.{i}");
        let h = [wrong, ("x-real-ip", real_ip.as_str())];
        trusted.push(get_from(f.port, &ca, Ipv4Addr::LOCALHOST, "/v1/manifest", &h).await);
    }
    assert_eq!(
        trusted, [401; 20],
        "the header from the trusted proxy was ignored"
    );
    // ...and one named address gets one allowance, wherever it comes through.
    let mut one = vec![];
    for _ in 0..11 {
        let h = [wrong, ("x-real-ip", "203.0.113.200")];
        one.push(get_from(f.port, &ca, Ipv4Addr::LOCALHOST, "/v1/manifest", &h).await);
    }
    assert_eq!(one[10], 429, "{one:?}");
    f.stop_serve();
}
