//! The controller's own hardening over the real socket: security headers on every answer (the
//! proxied Locust UI and the dashboard's files included), a `/locust/` proxy that gives up on a web UI that hangs, and a
//! `fleet serve` that refuses to start on secrets others can read.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use base64::Engine;
use fleet_tests::{assert_security_headers, Fleet, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const T: Duration = Duration::from_secs(10);

fn basic(user: &str, pw: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    )
}

/// A fleet pointing at an external master whose web UI is ours to fake, with `[master]`
/// settings added to its fleet.toml.
fn fleet_with_master(settings: &[(&str, toml::Value)]) -> Fleet {
    let f = Fleet::new(Options {
        managed_master: false,
        ..Options::default()
    });
    let path = f.path().join("fleet.toml");
    let mut t: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    let m = t["master"].as_table_mut().unwrap();
    for (k, v) in settings {
        m.insert(k.to_string(), v.clone());
    }
    std::fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
    f
}

/// A fake Locust web UI on `port`: each connection gets `answer` after its request's head, or
/// nothing at all (held open) when `answer` is `None`.
async fn fake_web_ui(port: u16, answer: Option<&'static str>) {
    let l = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move {
        let mut held = vec![];
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let Some(answer) = answer else {
                held.push(s);
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = vec![];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn every_answer_forbids_framing_the_proxied_locust_ui_included() {
    let mut f = fleet_with_master(&[]);
    // A Locust UI that would allow framing: the controller's headers replace its own.
    fake_web_ui(
        f.web_port,
        Some(
            "HTTP/1.1 200 OK\r\nX-Frame-Options: ALLOWALL\r\nContent-Type: text/html\r\n\
             Content-Length: 12\r\nConnection: close\r\n\r\n<html></html",
        ),
    )
    .await;
    f.start_serve();
    let ui = f.client_with(Some(&basic("fleet", &f.password)));
    let none = f.client_with(None);

    let locust = ui.get("/locust/", T, 1 << 20).await.unwrap();
    assert_eq!(locust.status, 200, "{}", f.serve_log());
    assert_eq!(&locust.body[..], b"<html></html");
    assert_security_headers("the proxied Locust UI", &locust);
    let dash = ui.get("/", T, 1 << 20).await.unwrap();
    assert_eq!(dash.status, 200);
    assert_security_headers("the dashboard", &dash);
    let refused = none.get("/", T, 1 << 20).await.unwrap();
    assert_eq!(refused.status, 401);
    assert_security_headers("a 401", &refused);
    assert_security_headers("/healthz", &none.get("/healthz", T, 1024).await.unwrap());

    // The dashboard's scripts: served by the controller under its tagged URL, typed, cached
    // for long only under that URL, behind the same credentials.
    let page = String::from_utf8_lossy(&dash.body).into_owned();
    let at = page
        .find("/ui/vendor/codemirror/codemirror.js?v=")
        .expect("the dashboard links the vendored editor");
    let url = &page[at..at + page[at..].find('"').unwrap()];
    let js = ui.get(url, T, 1 << 20).await.unwrap();
    assert_eq!(js.status, 200, "{url}");
    assert_eq!(
        js.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(
        js.header("cache-control"),
        Some("private, max-age=31536000, immutable")
    );
    assert!(js
        .body
        .starts_with(b"// CodeMirror, copyright (c) by Marijn Haverbeke"));
    assert_security_headers("a /ui/ file", &js);
    let untagged = ui.get("/ui/spec.js", T, 1 << 20).await.unwrap();
    assert_eq!(untagged.status, 200);
    assert_eq!(untagged.header("cache-control"), Some("no-cache"));
    assert_eq!(none.get(url, T, 1024).await.unwrap().status, 401);
    assert_eq!(ui.get("/ui/nope.js", T, 1024).await.unwrap().status, 404);
    f.stop_serve();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_locust_ui_is_answered_504_in_time_and_blocks_nothing_else() {
    let mut f = fleet_with_master(&[("proxy_timeout_s", 2.into())]);
    fake_web_ui(f.web_port, None).await;
    f.start_serve();
    let ui = f.client_with(Some(&basic("fleet", &f.password)));

    let t0 = Instant::now();
    let (hung, health) = tokio::join!(ui.get("/locust/stats/requests", T, 1 << 20), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        f.client_with(None).get("/healthz", T, 1024).await
    });
    let took = t0.elapsed();
    let hung = hung.unwrap();
    assert_eq!(hung.status, 504, "{}", String::from_utf8_lossy(&hung.body));
    let body = String::from_utf8_lossy(&hung.body);
    assert_eq!(body.lines().count(), 1, "one line: {body}");
    assert!(body.contains("did not answer within 2 s"), "{body}");
    assert!(body.contains("master.proxy_timeout_s"), "{body}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "answered after {took:?}"
    );
    assert_eq!(health.unwrap().status, 200);
    f.stop_serve();
}

/// `fleet serve` given 10 s to exit by itself; killed (and the test failed) if it serves instead.
fn serve_briefly(f: &Fleet) -> std::process::Output {
    use std::process::{Command, Stdio};
    let mut c = Command::new(fleet_tests::bin("fleet"))
        .arg("--dir")
        .arg(f.path())
        .arg("serve")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while c.try_wait().unwrap().is_none() {
        if t.elapsed() > T {
            let _ = c.kill();
            let out = c.wait_with_output().unwrap();
            panic!(
                "fleet serve started: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    c.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_refuses_secrets_others_can_read_and_says_what_to_run() {
    let f = Fleet::new(Options {
        managed_master: false,
        ..Options::default()
    });
    for (file, mode) in [
        ("secrets/agent.token", 0o644),
        ("certs/ca.key", 0o640),
        ("secrets", 0o755),
    ] {
        let p = f.path().join(file);
        let was = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = serve_briefly(&f);
        assert_eq!(out.status.code(), Some(1), "{file} {mode:o}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        let want = if file == "secrets" {
            "chmod 700"
        } else {
            "chmod 600"
        };
        assert!(err.contains(want) && err.contains(file), "{file}: {err}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(was)).unwrap();
    }
}
