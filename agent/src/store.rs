//! The agent's state on disk (`state_dir`, docs/agent-config.md): unpacked bundles under
//! `bundles/<sha256>/` and the last good manifest, with its signature, in `last_good.json`.
//! The manifest is verified again on every load, so a tampered file is refused, not trusted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use fleet_common::manifest::{Manifest, ManifestError, Signed, VerifyKey};
use serde::{Deserialize, Serialize};

/// Unpacked bundles younger than this are never garbage-collected.
const GC_MIN_AGE: Duration = Duration::from_secs(120);

/// A verified manifest whose bundle is unpacked on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub manifest: Manifest,
    pub signed: Signed,
    pub dir: PathBuf,
}

/// Why the saved state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read last good state: {0}")]
    Read(std::io::Error),
    #[error("cannot save last good state: {0}")]
    Write(std::io::Error),
    #[error("last good state is corrupt: {0}")]
    Corrupt(String),
    #[error("last good state: {0}")]
    Unverified(ManifestError),
    #[error("last good bundle {sha} is missing from {}", dir.display())]
    MissingBundle { sha: String, dir: PathBuf },
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    manifest: String,
    signature: String,
}

/// The on-disk state: unpacked bundles and the last good manifest.
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: &Path) -> Store {
        Store {
            dir: dir.to_path_buf(),
        }
    }

    pub fn bundle_dir(&self, sha: &str) -> PathBuf {
        self.dir.join("bundles").join(sha)
    }

    fn last_good_path(&self) -> PathBuf {
        self.dir.join("last_good.json")
    }

    pub fn save_last_good(&self, r: &Release) -> Result<(), StoreError> {
        let p = Persisted {
            manifest: B64.encode(&r.signed.bytes),
            signature: r.signed.signature_b64(),
        };
        let tmp = self.dir.join("last_good.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&p).expect("serialises"))
            .and_then(|()| std::fs::rename(tmp, self.last_good_path()))
            .map_err(StoreError::Write)
    }

    /// The last good release, re-verified: a tampered state file is refused, not trusted, and
    /// so is one of a fleet other than `fleet` (when the agent has a name configured).
    pub fn load_last_good(
        &self,
        vk: &VerifyKey,
        fleet: Option<&str>,
    ) -> Result<Option<Release>, StoreError> {
        let raw = match std::fs::read(self.last_good_path()) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::Read(e)),
        };
        let corrupt = |e: &dyn std::fmt::Display| StoreError::Corrupt(e.to_string());
        let p: Persisted = serde_json::from_slice(&raw).map_err(|e| corrupt(&e))?;
        let bytes = B64.decode(&p.manifest).map_err(|e| corrupt(&e))?;
        let m = vk
            .verify_b64(&bytes, &p.signature)
            .map_err(StoreError::Unverified)?;
        fleet_common::manifest::check_fleet(&m, fleet).map_err(StoreError::Unverified)?;
        let dir = self.bundle_dir(&m.bundle.sha256);
        if !dir.join(&m.locustfile).is_file() {
            return Err(StoreError::MissingBundle {
                sha: m.bundle.sha256,
                dir,
            });
        }
        let signature = B64.decode(&p.signature).map_err(|e| corrupt(&e))?;
        Ok(Some(Release {
            manifest: m,
            signed: Signed { bytes, signature },
            dir,
        }))
    }

    /// Removes unpacked bundles other than `keep`.
    pub fn gc(&self, keep: &[&str]) {
        let Ok(rd) = std::fs::read_dir(self.dir.join("bundles")) else {
            return;
        };
        // Young directories are spared: the poller may have just unpacked a bundle (or be
        // unpacking one into a `.unpack-*` directory) that the main loop has not taken yet.
        let young = |e: &std::fs::DirEntry| {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age < GC_MIN_AGE)
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if !keep.iter().any(|k| *k == name) && !name.starts_with('.') && !young(&e) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_common::manifest::{BundleRef, MasterAddr, SigningKey};
    use std::time::SystemTime;

    fn manifest(sha: &str) -> Manifest {
        Manifest {
            format: fleet_common::manifest::FORMAT,
            fleet: "t".into(),
            sequence: 3,
            bundle: BundleRef {
                sha256: sha.into(),
                size: 10,
            },
            locustfile: "locustfile.py".into(),
            master: MasterAddr {
                host: "127.0.0.1".into(),
                port: 5557,
            },
            master_epoch: 1,
            worker_args: vec![],
            created: "2025-01-01T00:00:00Z".into(),
            masters: vec![],
        }
    }

    /// A store with one unpacked bundle and its signed release.
    fn setup() -> (tempfile::TempDir, Store, Release, VerifyKey) {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        let sha = "a".repeat(64);
        let dir = store.bundle_dir(&sha);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("locustfile.py"), "").unwrap();
        let (key, _) = SigningKey::generate();
        let m = manifest(&sha);
        let signed = key.sign(&m);
        let rel = Release {
            manifest: m,
            signed,
            dir,
        };
        (tmp, store, rel, key.verify_key())
    }

    #[test]
    fn the_last_good_release_survives_a_restart() {
        let (_tmp, store, rel, vk) = setup();
        assert!(
            store.load_last_good(&vk, Some("t")).unwrap().is_none(),
            "nothing saved yet"
        );
        store.save_last_good(&rel).unwrap();
        let back = store.load_last_good(&vk, Some("t")).unwrap().unwrap();
        assert_eq!(back.manifest, rel.manifest);
        assert_eq!(back.signed, rel.signed);
        assert_eq!(back.dir, rel.dir);
    }

    #[test]
    fn a_state_file_signed_by_another_key_is_refused() {
        let (_tmp, store, rel, _) = setup();
        store.save_last_good(&rel).unwrap();
        let other = SigningKey::generate().0.verify_key();
        assert!(matches!(
            store.load_last_good(&other, None),
            Err(StoreError::Unverified(ManifestError::BadSignature))
        ));
        std::fs::write(store.last_good_path(), "{not json").unwrap();
        assert!(matches!(
            store.load_last_good(&other, None),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn a_last_good_manifest_of_another_fleet_is_refused() {
        let (_tmp, store, rel, vk) = setup();
        store.save_last_good(&rel).unwrap();
        assert!(matches!(
            store.load_last_good(&vk, Some("other")),
            Err(StoreError::Unverified(ManifestError::OtherFleet { .. }))
        ));
        assert!(store.load_last_good(&vk, None).unwrap().is_some());
    }

    #[test]
    fn a_last_good_manifest_without_its_bundle_is_refused() {
        let (_tmp, store, rel, vk) = setup();
        store.save_last_good(&rel).unwrap();
        std::fs::remove_dir_all(&rel.dir).unwrap();
        let e = store.load_last_good(&vk, None).unwrap_err();
        assert!(matches!(e, StoreError::MissingBundle { .. }), "{e}");
    }

    #[test]
    fn gc_keeps_the_named_young_and_hidden_bundles() {
        let (_tmp, store, rel, _) = setup();
        let old = SystemTime::now() - GC_MIN_AGE * 2;
        let mk = |name: &str, mtime: SystemTime| {
            let d = store.dir.join("bundles").join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::File::open(&d)
                .unwrap()
                .set_modified(mtime)
                .unwrap();
            d
        };
        std::fs::File::open(&rel.dir)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let stale = mk("stale", old);
        let young = mk("young", SystemTime::now());
        let hidden = mk(".unpack-1", old);
        store.gc(&[&rel.manifest.bundle.sha256]);
        assert!(rel.dir.exists(), "the kept bundle was removed");
        assert!(!stale.exists(), "an old unused bundle was kept");
        assert!(young.exists(), "a young bundle was removed");
        assert!(hidden.exists(), "an unpack in progress was removed");
    }
}
