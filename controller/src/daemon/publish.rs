//! Publishing: pack the spec, sign a manifest, keep a history, and wake long-polls.
//!
//! Every publication is written to `state/` before it is served (manifest bytes, signature and
//! bundle), so a restarted controller serves the same sequence and only ever counts up from it:
//! agents refuse a sequence lower than the one they run. Beside each manifest, `N.origin`
//! records what made the version (an edit on disk, a push, a rollback...), for the history.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use base64::{engine::general_purpose::STANDARD as B64, Engine};
use bytes::Bytes;
use fleet_common::bundle::Packed;
use fleet_common::manifest::{BundleRef, Manifest, MasterAddr, ShardAddr, SigningKey, FORMAT};
use fleet_common::wire::{GateRefusal, Heartbeat, PackRules, SpecVersion, SpecView, MAX_SEQUENCE};
use tokio::sync::watch;

use crate::daemon::fanout::Fanout;

/// One published version, as served.
#[derive(Debug)]
pub struct Publication {
    pub manifest: Manifest,
    /// The exact signed bytes.
    pub bytes: Bytes,
    pub signature_b64: String,
    pub bundle: Bytes,
    /// What made this version ([`SpecVersion::origin`]).
    pub origin: String,
}

impl Publication {
    pub fn version(&self) -> SpecVersion {
        SpecVersion {
            sequence: self.manifest.sequence,
            sha256: self.manifest.bundle.sha256.clone(),
            size: self.manifest.bundle.size,
            master_epoch: self.manifest.master_epoch,
            created: self.manifest.created.clone(),
            origin: self.origin.clone(),
        }
    }
}

/// What a new publication runs against, besides the bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub master: MasterAddr,
    pub master_epoch: u64,
    pub worker_args: Vec<String>,
    /// Every master, when there are shards (the manifest's `masters`); empty for one.
    pub masters: Vec<ShardAddr>,
}

pub struct Publisher {
    fleet: String,
    locustfile: String,
    key: SigningKey,
    dir: PathBuf,
    keep: usize,
    inner: Mutex<Inner>,
    tx: watch::Sender<Option<Arc<Publication>>>,
    /// Answers served per publication of this run (`GET /api/fanout`).
    pub fanout: Fanout,
}

struct Inner {
    /// Newest last.
    history: VecDeque<Arc<Publication>>,
    last_error: Option<String>,
    refused: Option<GateRefusal>,
    gate: String,
    rules: Option<PackRules>,
    /// The highest sequence an agent reported: publications count on from above it.
    learned: u64,
}

/// The sequence a heartbeat shows this controller must count past, if any: the agent has
/// seen a sequence above the current publication (it then answers nothing at or below it),
/// or the current sequence itself but with another bundle (a publication of a controller
/// that lost its `state/`). An agent that refused the current publication has seen its
/// sequence with the same bundle: republishing the same bundle would only be refused again.
pub fn count_past(hb: &Heartbeat, current: Option<&Manifest>) -> Option<u64> {
    let seen = hb.seen_sequence?.min(MAX_SEQUENCE);
    let Some(cur) = current else {
        return Some(seen);
    };
    if seen > cur.sequence {
        return Some(seen);
    }
    if seen < cur.sequence {
        return None;
    }
    let sha_at_seen = [
        hb.running
            .as_ref()
            .filter(|r| r.sequence == seen)
            .map(|r| r.sha256.as_str()),
        hb.update
            .as_ref()
            .filter(|u| u.sequence == seen)
            .map(|u| u.sha256.as_str()),
    ]
    .into_iter()
    .flatten()
    .next();
    match sha_at_seen {
        Some(sha) if sha != cur.bundle.sha256 => Some(seen),
        _ => None,
    }
}

pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

