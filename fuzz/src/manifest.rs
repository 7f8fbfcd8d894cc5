//! Manifest verification and parsing (`fleet_common::manifest`), what an agent does with the
//! body and signature header of `GET /v1/manifest`.
//!
//! Input: one mode byte, then the rest. Bit 0 clear: the rest is `signature-base64 \n body`
//! as a stranger would send it, and it must never verify. Bit 0 set: the rest is a body signed
//! here with the fleet's key, so the parsing and field checks behind the signature are reached.
//!
//! Properties: a forged signature is refused; a signed body is never refused for its signature;
//! an accepted manifest has the known format, a sha256 bundle id and a locustfile that stays
//! inside the bundle, and comes back equal when the controller signs it again (as it does when it
//! republishes); every refusal is one line.

use std::path::{Component, Path};
use std::sync::OnceLock;

use fleet_common::bundle::{is_sha256_hex, sha256_hex};
use fleet_common::manifest::{
    check_bundle, check_sequence, ManifestError, SigningKey, VerifyKey, FORMAT,
};
use ring::signature::{Ed25519KeyPair, KeyPair};

struct Keys {
    pair: Ed25519KeyPair,
    signing: SigningKey,
    verify: VerifyKey,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let (signing, pkcs8) = SigningKey::generate();
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap();
        let verify = VerifyKey(pair.public_key().as_ref().try_into().unwrap());
        assert_eq!(verify, signing.verify_key());
        Keys {
            pair,
            signing,
            verify,
        }
    })
}

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let k = keys();
    if mode & 1 == 0 {
        let (sig, body) = crate::split_at_byte(rest, b'\n');
        let sig = String::from_utf8_lossy(sig);
        match k.verify.verify_b64(body, &sig) {
            Err(ManifestError::SignatureEncoding | ManifestError::BadSignature) => {}
            other => panic!("a signature not made with the key verified: {other:?}"),
        }
        return;
    }
    let sig = k.pair.sign(rest);
    let m = match k.verify.verify(rest, sig.as_ref()) {
        Ok(m) => m,
        Err(e @ (ManifestError::SignatureEncoding | ManifestError::BadSignature)) => {
            panic!("a body signed with the key was refused: {e}")
        }
        Err(e) => return crate::assert_one_line("verify", &e.to_string()),
    };
    assert_eq!(m.format, FORMAT);
    assert!(is_sha256_hex(&m.bundle.sha256), "{:?}", m.bundle.sha256);
    let lf = Path::new(&m.locustfile);
    assert!(
        lf.components().count() > 0 && lf.components().all(|c| matches!(c, Component::Normal(_))),
        "unsafe locustfile {:?}",
        m.locustfile
    );
    assert!(check_sequence(&m, Some(m.sequence)).is_ok());
    let empty_ok = m.bundle.size == 0 && m.bundle.sha256 == sha256_hex(b"");
    assert_eq!(check_bundle(&m, b"").is_ok(), empty_ok);
    let again = k.signing.sign(&m);
    assert_eq!(
        k.verify.verify(&again.bytes, &again.signature).as_ref(),
        Ok(&m),
        "the manifest does not survive being signed again"
    );
}
