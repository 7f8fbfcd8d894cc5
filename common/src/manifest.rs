//! The signed manifest: what the controller publishes and the agent runs.
//!
//! The controller serialises a [`Manifest`] once, signs those exact bytes with Ed25519, and
//! serves the bytes with the signature beside them (header `x-fleet-signature`, base64). The
//! agent verifies the signature over the bytes it received *before* parsing them, so nothing
//! it acts on was altered in transit or by a proxy.

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use ring::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// Current manifest format. An agent refuses formats it does not know.
pub const FORMAT: u32 = 1;

/// Header that carries the base64 Ed25519 signature of the manifest body.
pub const SIGNATURE_HEADER: &str = "x-fleet-signature";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRef {
    /// Lower-case hex sha256 of the packed bundle; also its name under `/v1/bundles/`.
    pub sha256: String,
    /// Packed size in bytes.
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterAddr {
    pub host: String,
    pub port: u16,
}

/// One master of a sharded fleet: where its workers connect, and its own epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardAddr {
    pub host: String,
    pub port: u16,
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// The fleet's name (the `fleet` tag on EC2).
    pub fleet: String,
    /// Grows by one with every publication; agents refuse a lower one than they run.
    pub sequence: u64,
    pub bundle: BundleRef,
    /// The file inside the bundle that workers pass to `locust -f`.
    pub locustfile: String,
    /// Where workers connect (`--master-host`/`--master-port`).
    pub master: MasterAddr,
    /// Grows whenever the controller restarts the Locust master. Workers of an older master
    /// never rejoin a new one (docs/locust.md), so agents restart their workers when it changes.
    pub master_epoch: u64,
    /// Extra arguments for every worker, after fleet's own.
    pub worker_args: Vec<String>,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// Every master when the controller runs more than one (shards), shard 0 first; `master`
    /// and `master_epoch` are then shard 0's, for agents that know no shards. Absent (empty)
    /// for one master, so such a manifest is byte for byte what it was before shards.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub masters: Vec<ShardAddr>,
}

impl Manifest {
    /// The master `node_id`'s workers join and its epoch: the node's rendezvous pick among
    /// `masters` ([`crate::shard::pick`]), or `master` when there are no shards.
    pub fn master_for(&self, node_id: &str) -> (MasterAddr, u64) {
        match self
            .masters
            .get(crate::shard::pick(node_id, self.masters.len()))
        {
            Some(s) => (
                MasterAddr {
                    host: s.host.clone(),
                    port: s.port,
                },
                s.epoch,
            ),
            None => (self.master.clone(), self.master_epoch),
        }
    }

    /// What agents compare to decide whether their workers must restart: same bundle, same
    /// master incarnation and the same arguments mean the running workers are already right.
    pub fn run_key(&self) -> (&str, &str, &MasterAddr, u64, &[String]) {
        (
            &self.bundle.sha256,
            &self.locustfile,
            &self.master,
            self.master_epoch,
            &self.worker_args,
        )
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest signature is not valid base64")]
    SignatureEncoding,
    #[error("manifest signature does not verify against the fleet's verify key")]
    BadSignature,
    #[error("manifest is not valid JSON: {0}")]
    Malformed(String),
    #[error("manifest format {0} is not supported (this agent knows {FORMAT})")]
    Format(u32),
    #[error("manifest names a bundle id that is not a sha256: {0:?}")]
    BadBundleId(String),
    #[error("manifest names an unsafe locustfile path: {0:?}")]
    BadLocustfile(String),
    #[error("manifest is for fleet {got:?} but this agent belongs to fleet {ours:?}; check the agent's `fleet` and the controller it follows")]
    OtherFleet { got: String, ours: String },
    #[error("manifest sequence {got} is lower than the running {running}")]
    Rollback { got: u64, running: u64 },
    #[error("bundle sha256 {got} does not match the manifest's {want}")]
    ShaMismatch { want: String, got: String },
    #[error("bundle is {got} bytes but the manifest says {want}")]
    SizeMismatch { want: u64, got: u64 },
    #[error("verify key must be 32 bytes of base64 (got {0})")]
    BadVerifyKey(String),
    #[error("signing key is not a valid Ed25519 PKCS#8 document")]
    BadSigningKey,
}

/// The controller's private signing key.
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    /// A fresh key, returned with its PKCS#8 document (what goes to disk).
    pub fn generate() -> (SigningKey, Vec<u8>) {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).expect("system RNG failed");
        let pkcs8 = doc.as_ref().to_vec();
        (
            SigningKey::from_pkcs8(&pkcs8).expect("fresh key parses"),
            pkcs8,
        )
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<SigningKey, ManifestError> {
        Ed25519KeyPair::from_pkcs8(der)
            .map(SigningKey)
            .map_err(|_| ManifestError::BadSigningKey)
    }