impl Publisher {
    /// Opens the publication state in `dir`, loading what an earlier run published.
    pub fn open(
        fleet: &str,
        locustfile: &str,
        key: SigningKey,
        dir: &Path,
        keep: usize,
    ) -> Result<Publisher> {
        std::fs::create_dir_all(dir.join("manifests"))?;
        std::fs::create_dir_all(dir.join("bundles"))?;
        let vk = key.verify_key();
        let mut seqs: Vec<u64> = std::fs::read_dir(dir.join("manifests"))?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json")?.parse().ok())
            .collect();
        seqs.sort_unstable();
        let mut history = VecDeque::new();
        for seq in seqs.iter().rev().take(keep.max(1)).rev() {
            let mp = dir.join(format!("manifests/{seq}.json"));
            let bytes = std::fs::read(&mp)?;
            let sig = std::fs::read_to_string(dir.join(format!("manifests/{seq}.sig")))?;
            // Our own state, but re-verified: a key rotation or a hand edit must not be served.
            let Ok(manifest) = vk.verify_b64(&bytes, &sig) else {
                continue;
            };
            let Ok(bundle) =
                std::fs::read(dir.join(format!("bundles/{}.tar.gz", manifest.bundle.sha256)))
            else {
                continue;
            };
            if fleet_common::manifest::check_bundle(&manifest, &bundle).is_err() {
                continue;
            }
            let origin = std::fs::read_to_string(dir.join(format!("manifests/{seq}.origin")))
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            history.push_back(Arc::new(Publication {
                manifest,
                bytes: Bytes::from(bytes),
                signature_b64: sig.trim().to_string(),
                bundle: Bytes::from(bundle),
                origin,
            }));
        }
        let (tx, _) = watch::channel(history.back().cloned());
        let p = Publisher {
            fleet: fleet.to_string(),
            locustfile: locustfile.to_string(),
            key,
            dir: dir.to_path_buf(),
            keep: keep.max(1),
            inner: Mutex::new(Inner {
                history,
                last_error: None,
                refused: None,
                gate: String::new(),
                rules: None,
                learned: 0,
            }),
            tx,
            fanout: Fanout::default(),
        };
        Ok(p)
    }

    pub fn current(&self) -> Option<Arc<Publication>> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Publication>>> {
        self.tx.subscribe()
    }

    pub fn bundle(&self, sha: &str) -> Option<Bytes> {
        let inner = self.inner.lock().unwrap();
        inner
            .history
            .iter()
            .rev()
            .find(|p| p.manifest.bundle.sha256 == sha)
            .map(|p| p.bundle.clone())
    }

    /// The publication of `sequence`, while the history keeps it.
    pub fn find(&self, sequence: u64) -> Option<Arc<Publication>> {
        let inner = self.inner.lock().unwrap();
        inner
            .history
            .iter()
            .find(|p| p.manifest.sequence == sequence)
            .cloned()
    }

    pub fn set_error(&self, e: Option<String>) {
        self.inner.lock().unwrap().last_error = e;
    }

    /// Records (or, with `None`, clears) the spec the validation gate refused last.
    pub fn set_refused(&self, r: Option<GateRefusal>) {
        self.inner.lock().unwrap().refused = r;
    }

    /// How specs are checked before publication, as `/api/spec` shows it.
    pub fn set_gate(&self, gate: String) {
        self.inner.lock().unwrap().gate = gate;
    }

    /// How specs are packed, as `/api/spec` shows it (for `fleet spec push` from a laptop).
    pub fn set_rules(&self, rules: PackRules) {
        self.inner.lock().unwrap().rules = Some(rules);
    }

    pub fn view(&self) -> SpecView {
        let inner = self.inner.lock().unwrap();
        SpecView {
            current: inner.history.back().map(|p| p.version()),
            history: inner.history.iter().rev().map(|p| p.version()).collect(),
            last_error: inner.last_error.clone(),
            refused: inner.refused.clone(),
            gate: inner.gate.clone(),
            rules: inner.rules.clone(),
        }
    }

