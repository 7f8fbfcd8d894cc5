//! Certificates for test servers: a throwaway CA, and a rustls server config with a
//! certificate it issued. ECDSA P-256, as `fleet init` makes for real fleets.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA that can issue certificates; `.pem()` is what a client pins.
pub type Ca = CertifiedIssuer<'static, KeyPair>;

/// A self-signed CA named `name`, allowed to sign leaf certificates only.
pub fn new_ca(name: &str) -> Ca {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(p, key).expect("self-signed CA")
}

/// A rustls server config with a certificate for `names` (DNS names or IP addresses), issued
/// by `ca`.
pub fn server_tls(ca: &Ca, names: &[&str]) -> Arc<rustls::ServerConfig> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("server key");
    let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("server certificate params");
    p.distinguished_name
        .push(DnType::CommonName, "fleet test server");
    let cert = p.signed_by(&key, ca).expect("server certificate");
    // Named explicitly, so the config does not depend on a process-wide default provider.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .expect("server certificate and key");
    Arc::new(cfg)
}

/// A server certificate for `names` issued by `ca`, and its key, both PEM: what goes into a
/// fleet's `certs/server.pem` and `certs/server.key`.
pub fn server_cert_pem(ca: &Ca, names: &[&str]) -> (String, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("server key");
    let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("server certificate params");
    p.distinguished_name
        .push(DnType::CommonName, "fleet test server");
    let cert = p.signed_by(&key, ca).expect("server certificate");
    (cert.pem(), key.serialize_pem())
}
