//! The nginx front (docs/nginx.md) with Debian's real nginx: `fleet nginx` renders a config that
//! `nginx -t` accepts and an htpasswd only for the right UI password; through nginx the human
//! routes need that password, agents reach `/v1/` with their token, a long-poll outlasts its
//! wait instead of timing out at nginx, and local agents run through it.
//!
//! Needs the `nginx` binary (`./run.sh setup` installs it). Without it the test is skipped
//! with a message, except under CI, where it must run.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use fleet_common::client::Client;
use fleet_tests::{assert_security_headers, bin, free_port, get_from, wait_for, Fleet, Options};

const T: Duration = Duration::from_secs(10);

fn basic(user: &str, pw: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    )
}

/// The nginx binary on `PATH` or in /usr/sbin (not on a normal user's `PATH`).
fn nginx_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

/// `fleet nginx` with `stdin` on its standard input.
fn fleet_nginx(f: &Fleet, args: &[&str], stdin: &str) -> Output {
    let mut c = Command::new(bin("fleet"))
        .arg("--dir")
        .arg(f.path())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fleet nginx");
    c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    c.wait_with_output().unwrap()
}

/// nginx in the foreground, in its own process group: stopped (and its workers with it) when
/// dropped, even if the test fails half-way.
struct Nginx {
    child: Option<Child>,
    dir: PathBuf,
}

impl Nginx {
    fn start(nginx: &Path, conf: &Path, dir: &Path) -> Nginx {
        let out = std::fs::File::create(dir.join("logs/foreground.log")).unwrap();
        let child = Command::new(nginx)
            .arg("-c")
            .arg(conf)
            .arg("-p")
            .arg(dir)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .expect("start nginx");
        Nginx {
            child: Some(child),
            dir: dir.to_path_buf(),
        }
    }

    fn logs(&self) -> String {
        let read =
            |n: &str| std::fs::read_to_string(self.dir.join("logs").join(n)).unwrap_or_default();
        format!("{}{}", read("foreground.log"), read("error.log"))
    }

