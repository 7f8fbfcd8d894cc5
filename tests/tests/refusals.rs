//! Refusals, end to end: a real `fleet-agent` follows a fake controller (a TLS server inside
//! this test whose publications the test swaps at will) and must refuse every broken or hostile
//! publication that docs/protocol.md lists ("What the agent checks, in order" and "The bundle")
//! — bad signature, another fleet's manifest, sha or size mismatch, a lower sequence, absolute or escaping paths, links,
//! devices, anything over a size cap, an unsafe locustfile path — without ever stopping or
//! restarting the worker it already runs. A newer good bundle afterwards is still taken, so no
//! refusal wedges the agent.
//!
//! The refusals are one table, [`refusals`]: what each publishes and what the agent must say.
//! One loop publishes them in turn and checks each the same way.
//!
//! A second test checks the other end of the trust chain: an agent that does not trust the
//! server's certificate (another CA, or a certificate for another name) never talks to it.
//!
//! Workers are stubs (`sh -c 'exec sleep 3600'`); their PIDs come from the heartbeats.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_common::bundle::{self, Limits, Packed};
use fleet_common::manifest::{BundleRef, Manifest, MasterAddr, SigningKey, FORMAT};
use fleet_common::process::signal_group;
use fleet_common::wire::{Heartbeat, NodeStatus, WorkerState};
use fleet_tests::fake_controller::FakeController;
use fleet_tests::pki::{new_ca, server_tls};
use fleet_tests::{procfs, spawn_agent};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tar::EntryType;

const TOKEN: &str = "refusals-test-agent-token";
/// The agent's fleet, and the one honest manifests name.
const FLEET: &str = "refusals";
/// The agent's caps in these tests: small, so oversize bundles stay cheap to build and serve.
const MAX_BUNDLE_BYTES: u64 = 256 << 10;
const MAX_UNPACKED_BYTES: u64 = 64 << 10;
/// How long a refusal gets to show up in a heartbeat. Manifest-level refusals make the agent
/// back off (up to 5 s plus jitter) before its next poll, so this is generous.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the running worker is watched after a refusal was reported.
const HOLD: Duration = Duration::from_millis(800);

// ---------------------------------------------------------------------------------------------
// The refusal cases
// ---------------------------------------------------------------------------------------------

