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

    /// Whether `other` is the very same hash (same salt, iterations and output).
    pub fn same_as(&self, other: &PasswordHash) -> bool {
        self.iterations == other.iterations && self.salt == other.salt && self.hash == other.hash
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

/// What is wrong with the mode of one secret, `None` when nothing is: a secret file must not
/// be readable or writable by anyone but its owner, nor a directory of secrets be open to
/// them. The message names the command that fixes it.
pub fn mode_problem(path: &Path, is_dir: bool, mode: u32) -> Option<String> {
    if mode & 0o077 == 0 {
        return None;
    }
    let (what, fix) = match is_dir {
        true => ("the secrets directory", 700),
        false => ("a secret", 600),
    };
    Some(format!(
        "{what} {} is open to other users (mode {:04o}); run `chmod {fix} {}` and start again",
        path.display(),
        mode & 0o7777,
        path.display()
    ))
}

/// Checks the modes of the fleet's secrets before the controller uses them: the `secrets/`
/// directory and every file in it, and every `*.key` in `certs/`. The first problem is the
/// error. Missing files are left to the code that reads them (its message says what to run).
pub fn check_modes(secrets_dir: &Path, certs_dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut targets = vec![(secrets_dir.to_path_buf(), true)];
    for (dir, only_keys) in [(secrets_dir, false), (certs_dir, true)] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut files: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| !only_keys || p.extension().is_some_and(|x| x == "key"))
            .collect();
        files.sort();
        targets.extend(files.into_iter().map(|p| (p, false)));
    }
    for (path, is_dir) in targets {
        // Links are followed: a link's own mode says nothing, its target's counts.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if is_dir || meta.is_file() {
            if let Some(problem) = mode_problem(&path, is_dir, meta.permissions().mode()) {
                bail!(problem);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_open_to_anyone_but_its_owner_is_a_problem_that_names_the_fix() {
        let p = Path::new("/f/secrets/agent.token");
        assert_eq!(mode_problem(p, false, 0o100600), None);
        assert_eq!(mode_problem(p, false, 0o400), None);
        for open in [0o640, 0o604, 0o620, 0o644, 0o660, 0o666] {
            let m = mode_problem(p, false, open).expect("a problem");
            assert!(
                m.contains("run `chmod 600 /f/secrets/agent.token`"),
                "{open:o}: {m}"
            );
        }
        let d = Path::new("/f/secrets");
        assert_eq!(mode_problem(d, true, 0o40700), None);
        let m = mode_problem(d, true, 0o40755).unwrap();
        assert!(
            m.contains("(mode 0755)") && m.contains("chmod 700 /f/secrets"),
            "{m}"
        );
    }

    #[test]
    fn the_check_walks_secrets_and_certificate_keys_only() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let (sec, certs) = (d.path().join("secrets"), d.path().join("certs"));
        write_secret(&sec.join("agent.token"), b"t", false).unwrap();
        write_secret(&certs.join("ca.key"), b"k", false).unwrap();
        write_public(&certs.join("ca.pem"), b"c", false).unwrap();
        check_modes(&sec, &certs).unwrap();
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        mode(&certs.join("ca.key"), 0o644);
        let e = check_modes(&sec, &certs).unwrap_err().to_string();
        assert!(e.contains("ca.key") && e.contains("chmod 600"), "{e}");
        mode(&certs.join("ca.key"), 0o600);
        mode(&sec.join("agent.token"), 0o640);
        assert!(check_modes(&sec, &certs).is_err());
        mode(&sec.join("agent.token"), 0o600);
        mode(&sec, 0o750);
        assert!(check_modes(&sec, &certs).is_err());
    }

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
