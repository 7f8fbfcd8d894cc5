//! The poller: long-polls `/v1/manifest` (docs/protocol.md), verifies each new manifest,
//! downloads, checks and unpacks its bundle, and hands finished [`Release`]s to the main loop.
//! Refusals never reach the workers. Failed downloads are retried with a capped, jittered
//! backoff; a refused publication uses its sequence up.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use fleet_common::bundle::{self, BundleError, Limits};
use fleet_common::client::{Client, ClientError};
use fleet_common::manifest::{self, Manifest, ManifestError, Signed, VerifyKey, SIGNATURE_HEADER};
use fleet_common::wire::{routes, Update, UpdateState};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::store::{Release, Store};

/// Reconnect delays after the controller could not be reached: doubled from
/// `RETRY_INITIAL` up to `RETRY_MAX`, each with up to 50% random jitter added so a thousand
/// agents do not reconnect in lockstep after a controller restart.
const RETRY_INITIAL: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// No data for this long ends a bundle download as stalled (it is then retried). A download
/// that keeps moving, however slowly (a thousand agents fetching a big bundle at once), has
/// no overall deadline.
const DOWNLOAD_IDLE: Duration = Duration::from_secs(15);

/// Before anything is published the controller may answer 404 at once: wait this long before
/// asking again.
const NOTHING_PUBLISHED_WAIT: Duration = Duration::from_millis(500);

/// What the poller tells the main loop.
#[derive(Debug)]
pub enum Poll {
    Release(Box<Release>),
    /// A newer publication is being retried, or was refused.
    Update(Update),
    Failed(PollError),
    /// The controller answers again (or for the first time).
    Reachable,
}

/// Why a round of the poller did not bring a release, by category.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// The controller could not be reached at all: the workers keep running.
    #[error("{0}")]
    Unreachable(ClientError),
    /// The controller was reached, but the exchange failed (TLS handshake, HTTP, body).
    #[error("{0}")]
    Exchange(ClientError),
    /// The controller answered with an HTTP status other than the protocol's.
    #[error("GET {}: HTTP {status}", routes::MANIFEST)]
    Status { status: u16 },
    /// The manifest failed its signature, format or sequence check.
    #[error("refused manifest: {0}")]
    RefusedManifest(ManifestError),
    /// The bundle a verified manifest names was refused; its sequence is used up.
    #[error("refused bundle of sequence {sequence}: {reason}")]
    RefusedBundle { sequence: u64, reason: Refusal },
}

impl PollError {
    fn from_client(e: ClientError) -> PollError {
        if e.is_unreachable() {
            PollError::Unreachable(e)
        } else {
            PollError::Exchange(e)
        }
    }
}

/// Why a bundle was refused: trying again would not help.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("bundle {sha} is {size} bytes, over the cap of {cap}")]
    TooBig { sha: String, size: u64, cap: u64 },
    #[error("{0}")]
    Download(ClientError),
    #[error("{0}")]
    Check(ManifestError),
    #[error("{0}")]
    Unpack(BundleError),
    #[error("bundle {sha} has no {locustfile}")]
    NoLocustfile { sha: String, locustfile: String },
}

/// Why a bundle download failed on the way: fetch it again after a backoff.
#[derive(Debug, thiserror::Error)]
pub enum Retry {
    /// A reset, a stall, a timeout.
    #[error("{0}")]
    Download(ClientError),
    #[error("GET {path}: HTTP {status}")]
    Status { path: String, status: u16 },
    /// Debris of an interrupted unpack could not be removed.
    #[error("{}: {source}", dir.display())]
    Debris {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// Why a publication's bundle did not become a [`Release`].
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error(transparent)]
    Transient(Retry),
    #[error(transparent)]
    Refused(Refusal),
}

