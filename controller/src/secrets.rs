//! Secret files and the UI password hash.
//!
//! The UI password is stored only as PBKDF2-HMAC-SHA256 (`pbkdf2-sha256$iterations$salt$hash`).
//! Verifying it is deliberately slow, so the server caches verified credentials (`auth.rs`).

use std::io::Write;
use std::num::NonZeroU32;
use std::path::Path;

use anyhow::{bail, Context, Result};
use base64::{engine::general_purpose::STANDARD_NO_PAD as B64, Engine};
use ring::pbkdf2;
use ring::rand::{SecureRandom, SystemRandom};

const ITERATIONS: u32 = 100_000;
const PREFIX: &str = "pbkdf2-sha256";

pub fn hash_password(password: &str) -> String {
    hash_password_with(password, ITERATIONS)
}

/// [`hash_password`] with another iteration count (tests use fewer; checks read it from the
/// hash).
pub fn hash_password_with(password: &str, iterations: u32) -> String {
    let mut salt = [0u8; 16];
    SystemRandom::new()
        .fill(&mut salt)
        .expect("system RNG failed");
    let mut out = [0u8; 32];
    let iters = NonZeroU32::new(iterations.max(1)).expect("non-zero");
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iters,
        &salt,
        password.as_bytes(),
        &mut out,
    );
    format!(
        "{PREFIX}${}${}${}",
        iters,
        B64.encode(salt),
        B64.encode(out)
    )
}

/// A parsed password hash.
#[derive(Clone)]
pub struct PasswordHash {
    iterations: NonZeroU32,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

impl PasswordHash {
    pub fn parse(s: &str) -> Result<PasswordHash> {
        let parts: Vec<&str> = s.trim().split('$').collect();
        let bad = || anyhow::anyhow!("UI password hash is malformed; reset it with `fleet passwd`");
        if parts.len() != 4 || parts[0] != PREFIX {
            return Err(bad());
        }
        let iterations = parts[1]
            .parse::<u32>()
            .ok()
            .and_then(NonZeroU32::new)
            .ok_or_else(bad)?;
        let salt = B64.decode(parts[2]).map_err(|_| bad())?;
        let hash = B64.decode(parts[3]).map_err(|_| bad())?;
        if hash.len() != 32 {
            return Err(bad());
        }
        Ok(PasswordHash {
            iterations,
            salt,
            hash,
        })
    }

    /// Constant-time (ring's `verify` compares in constant time).
    pub fn verify(&self, password: &str) -> bool {
        pbkdf2::verify(
            pbkdf2::PBKDF2_HMAC_SHA256,
            self.iterations,
            &self.salt,
            password.as_bytes(),
            &self.hash,
        )
        .is_ok()
    }
}

/// Writes a secret file with mode 0600. Refuses to replace an existing one unless `force`.
pub fn write_secret(path: &Path, data: &[u8], force: bool) -> Result<()> {
    write_mode(path, data, 0o600, force)
}

/// Writes a non-secret file (0644) under the same overwrite rule.
pub fn write_public(path: &Path, data: &[u8], force: bool) -> Result<()> {
    write_mode(path, data, 0o644, force)
}

fn write_mode(path: &Path, data: &[u8], mode: u32, force: bool) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if path.exists() && !force {
        bail!("{} exists; pass --force to replace it", path.display());
    }
    if let Some(p) = path.parent() {
        if !p.exists() {
            std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
            // A directory made for a secret is private too.
            if mode == 0o600 {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))?;
            }
        }
    }
    // Write beside, then rename: a reader never sees a half-written secret, and the mode is
    // right from the first byte.
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hash_round_trip() {
        let h = hash_password("correct horse");
        let p = PasswordHash::parse(&h).unwrap();
        assert!(p.verify("correct horse"));
        assert!(!p.verify("correct hors"));
        assert!(PasswordHash::parse("plain").is_err());
        // Two hashes of one password differ (salted).
        assert_ne!(h, hash_password("correct horse"));
    }

    #[test]
    fn secrets_are_0600_and_not_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s/token");
        write_secret(&p, b"one", false).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let dir_mode = std::fs::metadata(p.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert!(write_secret(&p, b"two", false).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        write_secret(&p, b"two", true).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
    }
}
