//! Reloading the server certificate and the credentials while the controller runs, on SIGHUP
//! or `POST /api/reload` (docs/security.md, "Rotation").
//!
//! Everything is read and checked first (file modes, PEM, the key matching the certificate,
//! the password hash); only a complete, valid set replaces the running one, so a half-done
//! edit is refused with one line and the controller keeps what it had. Nothing watches the
//! files: rotating a certificate means writing two files, and a watcher would load the new
//! certificate with the old key in between. The reload is asked for once both are in place.
//!
//! The certificate is swapped under rustls through [`CertResolver`]: connections that are open
//! keep the session they have (agents are not dropped); every new handshake gets the new one.

use std::sync::Arc;

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::Fleet;
use crate::daemon::auth::{Auth, Credentials};
use crate::secrets::PasswordHash;

/// The suffix of the agent token being rotated out, beside `secrets/agent.token`.
pub const PREVIOUS_SUFFIX: &str = "previous";

/// The server certificate every new TLS handshake gets, swappable while connections run.
#[derive(Debug)]
pub struct CertResolver(ArcSwap<CertifiedKey>);

impl CertResolver {
    pub fn new(key: CertifiedKey) -> CertResolver {
        CertResolver(ArcSwap::from_pointee(key))
    }

    pub fn replace(&self, key: CertifiedKey) {
        self.0.store(Arc::new(key));
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.0.load_full()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The certificate chain and its one private key, checked to belong together.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .context("server certificate is not valid PEM")?;
    anyhow::ensure!(
        !certs.is_empty(),
        "server certificate file holds no certificate"
    );
    let mut keys: Vec<_> = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .context("server key is not valid PEM")?
        .into_iter()
        .collect();
    anyhow::ensure!(
        keys.len() == 1,
        "server key file must hold exactly one private key"
    );
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(certs, keys.remove(0), &provider)
        .context("server certificate and key do not match")
}

/// Everything a reload replaces, read and checked.
pub struct Loaded {
    pub cert: CertifiedKey,
    pub creds: Credentials,
}

/// Reads the certificate and credentials of `fleet`, checking the secrets' modes first.
pub fn load(fleet: &Fleet) -> Result<Loaded> {
    crate::secrets::check_modes(&fleet.dir.join("secrets"), &fleet.dir.join("certs"))?;
    let cert = certified_key(
        &fleet.read(&fleet.server_pem())?,
        &fleet.read(&fleet.server_key())?,
    )?;
    let previous_path = previous_agent_token(fleet);
    let previous = match std::fs::read_to_string(&previous_path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => anyhow::bail!("cannot read {}: {e}", previous_path.display()),
    };
    let creds = Credentials::new(
        &fleet.read(&fleet.agent_token())?,
        previous.as_deref(),
        &fleet.read(&fleet.operator_token())?,
        PasswordHash::parse(&fleet.read(&fleet.ui_hash())?)?,
    );
    Ok(Loaded { cert, creds })
}

/// `secrets/agent.token.previous`: the agent token being rotated out.
pub fn previous_agent_token(fleet: &Fleet) -> std::path::PathBuf {
    fleet
        .agent_token()
        .with_extension(format!("token.{PREVIOUS_SUFFIX}"))
}

/// What a reload changed, and where a rotation of the agent token stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Reloaded {
    pub certificate: bool,
    pub ui_password: bool,
    pub agent_token: bool,
    pub operator_token: bool,
    /// A previous agent token is accepted (a rotation is in progress).
    pub rotating: bool,
    /// Seconds since a request last came with the previous agent token (since the
    /// controller started), when one did.
    pub previous_token_used_s_ago: Option<u64>,
}