/// Fetches, verifies and unpacks the bundle a verified manifest names (if not on disk yet).
/// The download is async; checking and writing it ([`install`]) runs on a blocking thread, so
/// the agent's single-threaded runtime keeps heartbeats and the main loop going meanwhile.
async fn materialise(
    client: &Client,
    cfg: &Config,
    store: &Store,
    m: Manifest,
    signed: Signed,
) -> Result<Release, FetchError> {
    use FetchError::{Refused, Transient};
    let dir = store.bundle_dir(&m.bundle.sha256);
    if dir.join(&m.locustfile).is_file() {
        return Ok(Release {
            manifest: m,
            signed,
            dir,
        });
    }
    if m.bundle.size > cfg.max_bundle_bytes {
        return Err(Refused(Refusal::TooBig {
            sha: m.bundle.sha256,
            size: m.bundle.size,
            cap: cfg.max_bundle_bytes,
        }));
    }
    let path = format!("{}/{}", routes::BUNDLES, m.bundle.sha256);
    let resp = client
        .download(&path, DOWNLOAD_IDLE, cfg.max_bundle_bytes as usize + 1)
        .await
        .map_err(|e| {
            if e.is_transient() {
                Transient(Retry::Download(e))
            } else {
                Refused(Refusal::Download(e))
            }
        })?;
    if resp.status != 200 {
        return Err(Transient(Retry::Status {
            path,
            status: resp.status,
        }));
    }
    let limits = cfg.limits();
    let (m, dir) = off_runtime(move || {
        install(&m, &resp.body, &dir, &limits)?;
        Ok((m, dir))
    })
    .await?;
    Ok(Release {
        manifest: m,
        signed,
        dir,
    })
}

/// Runs blocking file-system or CPU work (hashing, unpacking, removing directories) on tokio's
/// blocking pool, off the agent's single runtime thread. A panic there is resumed here.
pub async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Checks downloaded bundle bytes against the manifest (size, sha256), clears debris of an
/// interrupted unpack from `dir`, unpacks into it with `limits`, and checks the locustfile is
/// there. Blocking: see [`off_runtime`].
fn install(m: &Manifest, body: &[u8], dir: &Path, limits: &Limits) -> Result<(), FetchError> {
    use FetchError::{Refused, Transient};
    manifest::check_bundle(m, body).map_err(|e| Refused(Refusal::Check(e)))?;
    if dir.exists() {
        // A directory without its locustfile is debris from an interrupted unpack.
        std::fs::remove_dir_all(dir).map_err(|source| {
            Transient(Retry::Debris {
                dir: dir.to_path_buf(),
                source,
            })
        })?;
    }
    bundle::unpack(body, dir, limits).map_err(|e| Refused(Refusal::Unpack(e)))?;
    if !dir.join(&m.locustfile).is_file() {
        let _ = std::fs::remove_dir_all(dir);
        return Err(Refused(Refusal::NoLocustfile {
            sha: m.bundle.sha256.clone(),
            locustfile: m.locustfile.clone(),
        }));
    }
    Ok(())
}

/// Whether a manifest whose signature verified is one to fetch: it must name this agent's fleet
/// (when one is configured) and not go below the sequence `floor`; the floor's own sequence is
/// already done (`false`).
fn is_new(m: &Manifest, fleet: Option<&str>, floor: Option<u64>) -> Result<bool, ManifestError> {
    manifest::check_fleet(m, fleet)?;
    manifest::check_sequence(m, floor)?;
    Ok(Some(m.sequence) != floor)
}

/// Capped exponential backoff with jitter for the poller's retries.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: RETRY_INITIAL,
        }
    }

    /// The wait before the next try, given a jitter fraction in [0, 1): the current delay plus
    /// up to half of it again; the delay then doubles up to [`RETRY_MAX`].
    fn step(&mut self, jitter: f64) -> Duration {
        let wait = self.next + self.next.mul_f64(jitter.clamp(0.0, 1.0) * 0.5);
        self.next = (self.next * 2).min(RETRY_MAX);
        wait
    }
}

/// A number in [0, 1) from the clock's low bits: enough to spread reconnects, no RNG needed.
fn jitter_fraction() -> f64 {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (n % 1_000_003) as f64 / 1_000_003.0
}

/// The poller's record of the publications it has seen.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Seen {
    /// The highest sequence used up: run, or refused. Long-polls ask for newer ones only.
    floor: Option<u64>,
    /// A newer publication whose bundle could not be fetched yet, or was refused.
    update: Option<Update>,
}