    pub fn verify_key(&self) -> VerifyKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.0.public_key().as_ref());
        VerifyKey(k)
    }

    /// Serialises and signs: returns the exact bytes to serve and their signature.
    pub fn sign(&self, m: &Manifest) -> Signed {
        let bytes = serde_json::to_vec(m).expect("manifest serialises");
        let signature = self.0.sign(&bytes).as_ref().to_vec();
        Signed { bytes, signature }
    }
}

/// The agents' trust anchor for bundles: a raw Ed25519 public key, base64 in configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyKey(pub [u8; 32]);

impl VerifyKey {
    pub fn from_base64(s: &str) -> Result<VerifyKey, ManifestError> {
        let raw = B64
            .decode(s.trim())
            .map_err(|_| ManifestError::BadVerifyKey("not base64".into()))?;
        let k: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| ManifestError::BadVerifyKey(format!("{} bytes", raw.len())))?;
        Ok(VerifyKey(k))
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    /// Verifies `signature` over `bytes`, then parses and checks the manifest's own fields.
    pub fn verify(&self, bytes: &[u8], signature: &[u8]) -> Result<Manifest, ManifestError> {
        UnparsedPublicKey::new(&signature::ED25519, self.0)
            .verify(bytes, signature)
            .map_err(|_| ManifestError::BadSignature)?;
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        if m.format != FORMAT {
            return Err(ManifestError::Format(m.format));
        }
        if !crate::bundle::is_sha256_hex(&m.bundle.sha256) {
            return Err(ManifestError::BadBundleId(m.bundle.sha256));
        }
        let lf = std::path::Path::new(&m.locustfile);
        if m.locustfile.is_empty()
            || !lf
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            return Err(ManifestError::BadLocustfile(m.locustfile));
        }
        Ok(m)
    }

    /// Like [`VerifyKey::verify`] with the signature as it travels (base64).
    pub fn verify_b64(&self, bytes: &[u8], signature_b64: &str) -> Result<Manifest, ManifestError> {
        let sig = B64
            .decode(signature_b64.trim())
            .map_err(|_| ManifestError::SignatureEncoding)?;
        self.verify(bytes, &sig)
    }
}

/// Signed manifest bytes as served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub bytes: Vec<u8>,
    pub signature: Vec<u8>,
}

impl Signed {
    pub fn signature_b64(&self) -> String {
        B64.encode(&self.signature)
    }
}

/// The agent's acceptance rule for a verified manifest, given the sequence it runs.
pub fn check_sequence(m: &Manifest, running: Option<u64>) -> Result<(), ManifestError> {
    match running {
        Some(r) if m.sequence < r => Err(ManifestError::Rollback {
            got: m.sequence,
            running: r,
        }),
        _ => Ok(()),
    }
}

/// The agent's acceptance rule for a verified manifest's fleet: the name must be the agent's
/// own, when it has one configured. An agent without one takes any fleet's manifest: the
/// signature alone decides (the verify key is the fleet's own).
pub fn check_fleet(m: &Manifest, ours: Option<&str>) -> Result<(), ManifestError> {
    match ours {
        Some(ours) if m.fleet != ours => Err(ManifestError::OtherFleet {
            got: m.fleet.clone(),
            ours: ours.to_string(),
        }),
        _ => Ok(()),
    }
}