/// Every refusal, in the order published. `root` is the agent's directory (its state is in
/// `root/state`), which hostile bundles try to write into.
fn refusals(root: &Path) -> Vec<Refusal> {
    use Content::{Good, Hostile, Raw};
    use Publish::*;
    use Stage::*;
    let root = root.display().to_string();
    vec![
        Refusal {
            name: "lower sequence",
            bundle: Good("rollback B"),
            publish: AtSequence(3),
            refused: Manifest,
            says: &["sequence 3 is lower than the running 5"],
            must_not_exist: &[],
        },
        Refusal {
            name: "sha mismatch",
            bundle: Good("sha mismatch"),
            publish: LastByteFlipped,
            refused: Bundle,
            says: &["does not match"],
            must_not_exist: &[],
        },
        Refusal {
            name: "bad signature",
            bundle: Good("other key"),
            publish: SignedByAnotherKey,
            refused: Manifest,
            says: &["signature does not verify"],
            must_not_exist: &[],
        },
        Refusal {
            name: "size mismatch",
            bundle: Good("size mismatch"),
            publish: DeclaredSize(|real| real + 1),
            refused: Bundle,
            says: &["bytes but the manifest says"],
            must_not_exist: &[],
        },
        Refusal {
            // Signed with this fleet's key, but naming another fleet.
            name: "another fleet",
            bundle: Good("another fleet"),
            publish: ForFleet("refusals-other"),
            refused: Manifest,
            says: &[
                "for fleet \"refusals-other\"",
                "belongs to fleet \"refusals\"",
            ],
            must_not_exist: &[],
        },
        Refusal {
            name: "unsafe locustfile path",
            bundle: Good("unsafe locustfile"),
            publish: Locustfile("../x.py"),
            refused: Manifest,
            says: &["unsafe locustfile", "../x.py"],
            must_not_exist: &[],
        },
        Refusal {
            name: "absolute path",
            bundle: Hostile(vec![file(&format!("{root}/escaped-abs"))]),
            publish: Honest,
            refused: Bundle,
            says: &["absolute path"],
            must_not_exist: &["escaped-abs"],
        },
        Refusal {
            name: "tampered manifest",
            bundle: Good("tampered: signed"),
            publish: AlteredToName("tampered: substituted"),
            refused: Manifest,
            says: &["signature does not verify"],
            must_not_exist: &[],
        },
        Refusal {
            // From state/bundles/<tmp>/ up to the agent's directory.
            name: "`..` entry",
            bundle: Hostile(vec![file("a/../../../escaped-dotdot")]),
            publish: Honest,
            refused: Bundle,
            says: &["escapes the unpack directory"],
            must_not_exist: &["escaped-dotdot", "state/escaped-dotdot"],
        },
        Refusal {
            // A symlink to a directory outside, then a file written through it.
            name: "symlink",
            bundle: Hostile(vec![
                link("lib", EntryType::Symlink, &root),
                file("lib/escaped-link"),
            ]),
            publish: Honest,
            refused: Bundle,
            says: &["is a link"],
            must_not_exist: &["escaped-link"],
        },
        Refusal {
            name: "hard link",
            bundle: Hostile(vec![link("passwd", EntryType::Link, "/etc/passwd")]),
            publish: Honest,
            refused: Bundle,
            says: &["is a link"],
            must_not_exist: &[],
        },
        Refusal {
            name: "char device",
            bundle: Hostile(vec![special(EntryType::Char)]),
            publish: Honest,
            refused: Bundle,
            says: &["is a device"],
            must_not_exist: &[],
        },
        Refusal {
            name: "block device",
            bundle: Hostile(vec![special(EntryType::Block)]),
            publish: Honest,
            refused: Bundle,
            says: &["is a device"],
            must_not_exist: &[],
        },
        Refusal {
            name: "fifo",
            bundle: Hostile(vec![special(EntryType::Fifo)]),
            publish: Honest,
            refused: Bundle,
            says: &["is a device"],
            must_not_exist: &[],
        },
        Refusal {
            // Compresses to a few hundred bytes: under the packed cap.
            name: "over the unpacked size cap",
            bundle: Hostile(vec![file_with(
                "data.csv",
                &vec![b'a'; MAX_UNPACKED_BYTES as usize + 1000],
            )]),
            publish: Honest,
            refused: Bundle,
            says: &["unpacked size", "exceeds the cap"],
            must_not_exist: &[],
        },
        Refusal {
            name: "declared size over the cap",
            bundle: Good("declared oversize"),
            publish: DeclaredSize(|_| MAX_BUNDLE_BYTES + 1),
            refused: BeforeDownload,
            says: &["over the cap"],
            must_not_exist: &[],
        },
        Refusal {
            // The manifest lies about the size, and the server sends more than the cap.
            name: "served body over the cap",
            bundle: Raw(vec![0; MAX_BUNDLE_BYTES as usize + 4096]),
            publish: DeclaredSize(|_| 1000),
            refused: Bundle,
            says: &["exceeds"],
            must_not_exist: &[],
        },
        Refusal {
            name: "missing locustfile",
            bundle: Good("no main.py"),
            publish: Locustfile("main.py"),
            refused: Bundle,
            says: &["main.py"],
            must_not_exist: &[],
        },
        Refusal {
            name: "corrupt archive",
            bundle: Raw(b"this is not a gzipped tar archive".to_vec()),
            publish: Honest,
            refused: Bundle,
            says: &["not a valid gzipped tar"],
            must_not_exist: &[],
        },
    ]
}