impl Seen {
    /// Records the outcome of fetching the bundle of sequence `seq` (`sha`): a success or a
    /// refusal uses the sequence up; a transient failure leaves it to be tried again, counting
    /// the attempts for that very sequence.
    fn fetched(&mut self, seq: u64, sha: &str, outcome: Result<(), &FetchError>) {
        match outcome {
            Ok(()) => {
                self.floor = Some(seq);
                self.update = None;
            }
            Err(FetchError::Refused(e)) => {
                self.floor = Some(seq);
                self.update = Some(Update {
                    sequence: seq,
                    sha256: sha.to_string(),
                    state: UpdateState::Refused,
                    attempts: 1,
                    error: e.to_string(),
                });
            }
            Err(FetchError::Transient(e)) => {
                let attempts = match &self.update {
                    Some(u) if u.sequence == seq && u.state == UpdateState::Retrying => {
                        u.attempts.saturating_add(1)
                    }
                    _ => 1,
                };
                self.update = Some(Update {
                    sequence: seq,
                    sha256: sha.to_string(),
                    state: UpdateState::Retrying,
                    attempts,
                    error: e.to_string(),
                });
            }
        }
    }
}

/// How one round of the poller went wrong.
enum Failure {
    Poll(PollError),
    /// A bundle download failed on the way; already reported as an [`Update`].
    Retry,
}

/// The poller's state between rounds.
struct Poller {
    client: Client,
    cfg: Arc<Config>,
    store: Arc<Store>,
    vk: VerifyKey,
    seen: Seen,
    /// Whether the controller answered the last time it was asked (`None`: not asked yet).
    reachable: Option<bool>,
    tx: mpsc::UnboundedSender<Poll>,
}

/// Runs the poller forever, starting above the sequence `floor` (the last good one on disk).
/// It ends only if the main loop is gone.
pub async fn run(
    client: Client,
    cfg: Arc<Config>,
    store: Arc<Store>,
    floor: Option<u64>,
    tx: mpsc::UnboundedSender<Poll>,
) {
    let mut p = Poller {
        client,
        vk: cfg.verify_key(),
        cfg,
        store,
        seen: Seen {
            floor,
            update: None,
        },
        reachable: None,
        tx,
    };
    let mut backoff = Backoff::new();
    while !p.tx.is_closed() {
        match p.round().await {
            Ok(()) => backoff = Backoff::new(),
            Err(f) => {
                match f {
                    Failure::Poll(e @ PollError::Unreachable(_)) => {
                        // Said once per outage, not at every retry.
                        if p.reachable != Some(false) {
                            p.reachable = Some(false);
                            p.send(Poll::Failed(e));
                        }
                    }
                    Failure::Poll(e) => p.send(Poll::Failed(e)),
                    Failure::Retry => {}
                }
                tokio::time::sleep(backoff.step(jitter_fraction())).await;
            }
        }
    }
}

impl Poller {
    fn send(&self, p: Poll) {
        let _ = self.tx.send(p);
    }

