//! A big bundle does not stall the agent: a real `fleet-agent` (single-threaded runtime) follows
//! a fake controller, runs a small bundle, and is then published a bundle near its unpacked-size
//! cap. Hashing, unpacking and removing bundle directories run on blocking threads, so the
//! agent's heartbeats keep their interval all the while it checks and writes the big bundle.
//!
//! The test watches when each heartbeat arrives, from the publication until the agent reports
//! the big bundle running, and requires no gap above [`MAX_GAP`] nor above half that window.
//! An agent that hashed and unpacked on its runtime is silent for most of the window (4.3 s of
//! 4.5 s in a debug build); the window must be at least three heartbeat intervals long, so the
//! check is never vacuous, in a debug or a release build.
//!
//! Workers are stubs (`sh -c 'exec sleep 3600'`).

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flate2::{Compression, GzBuilder};
use fleet_common::bundle::{self, Packed};
use fleet_common::manifest::{BundleRef, Manifest, MasterAddr, SigningKey, FORMAT};
use fleet_common::process::signal_group;
use fleet_common::wire::WorkerState;
use fleet_tests::fake_controller::FakeController;
use fleet_tests::pki::{new_ca, server_tls};
use fleet_tests::{procfs, spawn_agent};
use nix::sys::signal::Signal;

const TOKEN: &str = "big-unpack-test-agent-token";
const FLEET: &str = "big-unpack";
const HEARTBEAT_MS: u64 = 100;
/// The longest silence allowed between two heartbeats while the big bundle is handled: ten
/// heartbeat intervals, far above any scheduling noise of a busy machine.
const MAX_GAP: Duration = Duration::from_millis(10 * HEARTBEAT_MS);
/// The big bundle's file data: just under the agent's default unpacked-size cap (256 MiB).
const BIG_BYTES: usize = 250 << 20;