/// One refused publication: what is published, and what the agent must answer.
struct Refusal {
    name: &'static str,
    /// The bundle the manifest names.
    bundle: Content,
    /// How the publication departs from an honest one.
    publish: Publish,
    /// Where the agent refuses it, which decides how its error starts and whether the bundle
    /// may be downloaded.
    refused: Stage,
    /// Fragments the heartbeat's `last_error` must also contain (case-insensitive).
    says: &'static [&'static str],
    /// Paths under the agent's directory a hostile bundle tries to write: they must not exist
    /// afterwards.
    must_not_exist: &'static [&'static str],
}

enum Content {
    /// A good bundle packed by the real packer, its locustfile carrying this marker.
    Good(&'static str),
    /// A gzipped tar of `locustfile.py` and these entries, written header by header so that
    /// hostile entries get through.
    Hostile(Vec<Entry>),
    /// These bytes, whatever they are.
    Raw(Vec<u8>),
}

enum Publish {
    /// The next sequence, a manifest signed by the agent's key that names the bundle's sha
    /// and size, and the bundle served as it is.
    Honest,
    /// Honest, but at this sequence.
    AtSequence(u64),
    /// Honest, but signed by another key.
    SignedByAnotherKey,
    /// Honest, but the served bytes differ from the named ones in their last byte.
    LastByteFlipped,
    /// Honest, but declaring the size this gives for the real one.
    DeclaredSize(fn(u64) -> u64),
    /// Honest, but naming this locustfile.
    Locustfile(&'static str),
    /// Honest, but naming this fleet instead of the agent's.
    ForFleet(&'static str),
    /// Signed honestly, then altered in transit to name another good bundle (with this
    /// marker), which is served too.
    AlteredToName(&'static str),
}

#[derive(PartialEq)]
enum Stage {
    /// From the manifest alone: "refused manifest ...", nothing downloaded.
    Manifest,
    /// From the signed manifest, before downloading: "sequence N ...", nothing downloaded.
    BeforeDownload,
    /// While downloading or unpacking: "sequence N ...".
    Bundle,
}

/// A refusal made concrete: the bytes to publish and serve, and the error expected.
struct Publication {
    sequence: u64,
    manifest: Vec<u8>,
    signature_b64: String,
    /// Bundles served: `(id, bytes)`.
    bundles: Vec<(String, Vec<u8>)>,
    /// Fragments `last_error` must all contain.
    expect: Vec<String>,
}

impl Refusal {
    /// The publication for this refusal at `next_sequence` (unless it names its own).
    fn publication(
        &self,
        next_sequence: u64,
        key: &SigningKey,
        other_key: &SigningKey,
    ) -> Publication {
        let bytes = match &self.bundle {
            Content::Good(marker) => good_bundle(marker).bytes,
            Content::Hostile(entries) => {
                let mut all = vec![file_with("locustfile.py", LOCUSTFILE)];
                all.extend(entries.iter().cloned());
                let bytes = raw_tar(&all);
                assert!(
                    (bytes.len() as u64) < MAX_BUNDLE_BYTES,
                    "{}: the hostile bundle must be under the packed cap",
                    self.name
                );
                bytes
            }
            Content::Raw(bytes) => bytes.clone(),
        };
        let sequence = match self.publish {
            Publish::AtSequence(s) => s,
            _ => next_sequence,
        };
        let mut m = manifest_for(sequence, &bytes);
        let mut served = bytes;
        let mut signer = key;
        match &self.publish {
            Publish::Honest | Publish::AtSequence(_) | Publish::AlteredToName(_) => {}
            Publish::SignedByAnotherKey => signer = other_key,
            Publish::LastByteFlipped => *served.last_mut().expect("bytes") ^= 0xff,
            Publish::DeclaredSize(f) => m.bundle.size = f(m.bundle.size),
            Publish::Locustfile(p) => m.locustfile = p.to_string(),
            Publish::ForFleet(f) => m.fleet = f.to_string(),
        }
        let signed = signer.sign(&m);
        let mut manifest = signed.bytes.clone();
        let mut bundles = vec![(m.bundle.sha256.clone(), served)];
        if let Publish::AlteredToName(marker) = self.publish {
            let other = good_bundle(marker);
            let text = String::from_utf8(manifest).expect("manifest is UTF-8");
            let altered = text.replace(&m.bundle.sha256, &other.sha256);
            assert_ne!(text, altered, "{}: nothing was altered", self.name);
            manifest = altered.into_bytes();
            bundles.push((other.sha256, other.bytes));
        }
        let mut expect = vec![match self.refused {
            Stage::Manifest => "refused manifest".to_string(),
            Stage::BeforeDownload | Stage::Bundle => format!("sequence {sequence}"),
        }];
        expect.extend(self.says.iter().map(|s| s.to_string()));
        Publication {
            sequence,
            manifest,
            signature_b64: signed.signature_b64(),
            bundles,
            expect,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_publications_never_touch_the_running_workers() {
    let started = Instant::now();
    let (key, _) = SigningKey::generate();
    let (other_key, _) = SigningKey::generate();
    let ca = new_ca("refusals CA");
    let fake = FakeController::start(server_tls(&ca, &["127.0.0.1", "localhost"]), TOKEN).await;

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
    assert!(
        is_live_worker(pid),
        "worker {pid}: {:?}",
        procfs::cmdline(pid)
    );
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

    // 2. The refusals, each on the next sequence (the agent uses up a sequence whose bundle it
    // refused).
    let root = agent.path().to_path_buf();
    let cases = refusals(&root);
    let mut last_sequence = 5;
    for case in &cases {
        let t = Instant::now();
        let p = case.publication(last_sequence + 1, &key, &other_key);
        last_sequence = last_sequence.max(p.sequence);
        let before = fake.last_heartbeat().and_then(|h| h.last_error);
        assert!(
            !matches_expect(&p.expect, before.as_deref()),
            "{}: last_error already matches {:?} before publishing: the check would be vacuous",
            case.name,
            p.expect
        );
        for (id, bytes) in &p.bundles {
            fake.put_bundle(id, bytes);
        }
        let n = fake.heartbeat_count();
        fake.publish_raw(p.sequence, p.manifest, p.signature_b64);
        agent
            .wait_for(
                &format!("the refusal of {} ({:?})", case.name, p.expect),
                REFUSAL_TIMEOUT,
                || {
                    // Fail at once, not at the timeout, if the workers are touched meanwhile.
                    let hbs = fake.heartbeats_since(n);
                    check_heartbeats(&hbs, &steady, case.name, &agent);
                    hbs.iter()
                        .any(|h| matches_expect(&p.expect, h.last_error.as_deref()))
                        .then_some(())
                },
            )
            .await;
        tokio::time::sleep(HOLD).await;
        assert_steady(&fake.heartbeats_since(n), &steady, case.name, &agent);
        if case.refused != Stage::Bundle {
            for (id, _) in &p.bundles {
                assert_eq!(
                    fake.bundle_gets(id),
                    0,
                    "{}: the agent downloaded bundle {id} of a manifest it must refuse",
                    case.name
                );
            }
        }
        assert_eq!(
            agent.bundle_entries(),
            vec![a.sha256.clone()],
            "{}: the refused bundle left something under state/bundles",
            case.name
        );
        for p in case.must_not_exist.iter().map(|p| root.join(p)) {
            assert!(
                fs::symlink_metadata(&p).is_err(),
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
    let final_seq = last_sequence + 1;
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
            || procfs::is_gone(pid).then_some(()),
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
    let server_a =
        FakeController::start(server_tls(&fleet_ca, &["127.0.0.1", "localhost"]), TOKEN).await;
    let server_b =
        FakeController::start(server_tls(&fleet_ca, &["controller.example"]), TOKEN).await;
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
        let fake = &agent.fake;
        assert!(
            fake.tls_failures() >= 1,
            "{which}: the server saw no failed handshake"
        );
        assert_eq!(
            fake.requests(),
            0,
            "{which}: a request got through an untrusted TLS session"
        );
        assert_eq!(
            fake.heartbeat_count(),
            0,
            "{which}: a heartbeat got through"
        );
        assert_eq!(fake.all_bundle_gets(), 0, "{which}: a bundle was fetched");
        assert!(
            agent.bundle_entries().is_empty(),
            "{which}: something was unpacked: {:?}",
            agent.bundle_entries()
        );
        let status = agent.stop().await;
        assert!(status.success(), "{which}: agent exit {status}\n{log}");
    }
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

const LOCUSTFILE: &[u8] = b"from locust import User\n";

/// One header of a hand-written tar, with its raw name.
#[derive(Clone)]
struct Entry {
    name: String,
    kind: EntryType,
    data: Vec<u8>,
    link: String,
}

/// A regular file a hostile bundle tries to plant.
fn file(name: &str) -> Entry {
    file_with(name, b"pwned\n")
}

fn file_with(name: &str, data: &[u8]) -> Entry {
    Entry {
        name: name.into(),
        kind: EntryType::Regular,
        data: data.to_vec(),
        link: String::new(),
    }
}

fn link(name: &str, kind: EntryType, target: &str) -> Entry {
    Entry {
        name: name.into(),
        kind,
        data: vec![],
        link: target.into(),
    }
}

/// A device or FIFO named `special`.
fn special(kind: EntryType) -> Entry {
    link("special", kind, "")
}

/// A gzipped tar written header by header with raw names, so that hostile entries get through.
fn raw_tar(entries: &[Entry]) -> Vec<u8> {
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for e in entries {
        assert!(
            e.name.len() < 100 && e.link.len() < 100,
            "name too long: {}",
            e.name
        );
        let mut h = tar::Header::new_old();
        {
            let raw = h.as_old_mut();
            raw.name[..e.name.len()].copy_from_slice(e.name.as_bytes());
            raw.linkname[..e.link.len()].copy_from_slice(e.link.as_bytes());
        }
        h.set_entry_type(e.kind);
        h.set_mode(0o644);
        h.set_size(e.data.len() as u64);
        h.set_cksum();
        b.append(&h, e.data.as_slice()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// An honest manifest for `bytes` at `sequence`.
fn manifest_for(sequence: u64, bytes: &[u8]) -> Manifest {
    Manifest {
        format: FORMAT,
        fleet: FLEET.into(),
        sequence,
        bundle: BundleRef {
            sha256: bundle::sha256_hex(bytes),
            size: bytes.len() as u64,
        },
        locustfile: "locustfile.py".into(),
        master: MasterAddr {
            host: "127.0.0.1".into(),
            port: 5557,
        },
        master_epoch: 1,
        worker_args: vec![],
        created: "2026-01-01T00:00:00Z".into(),
        masters: vec![],
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// Whether `pid` is a live (not zombie) stub worker.
fn is_live_worker(pid: u32) -> bool {
    procfs::is_live(pid) && procfs::cmdline(pid) == "sleep 3600"
}

fn cwd_of(pid: u32) -> PathBuf {
    procfs::cwd(pid).unwrap_or_else(|| panic!("process {pid} has no readable cwd"))
}

/// A running `fleet-agent` with its own temp dir (config, state, log).
struct Agent {
    child: Option<Child>,
    dir: tempfile::TempDir,
    fake: Arc<FakeController>,
}

impl Agent {
    fn start(fake: &Arc<FakeController>, ca_pem: &str, verify_key: &str) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("fleet-refusals-")
            .tempdir()
            .unwrap();
        let mut t = toml::Table::new();
        let mut set = |k: &str, v: toml::Value| {
            t.insert(k.to_string(), v);
        };
        set("controller", fake.url().into());
        set("ca_pem", ca_pem.into());
        set("token", TOKEN.into());
        set("verify_key", verify_key.into());
        set("fleet", FLEET.into());
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
        let child = spawn_agent(&cfg, dir.path());
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
                    !procfs::is_gone(c.id()),
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
                signal_group(pid, Signal::SIGKILL);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

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
        procfs::state(s.pid),
        procfs::cmdline(s.pid),
        agent.context()
    );
}
