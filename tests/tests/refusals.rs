//! Refusals, end to end: a real `fleet-agent` follows a fake controller (a TLS server inside
//! this test whose publications the test swaps at will) and must refuse every broken or hostile
//! publication DESIGN.md lists under "Fixed contracts: Bundle" — bad signature, sha or size
//! mismatch, a lower sequence, absolute or escaping paths, links, devices, anything over a size
//! cap, an unsafe locustfile path — without ever stopping or restarting the worker it already
//! runs. A newer good bundle afterwards is still taken, so no refusal wedges the agent.
//!
//! A second test checks the other end of the trust chain: an agent that does not trust the
//! server's certificate (another CA, or a certificate for another name) never talks to it.
//!
//! Workers are stubs (`sh -c 'exec sleep 3600'`); their PIDs come from the heartbeats.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fleet_common::bundle::{self, Limits, Packed};
use fleet_common::manifest::{
    BundleRef, Manifest, MasterAddr, Signed, SigningKey, FORMAT, SIGNATURE_HEADER,
};
use fleet_common::wire::{Heartbeat, NodeStatus, WorkerState};
use fleet_tests::bin;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;

const TOKEN: &str = "refusals-test-agent-token";
/// The agent's caps in these tests: small, so oversize bundles stay cheap to build and serve.
const MAX_BUNDLE_BYTES: u64 = 256 << 10;
const MAX_UNPACKED_BYTES: u64 = 64 << 10;
/// How long a refusal gets to show up in a heartbeat. Manifest-level refusals make the agent
/// back off (up to 5 s plus jitter) before its next poll, so this is generous.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the running worker is watched after a refusal was reported.
const HOLD: Duration = Duration::from_millis(800);

// ---------------------------------------------------------------------------------------------
// PKI
// ---------------------------------------------------------------------------------------------

type Ca = CertifiedIssuer<'static, KeyPair>;

fn new_ca(name: &str) -> Ca {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(p, key).unwrap()
}

/// A rustls server config with an ECDSA P-256 certificate for `names`, issued by `ca`.
fn server_tls(ca: &Ca, names: &[&str]) -> Arc<rustls::ServerConfig> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name
        .push(DnType::CommonName, "fake fleet controller");
    let cert = p.signed_by(&key, ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    Arc::new(cfg)
}

// ---------------------------------------------------------------------------------------------
// The fake controller
// ---------------------------------------------------------------------------------------------

struct Served {
    sequence: u64,
    bytes: Bytes,
    signature_b64: String,
}

#[derive(Default)]
struct State {
    manifest: Option<Served>,
    bundles: HashMap<String, Bytes>,
    heartbeats: Vec<Heartbeat>,
    /// Every `GET /v1/bundles/<id>`, in order.
    bundle_gets: Vec<String>,
    /// Requests that reached the HTTP layer (so passed the TLS handshake).
    requests: u64,
    /// Connections whose TLS handshake failed.
    tls_failures: u64,
}

struct Fake {
    state: Mutex<State>,
    /// Bumped on every publication, to wake held long-polls.
    published: watch::Sender<u64>,
    url: String,
}