fn manifest_for(sequence: u64, p: &Packed) -> Manifest {
    Manifest {
        format: FORMAT,
        fleet: FLEET.into(),
        sequence,
        bundle: BundleRef {
            sha256: p.sha256.clone(),
            size: p.bytes.len() as u64,
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

/// A bundle of a locustfile (carrying `marker`) and `extra` bytes of CSV-like data, packed by
/// hand (streamed, no spec directory on disk) at the real packer's compression level.
fn pack(marker: &str, extra: usize) -> Packed {
    let gz = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::new(6));
    let mut b = tar::Builder::new(gz);
    let mut add = |name: &str, size: usize, data: &mut dyn Read| {
        let mut h = tar::Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(size as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    let lf = format!("# {marker}\nfrom locust import User\n");
    add("locustfile.py", lf.len(), &mut lf.as_bytes());
    if extra > 0 {
        // Repetitive but not constant, so deflate has some real work on both sides.
        let line = b"user,password,region,weight\nalice,secret,eu-west-1,3\n";
        let mut reader = Lines { line, at: 0 }.take(extra as u64);
        add("data.csv", extra, &mut reader);
    }
    let bytes = b.into_inner().unwrap().finish().unwrap();
    Packed {
        sha256: bundle::sha256_hex(&bytes),
        bytes,
    }
}

/// `line` over and over.
struct Lines {
    line: &'static [u8],
    at: usize,
}

impl Read for Lines {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        for b in buf.iter_mut() {
            *b = self.line[self.at];
            self.at = (self.at + 1) % self.line.len();
        }
        Ok(buf.len())
    }
}

fn agent_config(dir: &Path, fake: &FakeController, ca_pem: &str, vk: &str) -> String {
    let mut t = toml::Table::new();
    let mut set = |k: &str, v: toml::Value| {
        t.insert(k.to_string(), v);
    };
    set("controller", fake.url().into());
    set("ca_pem", ca_pem.into());
    set("token", TOKEN.into());
    set("verify_key", vk.into());
    set("fleet", FLEET.into());
    set("state_dir", dir.join("state").display().to_string().into());
    set("node_id", "big-unpack-node".into());
    set("imds", false.into());
    set("workers", 1.into());
    set(
        "worker_command",
        toml::Value::Array(vec!["sh".into(), "-c".into(), "exec sleep 3600".into()]),
    );
    set("heartbeat_ms", (HEARTBEAT_MS as i64).into());
    set("join_grace_ms", 200.into());
    set("stop_grace_ms", 1000.into());
    set("stable_ms", 1000.into());
    set("poll_wait_s", 2.into());
    toml::to_string(&t).unwrap()
}

/// The agent process, killed with its workers when the test ends.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    fake: Arc<FakeController>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- agent log ---\n{}",
                fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in self.fake.worker_pids() {
            if procfs::is_live(pid) && procfs::cmdline(pid) == "sleep 3600" {
                signal_group(pid, Signal::SIGKILL);
            }
        }
    }
}

/// Polls until the last heartbeat runs `sha` with a running worker, or fails after `timeout`.
async fn wait_running(fake: &FakeController, sha: &str, timeout: Duration) -> Instant {
    let t = Instant::now();
    loop {
        let ok = fake.last_heartbeat().is_some_and(|hb| {
            hb.running.as_ref().is_some_and(|r| r.sha256 == sha)
                && hb
                    .workers
                    .first()
                    .is_some_and(|w| w.state == WorkerState::Running)
        });
        if ok {
            return Instant::now();
        }
        assert!(
            t.elapsed() < timeout,
            "bundle {sha} not running after {timeout:?}; last heartbeat {:#?}",
            fake.last_heartbeat()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The longest silence in `arrivals` (sorted) over the window `[from, to]`, counting the window's
/// two edges as arrivals.
fn longest_gap(arrivals: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut points = vec![from];
    points.extend(arrivals.iter().copied().filter(|t| *t > from && *t < to));
    points.push(to);
    points
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_keep_flowing_while_a_big_bundle_is_hashed_and_unpacked() {
    let (key, _) = SigningKey::generate();
    let ca = new_ca("big unpack CA");
    let fake = FakeController::start(server_tls(&ca, &["127.0.0.1", "localhost"]), TOKEN).await;

    let small = pack("small", 0);
    fake.put_bundle(&small.sha256, &small.bytes);
    fake.publish(&key.sign(&manifest_for(1, &small)), 1);
    let dir = tempfile::Builder::new()
        .prefix("fleet-big-unpack-")
        .tempdir()
        .unwrap();
    let cfg = dir.path().join("agent.toml");
    let vk = key.verify_key().to_base64();
    fs::write(&cfg, agent_config(dir.path(), &fake, &ca.pem(), &vk)).unwrap();
    let agent = Agent {
        child: spawn_agent(&cfg, dir.path()),
        dir,
        fake: fake.clone(),
    };
    wait_running(&fake, &small.sha256, Duration::from_secs(15)).await;

    let t = Instant::now();
    let big = pack("big", BIG_BYTES);
    eprintln!(
        "packed {} MiB of data into {} KiB in {:.1} s",
        BIG_BYTES >> 20,
        big.bytes.len() >> 10,
        t.elapsed().as_secs_f64()
    );

    // Every heartbeat's arrival, seen from here every 2 ms.
    let arrivals = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let watcher = {
        let (fake, arrivals) = (fake.clone(), arrivals.clone());
        tokio::spawn(async move {
            let mut seen = fake.heartbeat_count();
            loop {
                let n = fake.heartbeat_count();
                if n > seen {
                    arrivals.lock().unwrap().push(Instant::now());
                    seen = n;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    fake.put_bundle(&big.sha256, &big.bytes);
    let published = Instant::now();
    fake.publish(&key.sign(&manifest_for(2, &big)), 2);
    let running = wait_running(&fake, &big.sha256, Duration::from_secs(120)).await;
    watcher.abort();
    let arrivals = arrivals.lock().unwrap().clone();
    let window = running - published;
    let gap = longest_gap(&arrivals, published, running);
    eprintln!(
        "big bundle running {:.2} s after its publication; {} heartbeats meanwhile, longest gap {} ms (interval {HEARTBEAT_MS} ms)",
        window.as_secs_f64(),
        arrivals.iter().filter(|t| **t > published && **t < running).count(),
        gap.as_millis()
    );
    assert_eq!(fake.bundle_gets(&big.sha256), 1);
    assert!(
        window > 3 * Duration::from_millis(HEARTBEAT_MS),
        "the big bundle was running {window:?} after its publication, too fast for the gap check \
         to mean anything: raise BIG_BYTES"
    );
    // A blocked runtime shows as one silence over most of the window (the download is quick).
    assert!(
        gap <= MAX_GAP && gap < window / 2,
        "no heartbeat for {gap:?} while the big bundle was handled (window {window:?}): the agent's \
         runtime was blocked"
    );
    let unpacked = fs::metadata(
        agent
            .dir
            .path()
            .join("state/bundles")
            .join(&big.sha256)
            .join("data.csv"),
    )
    .unwrap()
    .len();
    assert_eq!(unpacked, BIG_BYTES as u64);
}

#[test]
fn the_longest_gap_counts_the_window_edges() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let arrivals = [t0 + ms(100), t0 + ms(150), t0 + ms(700), t0 + ms(2000)];
    assert_eq!(longest_gap(&arrivals, t0, t0 + ms(1000)), ms(550));
    assert_eq!(longest_gap(&[], t0, t0 + ms(300)), ms(300));
    assert_eq!(longest_gap(&arrivals, t0, t0 + ms(120)), ms(100));
}
