//! The laptop's names for controllers: `remotes.toml` in the user's config directory
//! (`$XDG_CONFIG_HOME/fleet/`, else `~/.config/fleet/`), written by `fleet remote`.
//!
//! Each remote holds copies of the controller's URL, the fleet CA and the operator token, so
//! the files they came from can be deleted after `fleet remote add`. The token makes the file a
//! secret: it is written 0600 (its directory 0700), and a file that others can read is refused,
//! as ssh refuses a private key that others can read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::secrets::write_secret;

pub const FILE: &str = "remotes.toml";

/// `remotes.toml`.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Remotes {
    /// The remote that commands use when none is named (`fleet remote use`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    #[serde(default)]
    pub remotes: BTreeMap<String, Remote>,
}

/// One controller, as a laptop reaches it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Remote {
    /// `https://host[:port]`, as the controller's certificate names it.
    pub url: String,
    /// The fleet CA (PEM): the only certificate the CLI trusts for this controller.
    pub ca: String,
    /// The operator token.
    pub token: String,
}

/// Where `remotes.toml` lives, from `XDG_CONFIG_HOME` or `HOME`.
pub fn path(env: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let base = match (set("XDG_CONFIG_HOME"), set("HOME")) {
        (Some(x), _) if x.is_absolute() => x,
        (_, Some(h)) => h.join(".config"),
        _ => bail!("neither XDG_CONFIG_HOME nor HOME is set, so there is no place for remotes.toml; set one of them"),
    };
    Ok(base.join("fleet").join(FILE))
}

/// A remote's name: letters, digits, `-`, `_` and `.`, as in a host name.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!("remote name {name:?}: use 1-64 letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

/// Checks what `fleet remote add` is given, before anything is written: an https URL with no
/// path, a CA that holds a certificate, a one-line token.
pub fn check_remote(r: &Remote) -> Result<()> {
    if !r.url.starts_with("https://") {
        bail!(
            "{}: the controller URL must be https:// (fleet has no plaintext listener)",
            r.url
        );
    }
    fleet_common::client::parse_base_url(&r.url).map_err(|e| anyhow!("{e}"))?;
    fleet_common::client::tls_config(&r.ca).map_err(|e| anyhow!("{e}"))?;
    if r.token.is_empty() || r.token.contains(char::is_whitespace) {
        bail!("the operator token must be one word (the content of the fleet's secrets/operator.token)");
    }
    Ok(())
}

impl Remotes {
    /// Parses `remotes.toml` and checks that its default names one of its remotes.
    pub fn parse(text: &str, path: &Path) -> Result<Remotes> {
        let r: Remotes = toml::from_str(text).map_err(|e| {
            anyhow!(
                "{}: {}; fix it or remove it and run `fleet remote add` again",
                path.display(),
                e.message().split_whitespace().collect::<Vec<_>>().join(" ")
            )
        })?;
        if let Some(d) = &r.default {
            if !r.remotes.contains_key(d) {
                bail!(
                    "{}: default = {d:?} names no remote; run `fleet remote use NAME`",
                    path.display()
                );
            }
        }
        Ok(r)
    }

    /// Reads `remotes.toml`; a missing file is no remotes. A file that others can read is
    /// refused: it holds operator tokens.
    pub fn load(path: &Path) -> Result<Remotes> {
        use std::os::unix::fs::PermissionsExt;
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Remotes::default()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "{} holds operator tokens but others can read it (mode {mode:o}); run `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Remotes::parse(&text, path)
    }

    /// Writes `remotes.toml` (0600, its directory 0700 when made).
    pub fn save(&self, path: &Path) -> Result<()> {
        write_secret(path, toml::to_string(self)?.as_bytes(), true)
    }

    /// The remote called `name`.
    pub fn get(&self, name: &str) -> Result<&Remote> {
        self.remotes.get(name).ok_or_else(|| match self.remotes.len() {
            0 => anyhow!("no remote named {name:?}: there are none yet; add it with `fleet remote add {name} URL --ca FILE --token-file FILE`"),
            _ => anyhow!(
                "no remote named {name:?} (there are: {}); `fleet remote list` shows them",
                self.remotes.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        })
    }

    /// Adds (with `replace`, replaces) a remote; the first one becomes the default. Returns
    /// whether it is the default.
    pub fn add(&mut self, name: &str, remote: Remote, replace: bool) -> Result<bool> {
        check_name(name)?;
        check_remote(&remote)?;
        if self.remotes.contains_key(name) && !replace {
            bail!("a remote named {name:?} exists; pass --force to replace it");
        }
        self.remotes.insert(name.to_string(), remote);
        if self.default.is_none() {
            self.default = Some(name.to_string());
        }
        Ok(self.default.as_deref() == Some(name))
    }

    /// Removes a remote; removing the default leaves no default.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        self.get(name)?;
        self.remotes.remove(name);
        if self.default.as_deref() == Some(name) {
            self.default = None;
        }
        Ok(())
    }