impl Fake {
    async fn start(tls: Arc<rustls::ServerConfig>) -> Arc<Fake> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let fake = Arc::new(Fake {
            state: Mutex::new(State::default()),
            published: watch::channel(0).0,
            url: format!("https://127.0.0.1:{port}"),
        });
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let f = fake.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let f = f.clone();
                tokio::spawn(async move {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(t) => t,
                        Err(_) => {
                            f.state.lock().unwrap().tls_failures += 1;
                            return;
                        }
                    };
                    let svc = hyper::service::service_fn(move |req| handle(f.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        fake
    }

    fn put_bundle(&self, sha: &str, bytes: &[u8]) {
        self.state
            .lock()
            .unwrap()
            .bundles
            .insert(sha.to_string(), Bytes::copy_from_slice(bytes));
    }

    /// Makes `bytes` (with `signature_b64` in the signature header) the current manifest.
    fn publish_raw(&self, sequence: u64, bytes: Vec<u8>, signature_b64: String) {
        self.state.lock().unwrap().manifest = Some(Served {
            sequence,
            bytes: Bytes::from(bytes),
            signature_b64,
        });
        self.published.send_modify(|n| *n += 1);
    }

    fn publish(&self, signed: &Signed, sequence: u64) {
        self.publish_raw(sequence, signed.bytes.clone(), signed.signature_b64());
    }

    fn heartbeat_count(&self) -> usize {
        self.state.lock().unwrap().heartbeats.len()
    }

    fn heartbeats_since(&self, n: usize) -> Vec<Heartbeat> {
        self.state.lock().unwrap().heartbeats[n..].to_vec()
    }

    fn last_heartbeat(&self) -> Option<Heartbeat> {
        self.state.lock().unwrap().heartbeats.last().cloned()
    }

    fn bundle_gets(&self, sha: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .bundle_gets
            .iter()
            .filter(|s| *s == sha)
            .count()
    }

    /// Every worker PID any heartbeat reported.
    fn worker_pids(&self) -> Vec<u32> {
        let st = self.state.lock().unwrap();
        let mut pids: Vec<u32> = st
            .heartbeats
            .iter()
            .flat_map(|h| h.workers.iter().filter_map(|w| w.pid))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// `GET /v1/manifest?wait=N[&after=SEQ]`: the current manifest at once unless the agent
    /// already has its sequence (a lower one is served too, so rollbacks can be tried);
    /// otherwise held until a publication or the wait runs out (204).
    async fn manifest(&self, query: &str) -> Response<Full<Bytes>> {
        let mut after = None;
        let mut wait = 0u64;
        for kv in query.split('&') {
            match kv.split_once('=') {
                Some(("after", v)) => after = v.parse::<u64>().ok(),
                Some(("wait", v)) => wait = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(wait.min(5));
        let mut rx = self.published.subscribe();
        loop {
            {
                let st = self.state.lock().unwrap();
                if let Some(m) = &st.manifest {
                    if after != Some(m.sequence) {
                        return Response::builder()
                            .status(StatusCode::OK)
                            .header(CONTENT_TYPE, "application/json")
                            .header(SIGNATURE_HEADER, m.signature_b64.as_str())
                            .body(Full::new(m.bytes.clone()))
                            .unwrap();
                    }
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return reply(StatusCode::NO_CONTENT, ""),
            }
        }
    }
}

fn reply(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

async fn handle(
    fake: Arc<Fake>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    fake.state.lock().unwrap().requests += 1;
    let authorized = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(format!("Bearer {TOKEN}").as_str());
    if !authorized {
        return Ok(reply(StatusCode::UNAUTHORIZED, ""));
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    if method == hyper::Method::GET && path == "/v1/manifest" {
        return Ok(fake.manifest(&query).await);
    }
    if method == hyper::Method::GET {
        if let Some(sha) = path.strip_prefix("/v1/bundles/") {
            let mut st = fake.state.lock().unwrap();
            st.bundle_gets.push(sha.to_string());
            return Ok(match st.bundles.get(sha) {
                Some(b) => Response::builder()
                    .status(StatusCode::OK)
                    .header(CONTENT_TYPE, "application/gzip")
                    .body(Full::new(b.clone()))
                    .unwrap(),
                None => reply(StatusCode::NOT_FOUND, ""),
            });
        }
    }
    if method == hyper::Method::POST && path == "/v1/heartbeat" {
        let Ok(body) = req.into_body().collect().await else {
            return Ok(reply(StatusCode::BAD_REQUEST, ""));
        };
        return Ok(
            match serde_json::from_slice::<Heartbeat>(&body.to_bytes()) {
                Ok(hb) => {
                    fake.state.lock().unwrap().heartbeats.push(hb);
                    reply(StatusCode::OK, "{}")
                }
                Err(_) => reply(StatusCode::BAD_REQUEST, ""),
            },
        );
    }
    Ok(reply(StatusCode::NOT_FOUND, ""))
}

// ---------------------------------------------------------------------------------------------
// Bundles and manifests
// ---------------------------------------------------------------------------------------------

/// A good bundle whose locustfile carries `marker`, packed by the real packer.
fn good_bundle(marker: &str) -> Packed {
    let d = tempfile::tempdir().unwrap();
    fs::write(
        d.path().join("locustfile.py"),
        format!("# {marker}\nfrom locust import User\n"),
    )
    .unwrap();
    fs::create_dir(d.path().join("lib")).unwrap();
    fs::write(d.path().join("lib/helpers.py"), "X = 1\n").unwrap();
    bundle::pack_dir(d.path(), "locustfile.py", &Limits::default()).unwrap()
}

/// A gzipped tar written header by header with raw names, so that hostile entries get through:
/// `(name, type, data, link target)`.
fn raw_tar(entries: &[(&str, tar::EntryType, &[u8], &str)]) -> Vec<u8> {
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (name, ty, data, link) in entries {
        assert!(
            name.len() < 100 && link.len() < 100,
            "name too long: {name}"
        );
        let mut h = tar::Header::new_old();
        {
            let raw = h.as_old_mut();
            raw.name[..name.len()].copy_from_slice(name.as_bytes());
            raw.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(*ty);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

const LOCUSTFILE: &[u8] = b"from locust import User\n";

fn manifest(sequence: u64, sha: &str, size: u64, locustfile: &str) -> Manifest {
    Manifest {
        format: FORMAT,
        fleet: "refusals".into(),
        sequence,
        bundle: BundleRef {
            sha256: sha.into(),
            size,
        },
        locustfile: locustfile.into(),
        master: MasterAddr {
            host: "127.0.0.1".into(),
            port: 5557,
        },
        master_epoch: 1,
        worker_args: vec![],
        created: "2026-01-01T00:00:00Z".into(),
    }
}

fn manifest_for(sequence: u64, bytes: &[u8]) -> Manifest {
    manifest(
        sequence,
        &bundle::sha256_hex(bytes),
        bytes.len() as u64,
        "locustfile.py",
    )
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// The process state letter from `/proc/<pid>/stat` (`R`, `S`, `Z`...), if the process exists.
fn proc_state(pid: u32) -> Option<char> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .split('\0')
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Whether `pid` is a live (not zombie) stub worker.
fn is_live_worker(pid: u32) -> bool {
    matches!(proc_state(pid), Some(c) if c != 'Z' && c != 'X') && cmdline(pid) == "sleep 3600"
}

/// Gone: no such process, or only a zombie left for init.
fn is_gone(pid: u32) -> bool {
    matches!(proc_state(pid), None | Some('Z') | Some('X'))
}

/// A running `fleet-agent` with its own temp dir (config, state, log).
struct Agent {
    child: Option<Child>,
    dir: tempfile::TempDir,
    fake: Arc<Fake>,
}

impl Agent {
    fn start(fake: &Arc<Fake>, ca_pem: &str, verify_key: &str) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("fleet-refusals-")
            .tempdir()
            .unwrap();
        let mut t = toml::Table::new();
        let mut set = |k: &str, v: toml::Value| {
            t.insert(k.to_string(), v);
        };
        set("controller", fake.url.clone().into());
        set("ca_pem", ca_pem.into());
        set("token", TOKEN.into());
        set("verify_key", verify_key.into());
        set(
            "state_dir",
            dir.path().join("state").display().to_string().into(),
        );
        set("node_id", "refusals-node".into());
        // Configured by this file alone: never ask an instance metadata service.
        set("imds", false.into());
        set("workers", 1.into());
        set(
            "worker_command",
            toml::Value::Array(vec!["sh".into(), "-c".into(), "exec sleep 3600".into()]),
        );
        set("heartbeat_ms", 200.into());
        set("join_grace_ms", 200.into());
        set("stop_grace_ms", 1000.into());
        set("stable_ms", 1000.into());
        set("poll_wait_s", 2.into());
        set("max_bundle_bytes", (MAX_BUNDLE_BYTES as i64).into());
        set("max_unpacked_bytes", (MAX_UNPACKED_BYTES as i64).into());
        let cfg = dir.path().join("agent.toml");
        fs::write(&cfg, toml::to_string(&t).unwrap()).unwrap();
        let log = fs::File::create(dir.path().join("agent.log")).unwrap();
        let mut cmd = Command::new(bin("fleet-agent"));
        cmd.arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FLEET_AGENT_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd.spawn().expect("spawn fleet-agent");
        Agent {
            child: Some(child),
            dir,
            fake: fake.clone(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn state_dir(&self) -> PathBuf {
        self.path().join("state")
    }

    fn bundle_dir(&self, sha: &str) -> PathBuf {
        self.state_dir().join("bundles").join(sha)
    }

    /// Names under `state/bundles` (unpacked bundles and any unpack debris).
    fn bundle_entries(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.state_dir().join("bundles"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn log(&self) -> String {
        fs::read_to_string(self.path().join("agent.log")).unwrap_or_default()
    }

    /// Context for failure messages.
    fn context(&self) -> String {
        format!(
            "\nlast heartbeat: {:#?}\nagent log:\n{}",
            self.fake.last_heartbeat(),
            self.log()
        )
    }

    /// Polls `f` every 50 ms until it gives `Some`, or fails naming `what`.
    async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Option<T>,
    ) -> T {
        let t = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            if let Some(c) = self.child.as_ref() {
                assert!(
                    fs::metadata(format!("/proc/{}", c.id())).is_ok(),
                    "the agent died while waiting for {what}{}",
                    self.context()
                );
            }
            assert!(
                t.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}{}",
                self.context()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits for the agent to exit.
    async fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        let t = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if t.elapsed() > Duration::from_secs(15) {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the agent did not exit within 15 s of SIGTERM{}",
                    self.context()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- agent in {} ---{}",
                self.path().display(),
                self.context()
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Workers the agent left behind (it only does on SIGKILL, or by a bug): their groups.
        for pid in self.fake.worker_pids() {
            if is_live_worker(pid) {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The refusal cases
// ---------------------------------------------------------------------------------------------

struct Case {
    name: &'static str,
    /// The sequence published (the agent consumes a sequence whose bundle it refused).
    sequence: u64,
    manifest: Vec<u8>,
    signature_b64: String,
    /// Bundles the fake serves for this case: `(id, bytes)`.
    bundles: Vec<(String, Vec<u8>)>,
    /// Lower-case fragments the heartbeat's `last_error` must all contain.
    expect: Vec<String>,
    /// Bundle ids the agent must not even download (refused from the manifest alone).
    not_fetched: Vec<String>,
    /// Paths a hostile bundle tries to write: they must not exist afterwards.
    must_not_exist: Vec<PathBuf>,
}

impl Case {
    /// A case whose manifest is properly signed by `key`.
    fn signed(name: &'static str, key: &SigningKey, m: &Manifest) -> Case {
        let s = key.sign(m);
        Case {
            name,
            sequence: m.sequence,
            signature_b64: s.signature_b64(),
            manifest: s.bytes,
            bundles: vec![],
            expect: vec![],
            not_fetched: vec![],
            must_not_exist: vec![],
        }
    }

    /// A properly signed manifest naming `bytes` honestly, served as they are: refused for
    /// what is inside the archive.
    fn hostile_bundle(
        name: &'static str,
        key: &SigningKey,
        sequence: u64,
        bytes: Vec<u8>,
        why: &str,
    ) -> Case {
        let m = manifest_for(sequence, &bytes);
        let mut c = Case::signed(name, key, &m);
        c.bundles.push((m.bundle.sha256.clone(), bytes));
        c.expect = vec![format!("sequence {sequence}"), why.to_string()];
        c
    }

    fn matches(&self, last_error: Option<&str>) -> bool {
        matches_expect(&self.expect, last_error)
    }
}

fn matches_expect(expect: &[String], last_error: Option<&str>) -> bool {
    let Some(e) = last_error else { return false };
    let e = e.to_lowercase();
    expect.iter().all(|x| e.contains(&x.to_lowercase()))
}

/// What the agent runs while refusals come in.
struct Steady {
    sha: String,
    sequence: u64,
    pid: u32,
    since_ms: u64,
}

/// Checks every heartbeat in `hbs` against the steady state: same bundle, sequence, start time
/// and worker process, no restart.
fn check_heartbeats(hbs: &[Heartbeat], s: &Steady, case: &str, agent: &Agent) {
    for hb in hbs {
        let ctx = || format!("{case}: heartbeat {hb:#?}{}", agent.context());
        let r = hb
            .running
            .as_ref()
            .unwrap_or_else(|| panic!("nothing running; {}", ctx()));
        assert_eq!(r.sha256, s.sha, "the running bundle changed; {}", ctx());
        assert_eq!(
            r.sequence,
            s.sequence,
            "the running sequence changed; {}",
            ctx()
        );
        assert_eq!(
            r.since_ms,
            s.since_ms,
            "the workers were restarted; {}",
            ctx()
        );
        assert_eq!(hb.workers.len(), 1, "{}", ctx());
        let w = &hb.workers[0];
        assert_eq!(
            w.pid,
            Some(s.pid),
            "the worker was replaced or stopped; {}",
            ctx()
        );
        assert_eq!(w.state, WorkerState::Running, "{}", ctx());
        assert_eq!(w.restarts, 0, "{}", ctx());
        assert_eq!(hb.status, NodeStatus::Running, "{}", ctx());
        assert_eq!(hb.rejected, None, "{}", ctx());
    }
}

/// [`check_heartbeats`] on a non-empty series, and the worker process is still alive.
fn assert_steady(hbs: &[Heartbeat], s: &Steady, case: &str, agent: &Agent) {
    assert!(
        !hbs.is_empty(),
        "{case}: no heartbeat at all{}",
        agent.context()
    );
    check_heartbeats(hbs, s, case, agent);
    assert!(
        is_live_worker(s.pid),
        "{case}: worker {} is not a live `sleep 3600` (state {:?}, cmdline {:?}){}",
        s.pid,
        proc_state(s.pid),
        cmdline(s.pid),
        agent.context()
    );
}

fn cwd_of(pid: u32) -> PathBuf {
    fs::read_link(format!("/proc/{pid}/cwd")).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_publications_never_touch_the_running_workers() {
    let started = Instant::now();
    let (key, _) = SigningKey::generate();
    let (other_key, _) = SigningKey::generate();
    let ca = new_ca("refusals CA");
    let fake = Fake::start(server_tls(&ca, &["127.0.0.1", "localhost"])).await;

    // 1. Good path: sequence 1 runs with a live worker on the unpacked bundle.
    let a = good_bundle("bundle A");
    fake.put_bundle(&a.sha256, &a.bytes);
    fake.publish(&key.sign(&manifest_for(1, &a.bytes)), 1);
    let mut agent = Agent::start(&fake, &ca.pem(), &key.verify_key().to_base64());
    let (pid, since_ms) = agent
        .wait_for("the agent to run bundle A", Duration::from_secs(15), || {
            let hb = fake.last_heartbeat()?;
            let r = hb.running.as_ref()?;
            let w = hb.workers.first()?;
            (r.sha256 == a.sha256 && r.sequence == 1 && w.state == WorkerState::Running)
                .then_some((w.pid?, r.since_ms))
        })
        .await;
    assert!(is_live_worker(pid), "worker {pid}: {:?}", cmdline(pid));
    let dir_a = agent.bundle_dir(&a.sha256);
    assert_eq!(
        fs::canonicalize(cwd_of(pid)).unwrap(),
        fs::canonicalize(&dir_a).unwrap(),
        "the worker does not run in bundle A's directory"
    );
    assert!(fs::read_to_string(dir_a.join("locustfile.py"))
        .unwrap()
        .contains("# bundle A"));
    assert_eq!(
        fs::read_to_string(dir_a.join("lib/helpers.py")).unwrap(),
        "X = 1\n"
    );

    // The same bundle republished at sequence 5: followed without a restart, and promoted to
    // last good once stable.
    fake.publish(&key.sign(&manifest_for(5, &a.bytes)), 5);
    agent
        .wait_for(
            "sequence 5 (same bundle) and bundle A as last good",
            Duration::from_secs(10),
            || {
                let hb = fake.last_heartbeat()?;
                (hb.running.as_ref()?.sequence == 5 && hb.last_good.as_deref() == Some(&a.sha256))
                    .then_some(())
            },
        )
        .await;
    let steady = Steady {
        sha: a.sha256.clone(),
        sequence: 5,
        pid,
        since_ms,
    };
    assert_steady(
        &fake.heartbeats_since(fake.heartbeat_count() - 1),
        &steady,
        "republication of the same bundle",
        &agent,
    );
    assert_eq!(
        fake.bundle_gets(&a.sha256),
        1,
        "bundle A was downloaded again"
    );

    // 2. The refusals.
    let root = agent.path().to_path_buf();
    let mut cases = Vec::new();
    let mut seq = 5;
    let mut next = || {
        seq += 1;
        seq
    };

    // A lower sequence than the running one, with another good bundle: a rollback.
    {
        let b = good_bundle("rollback B");
        let mut c = Case::signed("lower sequence", &key, &manifest_for(3, &b.bytes));
        c.expect = vec![
            "refused manifest".into(),
            "sequence 3 is lower than the running 5".into(),
        ];
        c.not_fetched.push(b.sha256.clone());
        c.bundles.push((b.sha256, b.bytes));
        cases.push(c);
    }
    // Served bytes other than the ones the manifest names (same length): sha mismatch.
    {
        let s = next();
        let b = good_bundle("sha mismatch");
        let mut served = b.bytes.clone();
        let last = served.len() - 1;
        served[last] ^= 0xff;
        let mut c = Case::signed("sha mismatch", &key, &manifest_for(s, &b.bytes));
        c.bundles.push((b.sha256, served));
        c.expect = vec![format!("sequence {s}"), "does not match".into()];
        cases.push(c);
    }
    // A good bundle under a manifest signed by another key.
    {
        let s = next();
        let b = good_bundle("other key");
        let mut c = Case::signed("bad signature", &other_key, &manifest_for(s, &b.bytes));
        c.expect = vec![
            "refused manifest".into(),
            "signature does not verify".into(),
        ];
        c.not_fetched.push(b.sha256.clone());
        c.bundles.push((b.sha256, b.bytes));
        cases.push(c);
    }
    // The manifest's size is not the bundle's.
    {
        let s = next();
        let b = good_bundle("size mismatch");
        let mut m = manifest_for(s, &b.bytes);
        m.bundle.size += 1;
        let mut c = Case::signed("size mismatch", &key, &m);
        c.bundles.push((b.sha256, b.bytes));
        c.expect = vec![
            format!("sequence {s}"),
            "bytes but the manifest says".into(),
        ];
        cases.push(c);
    }
    // A signed manifest whose locustfile escapes the bundle.
    {
        let s = next();
        let b = good_bundle("unsafe locustfile");
        let mut m = manifest_for(s, &b.bytes);
        m.locustfile = "../x.py".into();
        let mut c = Case::signed("unsafe locustfile path", &key, &m);
        c.expect = vec![
            "refused manifest".into(),
            "unsafe locustfile".into(),
            "../x.py".into(),
        ];
        c.not_fetched.push(b.sha256.clone());
        c.bundles.push((b.sha256, b.bytes));
        cases.push(c);
    }
    // An absolute path.
    {
        let target = root.join("escaped-abs");
        let name = target.display().to_string();
        let bytes = raw_tar(&[
            ("locustfile.py", tar::EntryType::Regular, LOCUSTFILE, ""),
            (&name, tar::EntryType::Regular, b"pwned\n", ""),
        ]);
        let mut c = Case::hostile_bundle("absolute path", &key, next(), bytes, "absolute path");
        c.must_not_exist.push(target);
        cases.push(c);
    }
    // A validly signed manifest altered in transit: it now names another (good) bundle.
    {
        let s = next();
        let b1 = good_bundle("tampered: signed");
        let b2 = good_bundle("tampered: substituted");
        let signed = key.sign(&manifest_for(s, &b1.bytes));
        let text = String::from_utf8(signed.bytes.clone()).unwrap();
        let tampered = text.replace(&b1.sha256, &b2.sha256);
        assert_ne!(text, tampered);
        let c = Case {
            name: "tampered manifest",
            sequence: s,
            manifest: tampered.into_bytes(),
            signature_b64: signed.signature_b64(),
            bundles: vec![(b1.sha256.clone(), b1.bytes), (b2.sha256.clone(), b2.bytes)],
            expect: vec![
                "refused manifest".into(),
                "signature does not verify".into(),
            ],
            not_fetched: vec![b1.sha256, b2.sha256],
            must_not_exist: vec![],
        };
        cases.push(c);
    }
    // `..` escaping the unpack directory (from state/bundles/<tmp>/ up to the test's root).
    {
        let bytes = raw_tar(&[
            ("locustfile.py", tar::EntryType::Regular, LOCUSTFILE, ""),
            (
                "a/../../../escaped-dotdot",
                tar::EntryType::Regular,
                b"pwned\n",
                "",
            ),
        ]);
        let mut c = Case::hostile_bundle(
            "`..` entry",
            &key,
            next(),
            bytes,
            "escapes the unpack directory",
        );
        c.must_not_exist.push(root.join("escaped-dotdot"));
        c.must_not_exist.push(root.join("state/escaped-dotdot"));
        cases.push(c);
    }
    // A symlink to a directory outside, then a file written through it.
    {
        let outside = root.display().to_string();
        let bytes = raw_tar(&[
            ("locustfile.py", tar::EntryType::Regular, LOCUSTFILE, ""),
            ("lib", tar::EntryType::Symlink, b"", &outside),
            ("lib/escaped-link", tar::EntryType::Regular, b"pwned\n", ""),
        ]);
        let mut c = Case::hostile_bundle("symlink", &key, next(), bytes, "is a link");
        c.must_not_exist.push(root.join("escaped-link"));
        cases.push(c);
    }
    // A hard link to a file outside.
    {
        let bytes = raw_tar(&[
            ("locustfile.py", tar::EntryType::Regular, LOCUSTFILE, ""),
            ("passwd", tar::EntryType::Link, b"", "/etc/passwd"),
        ]);
        cases.push(Case::hostile_bundle(
            "hard link",
            &key,
            next(),
            bytes,
            "is a link",
        ));
    }
    // Devices and FIFOs.
    for (name, ty) in [
        ("char device", tar::EntryType::Char),
        ("block device", tar::EntryType::Block),
        ("fifo", tar::EntryType::Fifo),
    ] {
        let bytes = raw_tar(&[
            ("locustfile.py", tar::EntryType::Regular, LOCUSTFILE, ""),
            ("special", ty, b"", ""),
        ]);
        cases.push(Case::hostile_bundle(
            name,
            &key,
            next(),
            bytes,
            "is a device",
        ));
    }
    // Over the unpacked cap (compresses to a few hundred bytes).
    {
        let big = vec![b'a'; MAX_UNPACKED_BYTES as usize + 1000];
        let bytes = raw_tar(&[
            ("locustfile.py", tar::EntryType::Regular, LOCUSTFILE, ""),
            ("data.csv", tar::EntryType::Regular, &big, ""),
        ]);
        assert!((bytes.len() as u64) < MAX_BUNDLE_BYTES);
        let mut c = Case::hostile_bundle(
            "over the unpacked size cap",
            &key,
            next(),
            bytes,
            "unpacked size",
        );
        c.expect.push("exceeds the cap".into());
        cases.push(c);
    }
    // A manifest declaring a bundle over the packed cap: not even downloaded.
    {
        let s = next();
        let b = good_bundle("declared oversize");
        let mut m = manifest_for(s, &b.bytes);
        m.bundle.size = MAX_BUNDLE_BYTES + 1;
        let mut c = Case::signed("declared size over the cap", &key, &m);
        c.expect = vec![format!("sequence {s}"), "over the cap".into()];
        c.not_fetched.push(b.sha256.clone());
        c.bundles.push((b.sha256, b.bytes));
        cases.push(c);
    }
    // A manifest lying about a bundle's size, and a server sending more than the cap.
    {
        let s = next();
        let huge = vec![0u8; MAX_BUNDLE_BYTES as usize + 4096];
        let mut m = manifest_for(s, &huge);
        m.bundle.size = 1000;
        let mut c = Case::signed("served body over the cap", &key, &m);
        c.expect = vec![format!("sequence {s}"), "exceeds".into()];
        c.bundles.push((m.bundle.sha256.clone(), huge));
        cases.push(c);
    }
    // A bundle without the locustfile the manifest names.
    {
        let s = next();
        let b = good_bundle("no main.py");
        let mut m = manifest_for(s, &b.bytes);
        m.locustfile = "main.py".into();
        let mut c = Case::signed("missing locustfile", &key, &m);
        c.expect = vec![format!("sequence {s}"), "main.py".into()];
        c.bundles.push((b.sha256, b.bytes));
        cases.push(c);
    }
    // Not a gzipped tar at all.
    cases.push(Case::hostile_bundle(
        "corrupt archive",
        &key,
        next(),
        b"this is not a gzipped tar archive".to_vec(),
        "not a valid gzipped tar",
    ));

    for case in &cases {
        let t = Instant::now();
        let before = fake.last_heartbeat();
        assert!(
            !case.matches(before.as_ref().and_then(|h| h.last_error.as_deref())),
            "{}: last_error already matches {:?} before publishing: the check would be vacuous",
            case.name,
            case.expect
        );
        for (sha, bytes) in &case.bundles {
            fake.put_bundle(sha, bytes);
        }
        let n = fake.heartbeat_count();
        fake.publish_raw(
            case.sequence,
            case.manifest.clone(),
            case.signature_b64.clone(),
        );
        agent
            .wait_for(
                &format!("the refusal of {} ({:?})", case.name, case.expect),
                REFUSAL_TIMEOUT,
                || {
                    // Fail at once, not at the timeout, if the workers are touched meanwhile.
                    let hbs = fake.heartbeats_since(n);
                    check_heartbeats(&hbs, &steady, case.name, &agent);
                    hbs.iter()
                        .any(|h| matches_expect(&case.expect, h.last_error.as_deref()))
                        .then_some(())
                },
            )
            .await;
        tokio::time::sleep(HOLD).await;
        assert_steady(&fake.heartbeats_since(n), &steady, case.name, &agent);
        for sha in &case.not_fetched {
            assert_eq!(
                fake.bundle_gets(sha),
                0,
                "{}: the agent downloaded bundle {sha} of a manifest it must refuse",
                case.name
            );
        }
        assert_eq!(
            agent.bundle_entries(),
            vec![a.sha256.clone()],
            "{}: the refused bundle left something under state/bundles",
            case.name
        );
        for p in &case.must_not_exist {
            assert!(
                fs::symlink_metadata(p).is_err(),
                "{}: the hostile bundle wrote {}",
                case.name,
                p.display()
            );
        }
        eprintln!(
            "refused {:<28} in {:>5} ms",
            case.name,
            (t.elapsed() - HOLD).as_millis()
        );
    }

    // 3. A newer good bundle is still taken: new sha, new worker, the old one stopped.
    let c = good_bundle("bundle C");
    let final_seq = next();
    fake.put_bundle(&c.sha256, &c.bytes);
    fake.publish(&key.sign(&manifest_for(final_seq, &c.bytes)), final_seq);
    let new_pid = agent
        .wait_for(
            "the agent to switch to bundle C",
            Duration::from_secs(15),
            || {
                let hb = fake.last_heartbeat()?;
                let r = hb.running.as_ref()?;
                let w = hb.workers.first()?;
                (r.sha256 == c.sha256 && r.sequence == final_seq && w.state == WorkerState::Running)
                    .then_some(w.pid?)
            },
        )
        .await;
    assert_ne!(new_pid, pid, "bundle C runs in the old worker");
    assert!(is_live_worker(new_pid));
    assert_eq!(
        fs::canonicalize(cwd_of(new_pid)).unwrap(),
        fs::canonicalize(agent.bundle_dir(&c.sha256)).unwrap(),
        "the new worker does not run in bundle C's directory"
    );
    agent
        .wait_for(
            "the old worker to be stopped",
            Duration::from_secs(5),
            || is_gone(pid).then_some(()),
        )
        .await;

    // 4. SIGTERM stops the agent and its workers.
    let status = agent.stop().await;
    assert!(status.success(), "agent exit: {status}{}", agent.context());
    for p in fake.worker_pids() {
        assert!(
            !is_live_worker(p),
            "worker {p} outlived the agent{}",
            agent.context()
        );
    }
    assert!(agent.log().contains("SIGTERM"), "{}", agent.log());
    eprintln!(
        "{} refusals checked in {:.1} s",
        cases.len(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_server_certificate_is_never_talked_to() {
    let (key, _) = SigningKey::generate();
    let fleet_ca = new_ca("fleet CA");
    let stranger_ca = new_ca("stranger CA");
    let good = good_bundle("never run");

    // (a) The agent pins a CA other than the one that signed the server's certificate.
    // (b) The agent pins the right CA, but the certificate is for another name.
    let server_a = Fake::start(server_tls(&fleet_ca, &["127.0.0.1", "localhost"])).await;
    let server_b = Fake::start(server_tls(&fleet_ca, &["controller.example"])).await;
    let vk = key.verify_key().to_base64();
    let mut agents = Vec::new();
    for (fake, trusted) in [(&server_a, stranger_ca.pem()), (&server_b, fleet_ca.pem())] {
        fake.put_bundle(&good.sha256, &good.bytes);
        fake.publish(&key.sign(&manifest_for(1, &good.bytes)), 1);
        agents.push(Agent::start(fake, &trusted, &vk));
    }
    for agent in &agents {
        agent
            .wait_for(
                "the agent to report a failed TLS handshake",
                Duration::from_secs(10),
                || {
                    let log = agent.log();
                    (log.contains("TLS handshake") && log.contains("failed")).then_some(())
                },
            )
            .await;
    }
    // Give it time to retry (and heartbeat, were it connected).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (agent, which) in agents.iter_mut().zip(["another CA", "another name"]) {
        let log = agent.log();
        assert!(
            log.contains("certificate"),
            "{which}: the log does not say the certificate was the problem:\n{log}"
        );
        {
            let st = agent.fake.state.lock().unwrap();
            assert!(
                st.tls_failures >= 1,
                "{which}: the server saw no failed handshake"
            );
            assert_eq!(
                st.requests, 0,
                "{which}: a request got through an untrusted TLS session"
            );
            assert!(st.heartbeats.is_empty(), "{which}: a heartbeat got through");
            assert!(st.bundle_gets.is_empty(), "{which}: a bundle was fetched");
        }
        assert!(
            agent.bundle_entries().is_empty(),
            "{which}: something was unpacked: {:?}",
            agent.bundle_entries()
        );
        let status = agent.stop().await;
        assert!(status.success(), "{which}: agent exit {status}\n{log}");
    }
}