    /// SIGQUIT (graceful), then SIGTERM, then SIGKILL of the whole group; true if it stopped
    /// on the first.
    fn stop(&mut self) -> bool {
        use fleet_common::process::signal_group;
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let pid = Pid::from_raw(c.id() as i32);
        for (i, sig) in [Signal::SIGQUIT, Signal::SIGTERM].into_iter().enumerate() {
            let _ = kill(pid, sig);
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    // The workers exit with the master; make sure none is left either way.
                    signal_group(c.id(), Signal::SIGKILL);
                    return i == 0;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        signal_group(c.id(), Signal::SIGKILL);
        let _ = c.wait();
        false
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_front_checks_the_password_and_passes_agents_through() {
    let Some(nginx) = nginx_bin() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "nginx is missing under CI: ./run.sh setup installs it (apt-get install nginx)"
        );
        eprintln!("SKIPPED: the nginx binary is missing; `apt-get install nginx` (or ./run.sh setup) to run this test");
        return;
    };
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let mut f = Fleet::new(Options {
        managed_master: false,
        worker_command: Some(vec!["sleep".into(), "3600".into()]),
        // Local agents reach the controller through nginx.
        agent_settings: vec![("controller".into(), url.clone().into())],
        ..Default::default()
    });
    let root = std::fs::metadata(f.path()).unwrap().uid() == 0;
    if root {
        // nginx starts as root and its workers run as www-data (the default `user`): they
        // must be able to reach <fleet>/nginx/htpasswd inside this 0700 temp directory.
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    f.start_serve();
    let listen = format!("127.0.0.1:{port}");

    // A wrong password is refused before anything is written: nginx and the controller can
    // never disagree about it.
    let out = fleet_nginx(
        &f,
        &["nginx", "--password-stdin", "--listen", &listen],
        "not-the-password\n",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("not the web UI password"), "{err}");
    assert!(!f.path().join("nginx/htpasswd").exists());
    // Neither way of giving the password: a usage error.
    assert_eq!(fleet_nginx(&f, &["nginx"], "").status.code(), Some(2));

    let out = fleet_nginx(
        &f,
        &[
            "--output",
            "json",
            "nginx",
            "--password-stdin",
            "--listen",
            &listen,
        ],
        &format!("{}\n", f.password),
    );
    assert!(
        out.status.success(),
        "fleet nginx: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dir = PathBuf::from(r["dir"].as_str().unwrap());
    let conf = PathBuf::from(r["conf"].as_str().unwrap());
    assert_eq!(dir, f.path().canonicalize().unwrap().join("nginx"));
    assert_eq!(r["url"], url);
    // This fleet does not trust nginx's X-Real-IP: `fleet nginx` says what to add.
    assert!(
        r["trust"]
            .as_str()
            .is_some_and(|t| t.contains("trusted_proxies = [\"127.0.0.1\"]")),
        "{r}"
    );
    assert!(r["test"].as_str().unwrap().starts_with(&format!(
        "nginx -t -c {} -p {}",
        conf.display(),
        dir.display()
    )));
    let ht = std::fs::read_to_string(dir.join("htpasswd")).unwrap();
    assert!(ht.starts_with("fleet:$6$"), "SHA-512-crypt: {ht}");
    assert!(!ht.contains(&f.password));
    let mode = std::fs::metadata(dir.join("htpasswd")).unwrap().mode() & 0o777;
    if root {
        assert_eq!(mode, 0o640, "readable by the workers' group only");
    } else {
        assert_eq!(mode, 0o600);
    }

    let t = Command::new(&nginx)
        .arg("-t")
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        t.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&t.stderr)
    );

    let mut ng = Nginx::start(&nginx, &conf, &dir);
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < T, "nginx did not listen: {}", ng.logs());
        std::thread::sleep(Duration::from_millis(50));
    }

    // nginx serves the fleet's own certificate, so the fleet CA verifies it.
    let ca = f.ca_pem();
    let client = |auth: Option<&str>| Client::new(&url, &ca, auth).unwrap();
    let none = client(None);
    let ui = client(Some(&basic("fleet", &f.password)));
    let wrong = client(Some(&basic("fleet", "not-the-password")));
    let agent = client(Some(&format!("Bearer {}", f.secret("agent.token"))));

    assert_eq!(none.get("/healthz", T, 1024).await.unwrap().status, 200);

    let dash = ui.get("/", T, 1 << 20).await.unwrap();
    assert_eq!(dash.status, 200, "{}", ng.logs());
    assert!(String::from_utf8_lossy(&dash.body).contains("<html"));
    assert_security_headers("the dashboard through nginx", &dash);
    for (who, c) in [
        ("wrong password", &wrong),
        ("no credentials", &none),
        ("agent token", &agent),
    ] {
        let r = c.get("/", T, 1 << 20).await.unwrap();
        assert_eq!(r.status, 401, "{who}");
        // nginx's own refusal: only the template's `add_header ... always` sets them here.
        assert_security_headers(who, &r);
        assert!(
            r.header("www-authenticate")
                .is_some_and(|h| h.starts_with("Basic realm=\"fleet\"")),
            "{who}: {:?}",
            r.headers
        );
    }
    assert_eq!(
        wrong.get("/api/nodes", T, 1 << 20).await.unwrap().status,
        401
    );
    let nodes = ui.get("/api/nodes", T, 1 << 20).await.unwrap();
    assert_eq!(nodes.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&nodes.body).expect("JSON");
    assert!(v.is_array(), "{v}");

    // Agents: bearer token, no basic auth at nginx; the controller checks the token.
    let m = wait_for("a manifest through nginx", T, || async {
        agent
            .get("/v1/manifest", T, 1 << 20)
            .await
            .ok()
            .filter(|r| r.status == 200)
    })
    .await;
    assert!(
        m.header("x-fleet-signature").is_some_and(|s| !s.is_empty()),
        "{:?}",
        m.headers
    );
    let manifest: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
    let seq = manifest["sequence"].as_u64().unwrap();
    let sha = manifest["bundle"]["sha256"].as_str().unwrap().to_string();
    assert_eq!(
        none.get("/v1/manifest", T, 1 << 20).await.unwrap().status,
        401
    );
    let b = agent
        .get(&format!("/v1/bundles/{sha}"), T, 64 << 20)
        .await
        .unwrap();
    assert_eq!(b.status, 200);
    let digest = ring::digest::digest(&ring::digest::SHA256, &b.body);
    let hex: String = digest.as_ref().iter().map(|x| format!("{x:02x}")).collect();
    assert_eq!(hex, sha);

    // A long-poll with nothing new: the controller's 204 after the wait, not an nginx timeout.
    let t0 = Instant::now();
    let lp = agent
        .get(&format!("/v1/manifest?after={seq}&wait=3"), T, 1 << 20)
        .await
        .unwrap();
    let held = t0.elapsed();
    assert_eq!(lp.status, 204, "{}", ng.logs());
    assert!(
        held >= Duration::from_millis(2500) && held < Duration::from_secs(8),
        "held {held:?}"
    );

    // A local agent whose `controller` is nginx: it joins, heartbeats pass through nginx.
    let out = f.cli(&["scale", "--nodes", "1", "--wait", "60"]);
    assert!(
        out.status.success(),
        "fleet scale: {}{}",
        String::from_utf8_lossy(&out.stderr),
        ng.logs()
    );
    let nodes = wait_for(
        "the agent running the bundle",
        Duration::from_secs(30),
        || async {
            let n = f.nodes().await;
            (n.len() == 1
                && n[0]
                    .heartbeat
                    .running
                    .as_ref()
                    .is_some_and(|r| r.sha256 == sha))
            .then_some(n)
        },
    )
    .await;
    assert_eq!(nodes.len(), 1);
    let access = std::fs::read_to_string(dir.join("logs/access.log")).unwrap();
    assert!(access.contains("\"POST /v1/heartbeat "), "{access}");
    assert!(access.contains("\"GET /v1/manifest?after="), "{access}");
    // The UI password never shows in nginx's log.
    assert!(!access.contains(&f.password));

    assert_eq!(f.cli(&["down"]).status.code(), Some(0));
    assert!(ng.stop(), "nginx did not stop on SIGQUIT: {}", ng.logs());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    f.stop_serve();
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_front_never_locks_out_valid_credentials() {
    let Some(nginx) = nginx_bin() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "nginx is missing under CI"
        );
        eprintln!("SKIPPED: the nginx binary is missing; `apt-get install nginx` to run this test");
        return;
    };
    let port = free_port();
    let mut f = Fleet::new(Options {
        managed_master: false,
        controller_settings: vec![(
            "trusted_proxies".into(),
            toml::Value::Array(vec!["127.0.0.1".into()]),
        )],
        ..Default::default()
    });
    if std::fs::metadata(f.path()).unwrap().uid() == 0 {
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    f.start_serve();
    let listen = format!("127.0.0.1:{port}");
    let out = fleet_nginx(
        &f,
        &[
            "--output",
            "json",
            "nginx",
            "--password-stdin",
            "--listen",
            &listen,
        ],
        &format!("{}\n", f.password),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r.get("trust").is_none(), "nginx is trusted already: {r}");
    let dir = PathBuf::from(r["dir"].as_str().unwrap());
    let ng = Nginx::start(&nginx, &PathBuf::from(r["conf"].as_str().unwrap()), &dir);
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < T, "nginx did not listen: {}", ng.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for("first publication", T, || async { f.current_sha().await }).await;

    let ca = f.ca_pem();
    let stranger = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let wrong_pw = basic("fleet", "guess");
    let agent_token = format!("Bearer {}", f.secret("agent.token"));
    let get = |from, path: &'static str, authz: String| {
        let ca = ca.clone();
        async move { get_from(port, &ca, from, path, &[("authorization", &authz)]).await }
    };
    // A stranger behind nginx: 50 wrong passwords (nginx refuses them itself) and 50 wrong agent
    // tokens (nginx passes them on; the controller counts them against the stranger).
    let mut statuses = vec![];
    for _ in 0..50 {
        statuses.push(get(stranger, "/api/spec", wrong_pw.clone()).await);
        statuses.push(get(stranger, "/v1/manifest", "Bearer wrong".into()).await);
    }
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 429),
        "{statuses:?}"
    );
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    // Counted against the stranger, not against nginx: another client's failure is a 401.
    let other = std::net::Ipv4Addr::new(127, 0, 0, 3);
    assert_eq!(get(other, "/v1/manifest", "Bearer wrong".into()).await, 401);

    // The right credentials from the stranger's own address, through nginx, at once.
    for (who, path, authz) in [
        ("UI password", "/api/spec", basic("fleet", &f.password)),
        ("agent token", "/v1/manifest", agent_token.clone()),
    ] {
        let t0 = Instant::now();
        assert_eq!(
            get(stranger, path, authz).await,
            200,
            "{who}: {}",
            ng.logs()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "{who}: {:?}",
            t0.elapsed()
        );
    }
    // The operator token goes to the controller directly (nginx's basic auth refuses a Bearer
    // credential), from nginx's own address.
    assert_eq!(
        f.operator()
            .get("/api/spec", T, 1 << 20)
            .await
            .unwrap()
            .status,
        200
    );
    drop(ng);
    f.stop_serve();
}