    /// Makes `name` the default.
    pub fn make_default(&mut self, name: &str) -> Result<()> {
        self.get(name)?;
        self.default = Some(name.to_string());
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A CA certificate `tls_config` accepts.
    pub(crate) fn ca() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap().pem()
    }

    pub(crate) fn remote(url: &str, ca: &str) -> Remote {
        Remote {
            url: url.into(),
            ca: ca.into(),
            token: "tok".into(),
        }
    }

    #[test]
    fn the_file_lives_in_the_users_config_directory() {
        let env = |x: &'static str, h: &'static str| {
            move |k: &str| match k {
                "XDG_CONFIG_HOME" => Some(x.to_string()),
                "HOME" => Some(h.to_string()),
                _ => None,
            }
        };
        assert_eq!(
            path(&env("/x", "/h")).unwrap(),
            Path::new("/x/fleet/remotes.toml")
        );
        // Empty or relative XDG_CONFIG_HOME is ignored, as the XDG spec says.
        assert_eq!(
            path(&env("", "/h")).unwrap(),
            Path::new("/h/.config/fleet/remotes.toml")
        );
        assert_eq!(
            path(&env("rel", "/h")).unwrap(),
            Path::new("/h/.config/fleet/remotes.toml")
        );
        let e = path(&|_: &str| None).unwrap_err().to_string();
        assert!(e.contains("set one of them"), "{e}");
    }

    #[test]
    fn add_use_remove_keep_one_default() {
        let ca = ca();
        let mut r = Remotes::default();
        assert!(r
            .add("prod", remote("https://c.example:8443", &ca), false)
            .unwrap());
        assert!(!r
            .add("stage", remote("https://s.example", &ca), false)
            .unwrap());
        let e = r
            .add("prod", remote("https://x.example", &ca), false)
            .unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        assert!(r
            .add("prod", remote("https://x.example", &ca), true)
            .unwrap());
        assert_eq!(r.get("prod").unwrap().url, "https://x.example");
        r.make_default("stage").unwrap();
        assert_eq!(r.default.as_deref(), Some("stage"));
        r.remove("stage").unwrap();
        assert_eq!(r.default, None);
        let e = r.make_default("nope").unwrap_err().to_string();
        assert!(e.contains("there are: prod"), "{e}");
    }

    #[test]
    fn bad_remotes_are_refused_before_anything_is_written() {
        let ca = ca();
        let mut r = Remotes::default();
        for (name, rem, says) in [
            ("a b", remote("https://c", &ca), "use 1-64 letters"),
            ("p", remote("http://c:80", &ca), "must be https://"),
            (
                "p",
                remote("https://c/path", &ca),
                "must look like https://host:port",
            ),
            ("p", remote("https://c", "not a pem"), "no PEM certificate"),
            (
                "p",
                Remote {
                    token: "two words".into(),
                    ..remote("https://c", &ca)
                },
                "one word",
            ),
        ] {
            let e = format!("{:#}", r.add(name, rem, false).unwrap_err());
            assert!(e.contains(says), "{name}: {e}");
        }
        assert!(r.remotes.is_empty());
    }

    #[test]
    fn the_file_round_trips_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cfg/fleet").join(FILE);
        assert_eq!(Remotes::load(&p).unwrap(), Remotes::default());
        let mut r = Remotes::default();
        r.add("prod", remote("https://c.example:8443", &ca()), false)
            .unwrap();
        r.save(&p).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(p.parent().unwrap()), 0o700);
        assert_eq!(Remotes::load(&p).unwrap(), r);

        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Remotes::load(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn a_default_that_names_nothing_or_a_typo_is_refused() {
        let p = Path::new("remotes.toml");
        let e = Remotes::parse("default = \"x\"\n", p).unwrap_err();
        assert!(e.to_string().contains("fleet remote use NAME"), "{e}");
        let e = Remotes::parse(
            "[remotes.a]\nurl = \"https://a\"\nca = \"\"\ntokn = \"\"\n",
            p,
        )
        .unwrap_err();
        assert!(e.to_string().contains("tokn"), "{e}");
    }
}