    /// The sequence only grows, even past versions that were trimmed or no longer verify.
    fn highest_sequence_on_disk(&self) -> u64 {
        let marker = std::fs::read_to_string(self.dir.join("manifests/.highest"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let files = std::fs::read_dir(self.dir.join("manifests"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()?
                            .strip_suffix(".json")?
                            .parse::<u64>()
                            .ok()
                    })
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        marker.max(files)
    }

    /// Publishes `bundle` against `target`, unless the current publication already is exactly
    /// that. `origin` says what made it ([`SpecVersion::origin`]). Returns the publication now
    /// current.
    pub fn publish(
        &self,
        bundle: &Packed,
        target: &Target,
        origin: &str,
    ) -> Result<Arc<Publication>> {
        let bundle_bytes = Bytes::from(bundle.bytes.clone());
        self.publish_inner(&bundle.sha256, bundle_bytes, target, false, origin)
    }

    /// Republishes the current bundle against a new target (a restarted master).
    pub fn retarget(&self, target: &Target) -> Result<Option<Arc<Publication>>> {
        let Some(cur) = self.current() else {
            return Ok(None);
        };
        self.publish_inner(
            &cur.manifest.bundle.sha256.clone(),
            cur.bundle.clone(),
            target,
            false,
            "master restart",
        )
        .map(Some)
    }

    /// Counts on from above `seen`, a sequence an agent has seen ([`count_past`]): the current
    /// publication, if it is not above it already, is published again above it, so that agent
    /// takes it. Returns the new publication, if there is one.
    pub fn learn(&self, seen: u64) -> Result<Option<Arc<Publication>>> {
        let seen = seen.min(MAX_SEQUENCE);
        let cur = {
            let mut inner = self.inner.lock().unwrap();
            if seen <= inner.learned {
                return Ok(None);
            }
            inner.learned = seen;
            match inner.history.back() {
                Some(cur) if cur.manifest.sequence <= seen => cur.clone(),
                _ => return Ok(None),
            }
        };
        let target = Target {
            master: cur.manifest.master.clone(),
            master_epoch: cur.manifest.master_epoch,
            worker_args: cur.manifest.worker_args.clone(),
            masters: cur.manifest.masters.clone(),
        };
        self.publish_inner(
            &cur.manifest.bundle.sha256,
            cur.bundle.clone(),
            &target,
            true,
            &format!("count past {seen}"),
        )
        .map(Some)
    }

    /// Publishes unless the current publication is exactly this one (`again` publishes anyway,
    /// with a new sequence).
    fn publish_inner(
        &self,
        sha: &str,
        bundle: Bytes,
        target: &Target,
        again: bool,
        origin: &str,
    ) -> Result<Arc<Publication>> {
        let mut inner = self.inner.lock().unwrap();
        if let Some(cur) = inner.history.back() {
            let m = &cur.manifest;
            if !again
                && m.bundle.sha256 == sha
                && m.master == target.master
                && m.master_epoch == target.master_epoch
                && m.worker_args == target.worker_args
                && m.masters == target.masters
            {
                return Ok(cur.clone());
            }
        }
        let last = inner
            .history
            .back()
            .map(|p| p.manifest.sequence)
            .unwrap_or(0);
        let sequence = last.max(inner.learned).max(self.highest_sequence_on_disk()) + 1;
        let manifest = Manifest {
            format: FORMAT,
            fleet: self.fleet.clone(),
            sequence,
            bundle: BundleRef {
                sha256: sha.to_string(),
                size: bundle.len() as u64,
            },
            locustfile: self.locustfile.clone(),
            master: target.master.clone(),
            master_epoch: target.master_epoch,
            worker_args: target.worker_args.clone(),
            created: rfc3339_now(),
            masters: target.masters.clone(),
        };
        let signed = self.key.sign(&manifest);
        let bpath = self.dir.join(format!("bundles/{sha}.tar.gz"));
        if !bpath.exists() {
            write_atomic(&bpath, &bundle)?;
        }
        write_atomic(
            &self.dir.join(format!("manifests/{sequence}.sig")),
            signed.signature_b64().as_bytes(),
        )?;
        write_atomic(
            &self.dir.join(format!("manifests/{sequence}.origin")),
            origin.as_bytes(),
        )?;
        // The manifest last: a manifest on disk always has its signature and bundle beside it.
        write_atomic(
            &self.dir.join(format!("manifests/{sequence}.json")),
            &signed.bytes,
        )?;
        let publication = Arc::new(Publication {
            manifest,
            bytes: Bytes::from(signed.bytes),
            signature_b64: B64.encode(&signed.signature),
            bundle,
            origin: origin.to_string(),
        });
        inner.history.push_back(publication.clone());
        // A publication answers the last refusal: what runs now is what the gate let through.
        inner.refused = None;
        self.trim(&mut inner.history);
        // The highest sequence must survive trimming: keep a marker of it.
        write_atomic(
            &self.dir.join("manifests/.highest"),
            sequence.to_string().as_bytes(),
        )?;
        drop(inner);
        self.fanout.published(sequence, sha);
        self.tx.send_replace(Some(publication.clone()));
        Ok(publication)
    }

    /// Keeps the last `keep` publications: older manifests and signatures are deleted, and a
    /// bundle once no kept publication names it.
    fn trim(&self, history: &mut VecDeque<Arc<Publication>>) {
        while history.len() > self.keep {
            let Some(old) = history.pop_front() else {
                return;
            };
            let seq = old.manifest.sequence;
            let _ = std::fs::remove_file(self.dir.join(format!("manifests/{seq}.json")));
            let _ = std::fs::remove_file(self.dir.join(format!("manifests/{seq}.sig")));
            let _ = std::fs::remove_file(self.dir.join(format!("manifests/{seq}.origin")));
            let sha = &old.manifest.bundle.sha256;
            if !history.iter().any(|p| &p.manifest.bundle.sha256 == sha) {
                let _ = std::fs::remove_file(self.dir.join(format!("bundles/{sha}.tar.gz")));
            }
        }
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_common::bundle::{pack_dir, Limits};

    fn target(epoch: u64) -> Target {
        Target {
            master: MasterAddr {
                host: "127.0.0.1".into(),
                port: 5557,
            },
            master_epoch: epoch,
            worker_args: vec![],
            masters: vec![],
        }
    }

    fn hb(seen: Option<u64>, running: Option<(u64, &str)>) -> Heartbeat {
        Heartbeat {
            node_id: "n".into(),
            backend: "local".into(),
            agent_version: "0".into(),
            running: running.map(|(sequence, sha)| fleet_common::wire::Running {
                sha256: sha.into(),
                sequence,
                master_epoch: 1,
                since_ms: 0,
            }),
            last_good: None,
            workers: vec![],
            status: fleet_common::wire::NodeStatus::Running,
            last_error: None,
            rejected: None,
            uptime_s: 0,
            update: None,
            seen_sequence: seen,
        }
    }

    fn manifest(sequence: u64, sha: &str) -> Manifest {
        Manifest {
            format: FORMAT,
            fleet: "t".into(),
            sequence,
            bundle: BundleRef {
                sha256: sha.into(),
                size: 1,
            },
            locustfile: "locustfile.py".into(),
            master: target(1).master,
            master_epoch: 1,
            worker_args: vec![],
            created: rfc3339_now(),
            masters: vec![],
        }
    }

    #[test]
    fn an_agent_ahead_of_the_current_publication_is_counted_past() {
        let cur = manifest(5, "aa");
        assert_eq!(
            count_past(&hb(Some(40), Some((40, "bb"))), Some(&cur)),
            Some(40)
        );
        assert_eq!(count_past(&hb(Some(4), Some((4, "bb"))), Some(&cur)), None);
        assert_eq!(
            count_past(&hb(Some(5), Some((5, "aa"))), Some(&cur)),
            None,
            "in step"
        );
        assert_eq!(
            count_past(&hb(Some(5), Some((5, "bb"))), Some(&cur)),
            Some(5),
            "the same number from another life of the controller"
        );
        let mut refused = hb(Some(5), Some((4, "cc")));
        refused.update = Some(fleet_common::wire::Update {
            sequence: 5,
            sha256: "aa".into(),
            state: fleet_common::wire::UpdateState::Refused,
            attempts: 1,
            error: "over the cap".into(),
        });
        assert_eq!(
            count_past(&refused, Some(&cur)),
            None,
            "publishing a refused bundle again would only be refused again"
        );
        assert_eq!(
            count_past(&hb(None, None), Some(&cur)),
            None,
            "an older agent"
        );
        assert_eq!(
            count_past(&hb(Some(3), None), None),
            Some(3),
            "nothing published yet"
        );
        assert_eq!(
            count_past(&hb(Some(u64::MAX), None), Some(&cur)),
            Some(MAX_SEQUENCE)
        );
    }

    #[test]
    fn a_controller_that_lost_its_state_counts_on_from_what_agents_have_seen() {
        let spec = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let (key, _) = SigningKey::generate();
        let p = Publisher::open("t", "locustfile.py", key, state.path(), 5).unwrap();
        // Learned before the first publication: it starts above.
        assert!(p.learn(7).unwrap().is_none());
        std::fs::write(spec.path().join("locustfile.py"), "a").unwrap();
        let b1 = pack_dir(spec.path(), "locustfile.py", &Limits::default()).unwrap();
        assert_eq!(
            p.publish(&b1, &target(1), "t").unwrap().manifest.sequence,
            8
        );
        // An agent has seen 40: the same bundle again, above it.
        let again = p.learn(40).unwrap().expect("published again");
        assert_eq!(again.manifest.sequence, 41);
        assert_eq!(again.manifest.bundle.sha256, b1.sha256);
        // Seen before, or below the current: nothing to do.
        assert!(p.learn(40).unwrap().is_none());
        assert!(p.learn(12).unwrap().is_none());
        std::fs::write(spec.path().join("locustfile.py"), "b").unwrap();
        let b2 = pack_dir(spec.path(), "locustfile.py", &Limits::default()).unwrap();
        assert_eq!(
            p.publish(&b2, &target(1), "t").unwrap().manifest.sequence,
            42
        );
    }

    #[test]
    fn sequence_grows_across_restarts_and_trimming() {
        let spec = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let (key, pk8) = SigningKey::generate();
        let vk = key.verify_key();
        let p = Publisher::open("t", "locustfile.py", key, state.path(), 2).unwrap();
        assert!(p.current().is_none());
        std::fs::write(spec.path().join("locustfile.py"), "a").unwrap();
        let b1 = pack_dir(spec.path(), "locustfile.py", &Limits::default()).unwrap();
        let one = p.publish(&b1, &target(1), "t").unwrap();
        assert_eq!(one.manifest.sequence, 1);
        // Same bundle and target: no new publication.
        assert_eq!(
            p.publish(&b1, &target(1), "t").unwrap().manifest.sequence,
            1
        );
        // A restarted master is a new publication of the same bundle.
        assert_eq!(
            p.retarget(&target(2)).unwrap().unwrap().manifest.sequence,
            2
        );
        std::fs::write(spec.path().join("locustfile.py"), "b").unwrap();
        let b2 = pack_dir(spec.path(), "locustfile.py", &Limits::default()).unwrap();
        let three = p.publish(&b2, &target(2), "t").unwrap();
        assert_eq!(three.manifest.sequence, 3);
        assert_eq!(
            vk.verify_b64(&three.bytes, &three.signature_b64).unwrap(),
            three.manifest
        );
        assert_eq!(p.view().history.len(), 2, "history trimmed to 2");
        assert!(
            p.bundle(&b1.sha256).is_some(),
            "seq 2 still uses the first bundle"
        );
        drop(p);

        let again = Publisher::open(
            "t",
            "locustfile.py",
            SigningKey::from_pkcs8(&pk8).unwrap(),
            state.path(),
            2,
        )
        .unwrap();
        assert_eq!(again.current().unwrap().manifest.sequence, 3);
        assert_eq!(again.current().unwrap().bytes, three.bytes);
        let origins: Vec<String> = again.view().history.into_iter().map(|v| v.origin).collect();
        assert_eq!(
            origins,
            vec!["t".to_string(), "master restart".to_string()],
            "origins are kept beside the manifests"
        );
        std::fs::write(spec.path().join("locustfile.py"), "c").unwrap();
        let b3 = pack_dir(spec.path(), "locustfile.py", &Limits::default()).unwrap();
        assert_eq!(
            again
                .publish(&b3, &target(2), "t")
                .unwrap()
                .manifest
                .sequence,
            4
        );
        assert!(
            again.bundle(&b1.sha256).is_none(),
            "trimmed bundles are gone"
        );
    }
}
