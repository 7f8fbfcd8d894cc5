//! Harness for the end-to-end tests: a fleet directory in a temp dir with its own ports, the
//! real `fleet` and `fleet-agent` binaries, and the real `locust` from the project's venv.
//!
//! The binaries come from the workspace's target directory (`./run.sh test` builds them
//! first); Locust from `FLEET_TEST_LOCUST` or `<workspace>/.venv/bin/locust`. Everything
//! listens on 127.0.0.1.
#![forbid(unsafe_code)]

pub mod aws;
pub mod fake_controller;
pub mod pki;
pub mod procfs;
pub mod proxy;

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use fleet_common::client::Client;
use fleet_common::wire::{NodeView, SpecView};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// A binary of the workspace, next to the running test's `deps/` directory.
/// Starts `fleet-agent --config cfg` on its own, logging to `dir/agent.log`, with none of the
/// test run's own `FLEET_AGENT_*` variables (the config file alone decides).
pub fn spawn_agent(cfg: &Path, dir: &Path) -> Child {
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let mut cmd = Command::new(bin("fleet-agent"));
    cmd.arg("--config")
        .arg(cfg)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FLEET_AGENT_") {
            cmd.env_remove(k);
        }
    }
    cmd.spawn().expect("spawn fleet-agent")
}

pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build --workspace` (or ./run.sh test) first",
        p.display()
    );
    p
}

/// The `locust` the tests run. As root, `fleet serve` runs the master as `nobody`
/// (docs/security.md, "The spec author's reach"), so a Locust whose Python `nobody` cannot
/// read (a pyenv under `/root`) is replaced by [`locust_for_nobody`].
pub fn locust() -> PathBuf {
    static LOCUST: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    LOCUST
        .get_or_init(|| {
            let p = project_locust();
            if !nix::unistd::geteuid().is_root() || runs_as_nobody(&p) {
                p
            } else {
                locust_for_nobody(&p)
            }
        })
        .clone()
}

fn project_locust() -> PathBuf {
    let p = std::env::var_os("FLEET_TEST_LOCUST")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/locust"));
    assert!(
        p.is_file(),
        "{} is missing: run ./run.sh setup first",
        p.display()
    );
    p
}

const NOBODY: u32 = 65534;

fn runs_as_nobody(locust: &Path) -> bool {
    use std::os::unix::process::CommandExt;
    Command::new(locust)
        .arg("--version")
        .env_clear()
        .env("HOME", "/")
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A virtualenv of the system's `python3` (readable by everyone) that imports the packages
/// of `locust`'s own venv, in the target directory; made once. The two Pythons must share
/// their minor version (the packages hold compiled extensions).
pub fn locust_for_nobody(locust: &Path) -> PathBuf {
    let dir = bin("fleet").parent().unwrap().join("locust-for-nobody");
    let script = dir.join("bin/locust");
    if script.is_file() && runs_as_nobody(&script) {
        return script;
    }
    let py = |exe: &Path, code: &str| -> String {
        let out = Command::new(exe)
            .args(["-c", code])
            .output()
            .expect("python");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let venv_python = locust.parent().unwrap().join("python");
    let system = Path::new("/usr/bin/python3");
    let version = "import sys; print(sys.version_info[:2])";
    assert_eq!(
        py(&venv_python, version),
        py(system, version),
        "the tests run the Locust master as nobody, who cannot read {}'s Python; install the \
         venv from /usr/bin/python3 (same minor version needed for this fallback)",
        locust.display()
    );
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let ok = Command::new(system)
        .args(["-m", "venv", "--without-pip"])
        .arg(&tmp)
        .status()
        .expect("python3 -m venv");
    assert!(ok.success(), "python3 -m venv {}", tmp.display());
    let purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])";
    let site = py(&venv_python, purelib);
    let tmp_python = tmp.join("bin/python");
    let own_site = PathBuf::from(py(&tmp_python, purelib));
    std::fs::write(own_site.join("fleet-tests.pth"), format!("{site}\n")).unwrap();
    std::fs::write(
        tmp.join("bin/locust"),
        format!(
            "#!{}\nimport sys\nfrom locust.main import main\nsys.exit(main())\n",
            dir.join("bin/python").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        tmp.join("bin/locust"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    // Another test binary may have made it meanwhile: either copy will do.
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    assert!(
        runs_as_nobody(&script),
        "{} does not run as nobody: is the target directory readable by others?",
        script.display()
    );
    script
}

/// A port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// `n` consecutive ports free right now on 127.0.0.1, the first one returned (shards take
/// `port + k`). Below the kernel's ephemeral range (32768 up), so an outgoing connection
/// cannot take one meanwhile.
pub fn free_block(n: u16) -> u16 {
    let seed = std::process::id() as u64 * 7919
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
    for i in 0..1000u64 {
        let first = 20_000 + ((seed + i * 131) % 12_000) as u16;
        let all: Vec<_> = (0..n)
            .map(|k| TcpListener::bind(("127.0.0.1", first + k)))
            .collect();
        if all.iter().all(|l| l.is_ok()) {
            return first;
        }
    }
    panic!("no {n} consecutive free ports between 20000 and 32000");
}

/// Polls `f` every 100 ms until it returns `Some`, or panics naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let t = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            t.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Like [`wait_for`], for a check that says why it is not there yet: the last reason is in the
/// panic.
pub async fn wait_for_why<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let t = Instant::now();
    loop {
        let why = match f().await {
            Ok(v) => return v,
            Err(why) => why,
        };
        assert!(
            t.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}; last seen: {why}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Replaces the worker command (stub workers); `None` runs real Locust workers.
    pub worker_command: Option<Vec<String>>,
    pub workers: u32,
    /// Extra agent settings (`join_grace_ms`, `stable_ms`, ...).
    pub agent_settings: Vec<(String, toml::Value)>,
    /// Run a managed Locust master.
    pub managed_master: bool,
    pub debounce_ms: u64,
    /// Extra `[controller]` settings.
    pub controller_settings: Vec<(String, toml::Value)>,
    /// `[spec]` settings (the validation gate).
    pub spec_settings: Vec<(String, toml::Value)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            worker_command: None,
            workers: 1,
            agent_settings: vec![],
            managed_master: true,
            debounce_ms: 100,
            controller_settings: vec![],
            spec_settings: vec![],
        }
    }
}

/// A fleet directory with its own ports, and the `fleet serve` process when started.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub port: u16,
    pub master_port: u16,
    pub web_port: u16,
    pub password: String,
    serve: Option<Child>,
}

impl Fleet {
    pub fn new(o: Options) -> Fleet {
        let dir = tempfile::Builder::new()
            .prefix("fleet-e2e-")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let (master_port, web_port) = (free_port(), free_port());
        let locust = locust();
        let out = Command::new(bin("fleet"))
            .arg("--dir")
            .arg(dir.path())
            .args([
                "--output",
                "json",
                "init",
                "--name",
                "e2e",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .arg("--locust")
            .arg(&locust)
            .output()
            .expect("fleet init");
        assert!(
            out.status.success(),
            "fleet init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("init json");
        let password = v["password"].as_str().expect("password").to_string();
        let cfg_path = dir.path().join("fleet.toml");
        let mut t: toml::Table = std::fs::read_to_string(&cfg_path).unwrap().parse().unwrap();
        {
            let c = t["controller"].as_table_mut().unwrap();
            c.insert("debounce_ms".into(), (o.debounce_ms as i64).into());
            for (k, v) in &o.controller_settings {
                c.insert(k.clone(), v.clone());
            }
            if !o.spec_settings.is_empty() {
                t.insert(
                    "spec".into(),
                    toml::Table::from_iter(o.spec_settings.iter().cloned()).into(),
                );
            }
            let m = t["master"].as_table_mut().unwrap();
            m.insert("managed".into(), o.managed_master.into());
            m.insert("port".into(), i64::from(master_port).into());
            m.insert(
                "web_url".into(),
                format!("http://127.0.0.1:{web_port}/locust").into(),
            );
            let l = t["local"].as_table_mut().unwrap();
            l.insert("workers".into(), i64::from(o.workers).into());
            l.insert(
                "agent_bin".into(),
                bin("fleet-agent").display().to_string().into(),
            );
            if let Some(cmd) = &o.worker_command {
                l.insert(
                    "worker_command".into(),
                    toml::Value::Array(cmd.iter().map(|s| s.clone().into()).collect()),
                );
            }
            let mut settings = toml::Table::new();
            // Fast feedback in tests; the defaults suit real fleets.
            settings.insert("heartbeat_ms".into(), 1000.into());
            for (k, v) in &o.agent_settings {
                settings.insert(k.clone(), v.clone());
            }
            l.insert("agent_settings".into(), settings.into());
        }
        std::fs::write(&cfg_path, toml::to_string(&t).unwrap()).unwrap();
        Fleet {
            url: format!("https://127.0.0.1:{port}"),
            port,
            master_port,
            web_port,
            password,
            dir,
            serve: None,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Configures `master.shards = k` on a block of free ports: ZMQ `port + i` and web port
    /// `+ i` for shard i. Returns shard 0's ZMQ port (also `master_port` now). Before
    /// [`Fleet::start_serve`].
    pub fn use_shards(&mut self, k: u16) -> u16 {
        self.use_shard_ports(k, i64::from(k).into())
    }

    /// [`Fleet::use_shards`] with any `master.shards` setting (`"auto"`), with ports for up to
    /// `room` shards.
    pub fn use_shard_ports(&mut self, room: u16, shards: toml::Value) -> u16 {
        let zmq = free_block(room * 2);
        let web = zmq + room;
        let cfg_path = self.path().join("fleet.toml");
        let mut t: toml::Table = std::fs::read_to_string(&cfg_path).unwrap().parse().unwrap();
        let m = t["master"].as_table_mut().unwrap();
        m.insert("shards".into(), shards);
        m.insert("port".into(), i64::from(zmq).into());
        m.insert(
            "web_url".into(),
            format!("http://127.0.0.1:{web}/locust").into(),
        );
        std::fs::write(&cfg_path, toml::to_string(&t).unwrap()).unwrap();
        (self.master_port, self.web_port) = (zmq, web);
        zmq
    }

    pub fn spec_file(&self) -> PathBuf {
        self.path().join("spec/locustfile.py")
    }

    /// Replaces the locustfile (written beside and renamed, as editors do).
    pub fn write_spec(&self, text: &str) {
        let tmp = self.path().join("spec/.locustfile.py.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.spec_file()).unwrap();
    }

    /// Runs the `fleet` CLI on this directory.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("fleet"))
            .arg("--dir")
            .arg(self.path())
            .args(args)
            .output()
            .expect("fleet")
    }

    pub fn start_serve(&mut self) {
        let mut cmd = Command::new(bin("fleet"));
        cmd.arg("--dir").arg(self.path()).arg("serve");
        self.spawn_serve(cmd);
    }

    /// Starts `fleet serve` with these variables added to its environment.
    pub fn start_serve_with_env(&mut self, env: &[(&str, &str)]) {
        let mut cmd = Command::new(bin("fleet"));
        cmd.arg("--dir")
            .arg(self.path())
            .arg("serve")
            .envs(env.iter().copied());
        self.spawn_serve(cmd);
    }

    /// Starts `fleet serve` under open-files limits set by the shell first (`ulimit -Sn` for
    /// `soft`, `-Hn` for `hard`), as a login shell or a unit without `LimitNOFILE` would.
    pub fn start_serve_with_nofile(&mut self, soft: u64, hard: Option<u64>) {
        // The soft limit first: a hard limit below the current soft one is refused.
        let hard = hard
            .map(|h| format!("ulimit -Hn {h} && "))
            .unwrap_or_default();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("ulimit -Sn {soft} && {hard}exec \"$0\" \"$@\""))
            .arg(bin("fleet"))
            .arg("--dir")
            .arg(self.path())
            .arg("serve");
        self.spawn_serve(cmd);
    }

    /// The pid of `fleet serve`, while it runs.
    pub fn serve_pid(&self) -> Option<u32> {
        self.serve.as_ref().map(|c| c.id())
    }

    fn spawn_serve(&mut self, mut cmd: Command) {
        assert!(self.serve.is_none(), "already serving");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join("serve.log"))
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("fleet serve");
        self.serve = Some(child);
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "fleet serve did not listen: {}",
                self.serve_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills `fleet serve` hard (SIGKILL): what a crash looks like.
    pub fn kill_serve(&mut self) {
        if let Some(mut c) = self.serve.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops `fleet serve` cleanly (SIGTERM), which also stops the managed master.
    pub fn stop_serve(&mut self) {
        if let Some(mut c) = self.serve.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn serve_log(&self) -> String {
        std::fs::read_to_string(self.path().join("serve.log")).unwrap_or_default()
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.path().join("certs/ca.pem")).unwrap()
    }

    pub fn secret(&self, name: &str) -> String {
        std::fs::read_to_string(self.path().join("secrets").join(name))
            .unwrap()
            .trim()
            .to_string()
    }

    /// A client with the given `Authorization` value (or none).
    pub fn client_with(&self, auth: Option<&str>) -> Client {
        Client::new(&self.url, &self.ca_pem(), auth).unwrap()
    }

    pub fn operator(&self) -> Client {
        self.client_with(Some(&format!("Bearer {}", self.secret("operator.token"))))
    }

    pub fn agent(&self) -> Client {
        self.client_with(Some(&format!("Bearer {}", self.secret("agent.token"))))
    }

    pub async fn get_json(&self, path: &str) -> Option<serde_json::Value> {
        let r = self
            .operator()
            .get(path, Duration::from_secs(10), 16 << 20)
            .await
            .ok()?;
        if r.status != 200 {
            return None;
        }
        serde_json::from_slice(&r.body).ok()
    }

    pub async fn nodes(&self) -> Vec<NodeView> {
        let r = self
            .operator()
            .get("/api/nodes", Duration::from_secs(10), 16 << 20)
            .await;
        match r {
            Ok(r) if r.status == 200 => serde_json::from_slice(&r.body).unwrap_or_default(),
            _ => vec![],
        }
    }

    pub async fn spec(&self) -> Option<SpecView> {
        serde_json::from_value(self.get_json("/api/spec").await?).ok()
    }

    /// Locust's `/stats/requests`, through the controller's proxy.
    pub async fn locust_stats(&self) -> Option<serde_json::Value> {
        self.get_json("/locust/stats/requests").await
    }

    /// Shard `k`'s own `/stats/requests` (`/locust/<k>/`; shard 0 is `/locust/`).
    pub async fn shard_stats(&self, k: usize) -> Option<serde_json::Value> {
        match k {
            0 => self.locust_stats().await,
            k => self.get_json(&format!("/locust/{k}/stats/requests")).await,
        }
    }

    /// The signed manifest as an agent gets it now (`GET /v1/manifest`, without waiting).
    pub async fn manifest(&self) -> Option<serde_json::Value> {
        let r = self
            .agent()
            .get("/v1/manifest", Duration::from_secs(10), 1 << 20)
            .await
            .ok()?;
        serde_json::from_slice(&r.body).ok()
    }

    /// Waits until `n` nodes run `sha` with every worker running; returns them.
    pub async fn wait_all_running(&self, n: usize, sha: &str, timeout: Duration) -> Vec<NodeView> {
        wait_for(&format!("{n} nodes running {sha}"), timeout, || async {
            let nodes = self.nodes().await;
            let ok = nodes.len() == n
                && nodes.iter().all(|v| {
                    v.heartbeat
                        .running
                        .as_ref()
                        .is_some_and(|r| r.sha256 == sha)
                        && v.heartbeat
                            .workers
                            .iter()
                            .all(|w| w.state == fleet_common::wire::WorkerState::Running)
                });
            ok.then_some(nodes)
        })
        .await
    }

    pub async fn current_sha(&self) -> Option<String> {
        self.spec().await?.current.map(|c| c.sha256)
    }

    /// Waits for a publication other than `old`; returns its sha.
    pub async fn wait_new_sha(&self, old: &str, timeout: Duration) -> String {
        wait_for("a new publication", timeout, || async {
            self.current_sha().await.filter(|s| s != old)
        })
        .await
    }

    fn master_pid(&self) -> Option<i32> {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.path().join("state/master.json")).ok()?)
                .ok()?;
        v["pid"].as_i64().map(|p| p as i32)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.cli(&["down"]);
        self.stop_serve();
        // A master orphaned by a killed controller: its process group.
        if let Some(pid) = self.master_pid() {
            use fleet_common::process::{signal_group, Signal};
            signal_group(pid as u32, Signal::SIGKILL);
        }
        if std::env::var_os("FLEET_TEST_KEEP").is_some() {
            let p = self.dir.path().to_path_buf();
            eprintln!("keeping {}", p.display());
            std::mem::forget(std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().unwrap(),
            ));
        }
    }
}

/// The security headers every answer of the controller (and of the nginx front) carries, each
/// exactly once (docs/security.md, "Browsers").
pub fn assert_security_headers(what: &str, r: &fleet_common::client::Response) {
    for (name, value) in [
        ("strict-transport-security", "max-age=31536000"),
        ("x-frame-options", "DENY"),
        ("content-security-policy", "frame-ancestors 'none'"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "same-origin"),
    ] {
        let all: Vec<_> = r.headers.get_all(name).iter().collect();
        assert_eq!(all, [value], "{what}: {name} in {:?}", r.headers);
    }
}

/// A locustfile for the sample target at `target` with one task per `(name, path)`.
pub fn locustfile(target: &str, class: &str, tasks: &[(&str, &str)]) -> String {
    let mut s = format!(
        "from locust import FastHttpUser, constant, task\n\n\nclass {class}(FastHttpUser):\n    host = \"{target}\"\n    wait_time = constant(0.2)\n"
    );
    for (name, path) in tasks {
        s.push_str(&format!(
            "\n    @task\n    def {name}(self):\n        self.client.get(\"{path}\")\n"
        ));
    }
    s
}

/// Starts `fleet target` on a free port; returns its base URL and the process.
pub fn start_target() -> (String, Child) {
    let port = free_port();
    let child = Command::new(bin("fleet"))
        .args(["target", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fleet target");
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "target did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (format!("http://127.0.0.1:{port}"), child)
}

/// One `GET path` to `https://127.0.0.1:port` (TLS verified against `ca_pem`) from the local
/// address `from` (any 127.x.y.z works on loopback), with `headers`; the answer's status.
/// For what the shared client cannot do: choose the source address, or send `X-Real-IP`.
pub async fn get_from(
    port: u16,
    ca_pem: &str,
    from: std::net::Ipv4Addr,
    path: &str,
    headers: &[(&str, &str)],
) -> u16 {
    use http_body_util::{BodyExt, Empty};
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind((from, 0).into())
        .unwrap_or_else(|e| panic!("bind {from}: {e}"));
    let tcp = sock
        .connect(([127, 0, 0, 1], port).into())
        .await
        .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port} from {from}: {e}"));
    let tls = tokio_rustls::TlsConnector::from(fleet_common::client::tls_config(ca_pem).unwrap())
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS handshake");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .expect("HTTP handshake");
    tokio::spawn(conn);
    let mut req = hyper::Request::get(path).header("host", format!("127.0.0.1:{port}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send
        .send_request(req.body(Empty::<bytes::Bytes>::new()).unwrap())
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}