    /// One long-poll, and the download of what it brought.
    async fn round(&mut self) -> Result<(), Failure> {
        // Always a long-poll: before anything is published the controller holds the request
        // until the first publication instead of answering 404 at once.
        let wait = self.cfg.poll_wait_s;
        let path = match self.seen.floor {
            Some(s) => format!("{}?after={s}&wait={wait}", routes::MANIFEST),
            None => format!("{}?wait={wait}", routes::MANIFEST),
        };
        let r = self
            .client
            .get(&path, Duration::from_secs(wait + 15), 1 << 20)
            .await
            .map_err(|e| Failure::Poll(PollError::from_client(e)))?;
        if self.reachable != Some(true) {
            self.reachable = Some(true);
            self.send(Poll::Reachable);
        }
        match r.status {
            200 => {}
            // Nothing newer within the wait.
            204 | 304 => return Ok(()),
            // Nothing published yet.
            404 => {
                tokio::time::sleep(NOTHING_PUBLISHED_WAIT).await;
                return Ok(());
            }
            status => return Err(Failure::Poll(PollError::Status { status })),
        }
        let refused = |e| Failure::Poll(PollError::RefusedManifest(e));
        let sig = r.header(SIGNATURE_HEADER).unwrap_or("").to_string();
        let m = self.vk.verify_b64(&r.body, &sig).map_err(refused)?;
        if !is_new(&m, self.cfg.fleet.as_deref(), self.seen.floor).map_err(refused)? {
            return Ok(());
        }
        let signed = Signed {
            bytes: r.body.to_vec(),
            signature: B64.decode(sig.trim()).unwrap_or_default(),
        };
        let (sequence, sha) = (m.sequence, m.bundle.sha256.clone());
        let res = materialise(&self.client, &self.cfg, &self.store, m, signed).await;
        self.seen.fetched(sequence, &sha, res.as_ref().map(|_| ()));
        let out = match res {
            Ok(rel) => {
                self.send(Poll::Release(Box::new(rel)));
                Ok(())
            }
            Err(FetchError::Refused(reason)) => {
                self.send(Poll::Failed(PollError::RefusedBundle { sequence, reason }));
                Ok(())
            }
            Err(FetchError::Transient(_)) => Err(Failure::Retry),
        };
        if let Some(u) = &self.seen.update {
            self.send(Poll::Update(u.clone()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_a_cap_with_at_most_half_again_of_jitter() {
        let mut b = Backoff::new();
        assert_eq!(b.step(0.0), RETRY_INITIAL);
        assert_eq!(b.step(0.0), RETRY_INITIAL * 2);
        let waits: Vec<Duration> = (0..10).map(|_| b.step(0.999)).collect();
        assert!(waits.iter().all(|w| *w < RETRY_MAX.mul_f64(1.5)));
        assert!(*waits.last().unwrap() >= RETRY_MAX, "{waits:?}");
        assert_eq!(Backoff::new().step(1.0), RETRY_INITIAL.mul_f64(1.5));
    }

    fn unavailable() -> FetchError {
        FetchError::Transient(Retry::Status {
            path: "/v1/bundles/aa".into(),
            status: 503,
        })
    }

    #[test]
    fn a_transient_failure_keeps_the_sequence_open_and_counts_attempts() {
        let mut s = Seen {
            floor: Some(40),
            update: None,
        };
        s.fetched(41, "aa", Err(&unavailable()));
        s.fetched(41, "aa", Err(&unavailable()));
        assert_eq!(s.floor, Some(40), "41 is asked for again");
        let u = s.update.clone().unwrap();
        assert_eq!(
            (u.sequence, u.state, u.attempts),
            (41, UpdateState::Retrying, 2)
        );
        assert_eq!(u.error, "GET /v1/bundles/aa: HTTP 503");
        // A newer publication supersedes it: attempts start again.
        s.fetched(42, "bb", Err(&unavailable()));
        assert_eq!(s.update.as_ref().unwrap().attempts, 1);
        s.fetched(42, "bb", Ok(()));
        assert_eq!(
            s,
            Seen {
                floor: Some(42),
                update: None
            }
        );
    }

    #[test]
    fn only_a_refusal_uses_up_a_sequence() {
        let mut s = Seen::default();
        let mismatch = ManifestError::ShaMismatch {
            want: "cc".into(),
            got: "dd".into(),
        };
        let why = mismatch.to_string();
        s.fetched(7, "cc", Err(&FetchError::Refused(Refusal::Check(mismatch))));
        assert_eq!(s.floor, Some(7));
        let u = s.update.unwrap();
        assert_eq!((u.sequence, u.state), (7, UpdateState::Refused));
        assert_eq!(u.error, why);
    }

    fn manifest(fleet: &str, sequence: u64) -> Manifest {
        Manifest {
            format: manifest::FORMAT,
            fleet: fleet.into(),
            sequence,
            bundle: manifest::BundleRef {
                sha256: "a".repeat(64),
                size: 10,
            },
            locustfile: "locustfile.py".into(),
            master: manifest::MasterAddr {
                host: "127.0.0.1".into(),
                port: 5557,
            },
            master_epoch: 1,
            worker_args: vec![],
            created: String::new(),
            masters: vec![],
        }
    }

    #[test]
    fn a_manifest_is_fetched_only_for_our_fleet_and_above_the_floor() {
        let ours = manifest("checkout", 8);
        assert_eq!(is_new(&ours, Some("checkout"), Some(7)), Ok(true));
        assert_eq!(is_new(&ours, Some("checkout"), Some(8)), Ok(false));
        assert_eq!(
            is_new(&ours, Some("checkout"), Some(9)),
            Err(ManifestError::Rollback { got: 8, running: 9 })
        );
        let theirs = manifest("search", 8);
        let e = is_new(&theirs, Some("checkout"), Some(7)).unwrap_err();
        assert_eq!(
            e,
            ManifestError::OtherFleet {
                got: "search".into(),
                ours: "checkout".into()
            }
        );
        // Refused as another fleet's whatever its sequence, even the one already run.
        assert!(is_new(&theirs, Some("checkout"), Some(8)).is_err());
        assert_eq!(
            PollError::RefusedManifest(e).to_string(),
            "refused manifest: manifest is for fleet \"search\" but this agent belongs to fleet \"checkout\"; check the agent's `fleet` and the controller it follows"
        );
        // No fleet configured: the name is not checked.
        assert_eq!(is_new(&theirs, None, Some(7)), Ok(true));
    }

    /// A packed spec with a locustfile, and a manifest for it.
    fn packed() -> (Vec<u8>, Manifest) {
        let spec = tempfile::tempdir().unwrap();
        std::fs::write(
            spec.path().join("locustfile.py"),
            "from locust import User\n",
        )
        .unwrap();
        let p = bundle::pack_dir(spec.path(), "locustfile.py", &Limits::default()).unwrap();
        let mut m = manifest("t", 1);
        m.bundle = manifest::BundleRef {
            sha256: p.sha256,
            size: p.bytes.len() as u64,
        };
        (p.bytes, m)
    }

    #[test]
    fn install_replaces_debris_and_leaves_nothing_of_a_refused_bundle() {
        let (bytes, m) = packed();
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join(&m.bundle.sha256);
        // Debris of an interrupted unpack: the directory without its locustfile.
        std::fs::create_dir_all(dir.join("half")).unwrap();
        install(&m, &bytes, &dir, &Limits::default()).unwrap();
        assert!(dir.join("locustfile.py").is_file());
        assert!(!dir.join("half").exists(), "debris kept");

        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 0xff;
        let other = state.path().join("other");
        let e = install(&m, &flipped, &other, &Limits::default()).unwrap_err();
        assert!(
            matches!(
                e,
                FetchError::Refused(Refusal::Check(ManifestError::ShaMismatch { .. }))
            ),
            "{e}"
        );
        assert!(!other.exists());

        let mut wrong = m.clone();
        wrong.locustfile = "main.py".into();
        let e = install(&wrong, &bytes, &other, &Limits::default()).unwrap_err();
        assert!(
            matches!(e, FetchError::Refused(Refusal::NoLocustfile { .. })),
            "{e}"
        );
        assert!(
            !other.exists(),
            "the unpacked bundle without its locustfile was kept"
        );
    }

    #[test]
    fn blocking_work_leaves_the_single_runtime_thread_free() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let ticks = Arc::new(AtomicU32::new(0));
        let t = ticks.clone();
        let got = rt.block_on(async move {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    t.fetch_add(1, Ordering::Relaxed);
                }
            });
            off_runtime(|| {
                std::thread::sleep(Duration::from_millis(400));
                7
            })
            .await
        });
        assert_eq!(got, 7);
        // Run on the runtime's thread, the sleep would have allowed no tick at all.
        let n = ticks.load(Ordering::Relaxed);
        assert!(
            n >= 10,
            "only {n} ticks of 10 ms during 400 ms of blocking work"
        );
    }

    #[test]
    fn poll_errors_say_their_category_in_the_type() {
        let refused = ClientError::Connect {
            addr: "127.0.0.1:1".into(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        };
        assert!(matches!(
            PollError::from_client(refused),
            PollError::Unreachable(_)
        ));
        let tls = ClientError::Tls {
            addr: "127.0.0.1:1".into(),
            source: std::io::ErrorKind::InvalidData.into(),
        };
        assert!(matches!(
            PollError::from_client(tls),
            PollError::Exchange(_)
        ));
        assert_eq!(
            PollError::Status { status: 500 }.to_string(),
            format!("GET {}: HTTP 500", routes::MANIFEST)
        );
        let e = PollError::RefusedBundle {
            sequence: 9,
            reason: Refusal::TooBig {
                sha: "ab".into(),
                size: 10,
                cap: 5,
            },
        };
        assert_eq!(
            e.to_string(),
            "refused bundle of sequence 9: bundle ab is 10 bytes, over the cap of 5"
        );
    }
}