/// A fingerprint of what a set holds, to tell what a reload changed without keeping secrets
/// around in another form.
fn fingerprint(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// What differs between the running set and the loaded one: a pure comparison.
pub fn changes(
    old_cert: &CertifiedKey,
    old: &Credentials,
    new_cert: &CertifiedKey,
    new: &Credentials,
) -> Reloaded {
    let certs = |c: &CertifiedKey| {
        let ders: Vec<&[u8]> = c.cert.iter().map(|d| d.as_ref()).collect();
        fingerprint(&ders)
    };
    Reloaded {
        certificate: certs(old_cert) != certs(new_cert),
        ui_password: !old.ui.same_as(&new.ui),
        agent_token: old.agent_token != new.agent_token,
        operator_token: old.operator_token != new.operator_token,
        rotating: new.previous_agent_token.is_some(),
        previous_token_used_s_ago: None,
    }
}

/// Carries a reload out: loads, then swaps the certificate and the credentials.
pub struct Reloader {
    pub fleet: Fleet,
    pub certs: Arc<CertResolver>,
    pub auth: Arc<Auth>,
}

impl Reloader {
    pub fn reload(&self) -> Result<Reloaded> {
        let loaded = load(&self.fleet).context(
            "reload refused, the controller keeps its current certificate and credentials",
        )?;
        let mut r = changes(
            &self.certs.current(),
            &self.auth.credentials(),
            &loaded.cert,
            &loaded.creds,
        );
        self.certs.replace(loaded.cert);
        self.auth.replace(loaded.creds);
        r.previous_token_used_s_ago = self.status().previous_token_used_s_ago;
        Ok(r)
    }

    /// Where things stand, without reloading.
    pub fn status(&self) -> Reloaded {
        Reloaded {
            rotating: self.auth.credentials().previous_agent_token.is_some(),
            previous_token_used_s_ago: self
                .auth
                .previous_token_used(std::time::Instant::now())
                .map(|d| d.as_secs()),
            ..Reloaded::default()
        }
    }
}

/// One line for the log.
impl std::fmt::Display for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let changed: Vec<&str> = [
            (self.certificate, "server certificate"),
            (self.ui_password, "UI password"),
            (self.agent_token, "agent token"),
            (self.operator_token, "operator token"),
        ]
        .iter()
        .filter(|(c, _)| *c)
        .map(|(_, n)| *n)
        .collect();
        match changed.is_empty() {
            true => write!(f, "reloaded: nothing changed")?,
            false => write!(f, "reloaded: new {}", changed.join(", "))?,
        }
        if self.rotating {
            write!(f, "; the previous agent token is still accepted")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pki(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn creds(agent: &str, previous: Option<&str>, pw: &str) -> Credentials {
        let h = crate::secrets::hash_password_with(pw, 1000);
        Credentials::new(agent, previous, "op", PasswordHash::parse(&h).unwrap())
    }

    #[test]
    fn a_certificate_needs_its_own_key() {
        let (a_cert, a_key) = pki("a");
        let (_, b_key) = pki("b");
        certified_key(&a_cert, &a_key).unwrap();
        let e = certified_key(&a_cert, &b_key).unwrap_err();
        assert_eq!(e.to_string(), "server certificate and key do not match");
        assert!(certified_key("", &a_key).is_err());
        assert!(certified_key(&a_cert, "").is_err());
    }

    #[test]
    fn changes_name_what_differs() {
        let (a_cert, a_key) = pki("a");
        let (b_cert, b_key) = pki("b");
        let a = certified_key(&a_cert, &a_key).unwrap();
        let b = certified_key(&b_cert, &b_key).unwrap();
        let old = creds("t1", None, "pw");
        assert_eq!(changes(&a, &old, &a, &old), Reloaded::default());
        let r = changes(&a, &old, &b, &creds("t2", Some("t1"), "pw2"));
        assert!(r.certificate && r.ui_password && r.agent_token && r.rotating);
        assert!(!r.operator_token);
        assert_eq!(
            r.to_string(),
            "reloaded: new server certificate, UI password, agent token; the previous agent \
             token is still accepted"
        );
    }

    #[test]
    fn the_resolver_hands_out_the_certificate_it_was_last_given() {
        let (a_cert, a_key) = pki("a");
        let (b_cert, b_key) = pki("b");
        let r = CertResolver::new(certified_key(&a_cert, &a_key).unwrap());
        let b = certified_key(&b_cert, &b_key).unwrap();
        let b_der = b.cert[0].clone();
        r.replace(b);
        assert_eq!(r.current().cert[0], b_der);
    }
}