/// Checks downloaded bundle bytes against the manifest.
pub fn check_bundle(m: &Manifest, bytes: &[u8]) -> Result<(), ManifestError> {
    if bytes.len() as u64 != m.bundle.size {
        return Err(ManifestError::SizeMismatch {
            want: m.bundle.size,
            got: bytes.len() as u64,
        });
    }
    let got = crate::bundle::sha256_hex(bytes);
    if got != m.bundle.sha256 {
        return Err(ManifestError::ShaMismatch {
            want: m.bundle.sha256.clone(),
            got,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(seq: u64, bundle: &[u8]) -> Manifest {
        Manifest {
            format: FORMAT,
            fleet: "t".into(),
            sequence: seq,
            bundle: BundleRef {
                sha256: crate::bundle::sha256_hex(bundle),
                size: bundle.len() as u64,
            },
            locustfile: "locustfile.py".into(),
            master: MasterAddr {
                host: "127.0.0.1".into(),
                port: 5557,
            },
            master_epoch: 1,
            worker_args: vec![],
            created: "2026-11-24T00:00:00Z".into(),
            masters: vec![],
        }
    }

    #[test]
    fn one_master_serialises_as_before_shards_and_shards_pick_by_node() {
        let one = sample(1, b"x");
        let json = String::from_utf8(serde_json::to_vec(&one).unwrap()).unwrap();
        assert!(!json.contains("masters"), "{json}");
        assert_eq!(one.master_for("any"), (one.master.clone(), 1));
        let mut three = sample(1, b"x");
        three.masters = (0..3)
            .map(|k| ShardAddr {
                host: "10.0.0.5".into(),
                port: 5557 + k,
                epoch: 10 + u64::from(k),
            })
            .collect();
        for node in ["i-1", "i-2", "i-3", "i-4", "i-5", "i-6"] {
            let k = crate::shard::pick(node, 3);
            let (addr, epoch) = three.master_for(node);
            assert_eq!(
                (addr.port, epoch),
                (5557 + k as u16, 10 + k as u64),
                "{node}"
            );
        }
        // An agent that knows no shards reads the same bytes and joins shard 0.
        #[derive(Deserialize)]
        struct Old {
            master: MasterAddr,
            master_epoch: u64,
        }
        let old: Old = serde_json::from_slice(&serde_json::to_vec(&three).unwrap()).unwrap();
        assert_eq!((old.master, old.master_epoch), (three.master.clone(), 1));
    }

    #[test]
    fn signatures_verify_and_tampering_is_refused() {
        let (key, pkcs8) = SigningKey::generate();
        let vk = key.verify_key();
        let m = sample(3, b"bundle");
        let s = key.sign(&m);
        assert_eq!(vk.verify(&s.bytes, &s.signature).unwrap(), m);
        assert_eq!(vk.verify_b64(&s.bytes, &s.signature_b64()).unwrap(), m);

        let mut tampered = s.bytes.clone();
        let i = tampered.iter().position(|b| *b == b'3').unwrap();
        tampered[i] = b'9';
        assert_eq!(
            vk.verify(&tampered, &s.signature),
            Err(ManifestError::BadSignature)
        );

        let (other, _) = SigningKey::generate();
        assert_eq!(
            other.verify_key().verify(&s.bytes, &s.signature),
            Err(ManifestError::BadSignature)
        );
        assert_eq!(
            vk.verify_b64(&s.bytes, "%%%"),
            Err(ManifestError::SignatureEncoding)
        );
        // The key survives a round trip through its PKCS#8 document and base64 form.
        let again = SigningKey::from_pkcs8(&pkcs8).unwrap();
        assert_eq!(
            again.verify_key(),
            VerifyKey::from_base64(&vk.to_base64()).unwrap()
        );
    }

    #[test]
    fn signed_but_unsafe_fields_are_refused() {
        let (key, _) = SigningKey::generate();
        let vk = key.verify_key();
        let mut m = sample(1, b"x");
        m.locustfile = "../../etc/passwd".into();
        let s = key.sign(&m);
        assert!(matches!(
            vk.verify(&s.bytes, &s.signature),
            Err(ManifestError::BadLocustfile(_))
        ));
        let mut m = sample(1, b"x");
        m.bundle.sha256 = "../x".into();
        let s = key.sign(&m);
        assert!(matches!(
            vk.verify(&s.bytes, &s.signature),
            Err(ManifestError::BadBundleId(_))
        ));
        let mut m = sample(1, b"x");
        m.format = 99;
        let s = key.sign(&m);
        assert_eq!(
            vk.verify(&s.bytes, &s.signature),
            Err(ManifestError::Format(99))
        );
    }

    #[test]
    fn a_manifest_of_another_fleet_is_refused_when_the_agent_has_a_name() {
        let m = sample(1, b"x");
        assert!(check_fleet(&m, Some("t")).is_ok());
        assert!(
            check_fleet(&m, None).is_ok(),
            "no name configured: any fleet"
        );
        let e = check_fleet(&m, Some("checkout")).unwrap_err();
        assert_eq!(
            e,
            ManifestError::OtherFleet {
                got: "t".into(),
                ours: "checkout".into()
            }
        );
        // Exact comparison: no prefix, case or wildcard matching.
        assert!(check_fleet(&m, Some("T")).is_err());
        assert!(check_fleet(&m, Some("*")).is_err());
        assert!(check_fleet(&m, Some("")).is_err());
    }

    #[test]
    fn sequence_and_bundle_checks() {
        let m = sample(5, b"abc");
        assert!(check_sequence(&m, None).is_ok());
        assert!(check_sequence(&m, Some(5)).is_ok());
        assert_eq!(
            check_sequence(&m, Some(6)),
            Err(ManifestError::Rollback { got: 5, running: 6 })
        );
        assert!(check_bundle(&m, b"abc").is_ok());
        assert!(matches!(
            check_bundle(&m, b"abd"),
            Err(ManifestError::ShaMismatch { .. })
        ));
        assert!(matches!(
            check_bundle(&m, b"abcd"),
            Err(ManifestError::SizeMismatch { .. })
        ));
    }
}
