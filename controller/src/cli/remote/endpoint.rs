//! Which controller a command talks to, and with which CA and operator token.
//!
//! Each of the three is taken from the first place that has it (docs/remote.md):
//!
//! | | environment | remote | fleet directory |
//! |---|---|---|---|
//! | URL | `FLEET_CONTROLLER` | `url` | `controller.url` |
//! | CA | `FLEET_CA` (a file) | `ca` | `certs/ca.pem` |
//! | token | `FLEET_TOKEN`, or `FLEET_TOKEN_FILE` | `token` | `secrets/operator.token` |
//!
//! The remote is the one named by `--remote` (or `FLEET_REMOTE`); without one, the default
//! remote (`fleet remote use`), unless the fleet directory has a `fleet.toml`: a fleet
//! directory is a controller host's, and the commands run there act on its own fleet.
//! [`choose`] decides from these inputs alone; [`Endpoint::load`] reads the files it names.

use std::fmt;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};

use super::profiles::Remotes;
use crate::config::Fleet;

pub const ENV_CONTROLLER: &str = "FLEET_CONTROLLER";
pub const ENV_CA: &str = "FLEET_CA";
pub const ENV_TOKEN: &str = "FLEET_TOKEN";
pub const ENV_TOKEN_FILE: &str = "FLEET_TOKEN_FILE";

/// Where one piece of the endpoint came from (named in errors that say what to fix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Env(&'static str),
    Remote(String),
    FleetDir,
}

/// A value, or the file that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Material {
    Value(String),
    File(PathBuf),
}

/// What [`choose`] decided: each piece and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub url: String,
    pub url_from: Source,
    pub ca: Material,
    pub ca_from: Source,
    pub token: Material,
    pub token_from: Source,
}

/// What the choice is made from.
pub struct Inputs<'a> {
    /// `--remote NAME` (or `FLEET_REMOTE`: clap reads both, the flag first).
    pub remote: Option<&'a str>,
    /// The environment (a map in tests).
    pub env: &'a dyn Fn(&str) -> Option<String>,
    pub remotes: &'a Remotes,
    /// The fleet directory, when it has a `fleet.toml`.
    pub fleet: Option<&'a Fleet>,
}

/// Picks the URL, CA and token ([module docs](self) give the order).
pub fn choose(i: &Inputs<'_>) -> Result<Choice> {
    let env = |k: &'static str| (i.env)(k).filter(|v| !v.trim().is_empty());
    let remote = match (i.remote, i.fleet) {
        (Some(name), _) => Some((name, i.remotes.get(name)?)),
        (None, None) => match &i.remotes.default {
            Some(name) => Some((name.as_str(), i.remotes.get(name)?)),
            None => None,
        },
        (None, Some(_)) => None,
    };
    let from_remote = |name: &str| Source::Remote(name.to_string());

    let (url, url_from) = match (env(ENV_CONTROLLER), remote, i.fleet) {
        (Some(u), _, _) => (u.trim().to_string(), Source::Env(ENV_CONTROLLER)),
        (None, Some((n, r)), _) => (r.url.clone(), from_remote(n)),
        (None, None, Some(f)) => (f.config.controller.url.clone(), Source::FleetDir),
        (None, None, None) => bail!(
            "no controller to talk to: name one with --remote NAME (add it with `fleet remote add`), set {ENV_CONTROLLER}, {ENV_CA} and {ENV_TOKEN_FILE}, or run in a fleet directory (--dir)"
        ),
    };

    let (ca, ca_from) = match (env(ENV_CA), remote, i.fleet) {
        (Some(p), _, _) => (Material::File(p.into()), Source::Env(ENV_CA)),
        (None, Some((n, r)), _) => (Material::Value(r.ca.clone()), from_remote(n)),
        (None, None, Some(f)) => (Material::File(f.ca_pem()), Source::FleetDir),
        (None, None, None) => {
            bail!("{ENV_CONTROLLER} is set but no CA is: set {ENV_CA} to a copy of the fleet's certs/ca.pem")
        }
    };

    let (token, token_from) = match (env(ENV_TOKEN), env(ENV_TOKEN_FILE), remote, i.fleet) {
        (Some(_), Some(_), _, _) => {
            bail!("both {ENV_TOKEN} and {ENV_TOKEN_FILE} are set; unset one of them")
        }
        (Some(t), None, _, _) => (Material::Value(t), Source::Env(ENV_TOKEN)),
        (None, Some(p), _, _) => (Material::File(p.into()), Source::Env(ENV_TOKEN_FILE)),
        (None, None, Some((n, r)), _) => (Material::Value(r.token.clone()), from_remote(n)),
        (None, None, None, Some(f)) => (Material::File(f.operator_token()), Source::FleetDir),
        (None, None, None, None) => bail!(
            "{ENV_CONTROLLER} is set but no operator token is: set {ENV_TOKEN_FILE} to a copy of the fleet's secrets/operator.token"
        ),
    };

    Ok(Choice {
        url,
        url_from,
        ca,
        ca_from,
        token,
        token_from,
    })
}

/// The controller a command talks to, with what it needs to.
#[derive(Clone)]
pub struct Endpoint {
    pub url: String,
    pub ca_pem: String,
    /// Where the CA came from: a CA that is not one says where it was read.
    pub ca_from: Source,
    pub token: String,
    /// Where the token came from: a refused token says what to check.
    pub token_from: Source,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &self.url)
            .field("ca_from", &self.ca_from)
            .field("token_from", &self.token_from)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Reads the files a choice names and checks the URL.
    pub fn load(c: Choice) -> Result<Endpoint> {
        if !c.url.starts_with("https://") {
            bail!(
                "controller URL {} (from {}) must be https:// (fleet has no plaintext listener)",
                c.url,
                c.url_from
            );
        }
        fleet_common::client::parse_base_url(&c.url)
            .map_err(|e| anyhow!("{e} (from {})", c.url_from))?;
        let ca_pem = read(&c.ca, &c.ca_from, "the fleet CA")?;
        let token = read(&c.token, &c.token_from, "the operator token")?
            .trim()
            .to_string();
        if token.is_empty() {
            bail!("the operator token from {} is empty", c.token_from);
        }
        Ok(Endpoint {
            url: c.url,
            ca_pem,
            ca_from: c.ca_from,
            token,
            token_from: c.token_from,
        })
    }

    /// The fleet directory's own controller, as `fleet serve` there serves it.
    pub fn of_fleet(fleet: &Fleet) -> Result<Endpoint> {
        Endpoint::load(choose(&Inputs {
            remote: None,
            env: &|_| None,
            remotes: &Remotes::default(),
            fleet: Some(fleet),
        })?)
    }

    /// Whether this is the fleet directory's own controller.
    pub fn is_of(&self, fleet: &Fleet) -> bool {
        let hp = |u: &str| fleet_common::client::parse_base_url(u).ok();
        hp(&self.url).is_some() && hp(&self.url) == hp(&fleet.config.controller.url)
    }

    /// What to check when the controller refuses the token.
    pub fn token_hint(&self) -> String {
        match &self.token_from {
            Source::FleetDir => "check secrets/operator.token".into(),
            Source::Env(k) => format!("check {k}"),
            Source::Remote(n) => format!(
                "the token of remote {n} may be stale: `fleet remote add {n} URL --ca FILE --token-file FILE --force` copies the current one"
            ),
        }
    }
}

fn read(m: &Material, from: &Source, what: &str) -> Result<String> {
    match m {
        Material::Value(v) => Ok(v.clone()),
        Material::File(p) => std::fs::read_to_string(p)
            .with_context(|| format!("{what} (from {from}): cannot read {}", p.display())),
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Env(k) => write!(f, "{k}"),
            Source::Remote(n) => write!(f, "remote {n}"),
            Source::FleetDir => f.write_str("the fleet directory"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::profiles::tests::{ca, remote};
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;

    fn fleet(dir: &Path) -> Fleet {
        let t = "name = \"x\"\n[controller]\nlisten = \"127.0.0.1:8443\"\nurl = \"https://127.0.0.1:8443\"\ncert_names = [\"127.0.0.1\"]\n";
        Fleet {
            dir: dir.to_path_buf(),
            config: toml::from_str(t).unwrap(),
        }
    }

    fn remotes(default: Option<&str>) -> Remotes {
        // Built by hand: `add` would refuse these placeholder CAs.
        let mut r = Remotes::default();
        r.remotes
            .insert("prod".into(), remote("https://prod.example", "CA-PROD"));
        r.remotes
            .insert("stage".into(), remote("https://stage.example", "CA-STAGE"));
        r.default = default.map(String::from);
        r
    }

    fn pick(
        remote: Option<&str>,
        env: &[(&str, &str)],
        rs: &Remotes,
        f: Option<&Fleet>,
    ) -> Result<Choice> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        choose(&Inputs {
            remote,
            env: &|k| env.get(k).cloned(),
            remotes: rs,
            fleet: f,
        })
    }

    #[test]
    fn the_fleet_directory_is_the_last_resort() {
        let f = fleet(Path::new("/f"));
        let c = pick(None, &[], &Remotes::default(), Some(&f)).unwrap();
        assert_eq!(c.url, "https://127.0.0.1:8443");
        assert_eq!(c.url_from, Source::FleetDir);
        assert_eq!(c.ca, Material::File("/f/certs/ca.pem".into()));
        assert_eq!(c.token, Material::File("/f/secrets/operator.token".into()));
        let e = pick(None, &[], &Remotes::default(), None).unwrap_err();
        assert!(e.to_string().contains("fleet remote add"), "{e}");
    }

    #[test]
    fn a_named_remote_beats_the_fleet_directory_and_the_default() {
        let f = fleet(Path::new("/f"));
        let rs = remotes(Some("stage"));
        let c = pick(Some("prod"), &[], &rs, Some(&f)).unwrap();
        assert_eq!(c.url, "https://prod.example");
        assert_eq!(c.ca, Material::Value("CA-PROD".into()));
        assert_eq!(c.token, Material::Value("tok".into()));
        assert_eq!(c.token_from, Source::Remote("prod".into()));
        let e = pick(Some("nope"), &[], &rs, None).unwrap_err();
        assert!(e.to_string().contains("there are: prod, stage"), "{e}");
    }

    #[test]
    fn the_default_remote_applies_only_outside_a_fleet_directory() {
        let f = fleet(Path::new("/f"));
        let rs = remotes(Some("stage"));
        assert_eq!(
            pick(None, &[], &rs, None).unwrap().url,
            "https://stage.example"
        );
        assert_eq!(
            pick(None, &[], &rs, Some(&f)).unwrap().url_from,
            Source::FleetDir
        );
        // No default: nothing is guessed.
        assert!(pick(None, &[], &remotes(None), None).is_err());
    }

    #[test]
    fn environment_variables_beat_the_remote_field_by_field() {
        let rs = remotes(Some("prod"));
        let c = pick(None, &[("FLEET_TOKEN", "envtok")], &rs, None).unwrap();
        assert_eq!(c.url, "https://prod.example");
        assert_eq!(c.ca_from, Source::Remote("prod".into()));
        assert_eq!(c.token, Material::Value("envtok".into()));
        assert_eq!(c.token_from, Source::Env("FLEET_TOKEN"));

        let f = fleet(Path::new("/f"));
        let env = [
            ("FLEET_CONTROLLER", "https://lb.example"),
            ("FLEET_CA", "/l/ca.pem"),
            ("FLEET_TOKEN_FILE", "/l/token"),
        ];
        let c = pick(Some("prod"), &env, &rs, Some(&f)).unwrap();
        assert_eq!(
            c,
            Choice {
                url: "https://lb.example".into(),
                url_from: Source::Env("FLEET_CONTROLLER"),
                ca: Material::File("/l/ca.pem".into()),
                ca_from: Source::Env("FLEET_CA"),
                token: Material::File("/l/token".into()),
                token_from: Source::Env("FLEET_TOKEN_FILE"),
            }
        );
        // Empty variables count as unset.
        let c = pick(None, &[("FLEET_CONTROLLER", "")], &rs, None).unwrap();
        assert_eq!(c.url, "https://prod.example");
    }

    #[test]
    fn an_incomplete_environment_says_what_to_set() {
        let rs = Remotes::default();
        let e = pick(None, &[("FLEET_CONTROLLER", "https://c")], &rs, None).unwrap_err();
        assert!(e.to_string().contains("set FLEET_CA"), "{e}");
        let e = pick(
            None,
            &[("FLEET_CONTROLLER", "https://c"), ("FLEET_CA", "/ca")],
            &rs,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("set FLEET_TOKEN_FILE"), "{e}");
        let e = pick(
            None,
            &[("FLEET_TOKEN", "a"), ("FLEET_TOKEN_FILE", "/b")],
            &remotes(Some("prod")),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unset one of them"), "{e}");
    }

    #[test]
    fn loading_reads_the_files_and_checks_the_url() {
        let d = tempfile::tempdir().unwrap();
        let ca = ca();
        std::fs::write(d.path().join("ca.pem"), &ca).unwrap();
        std::fs::write(d.path().join("token"), "abc\n").unwrap();
        let choice = |url: &str, token: &str| Choice {
            url: url.into(),
            url_from: Source::Env("FLEET_CONTROLLER"),
            ca: Material::File(d.path().join("ca.pem")),
            ca_from: Source::Env("FLEET_CA"),
            token: Material::File(d.path().join(token)),
            token_from: Source::Env("FLEET_TOKEN_FILE"),
        };
        let e = Endpoint::load(choice("https://c.example", "token")).unwrap();
        assert_eq!((e.ca_pem.as_str(), e.token.as_str()), (ca.as_str(), "abc"));
        assert_eq!(e.token_hint(), "check FLEET_TOKEN_FILE");
        let err = Endpoint::load(choice("http://c.example", "token")).unwrap_err();
        assert!(err.to_string().contains("from FLEET_CONTROLLER"), "{err}");
        let err = format!(
            "{:#}",
            Endpoint::load(choice("https://c.example", "missing")).unwrap_err()
        );
        assert!(
            err.contains("the operator token (from FLEET_TOKEN_FILE): cannot read"),
            "{err}"
        );
    }

    #[test]
    fn the_fleets_own_controller_is_recognised_by_host_and_port() {
        let f = fleet(Path::new("/f"));
        let at = |url: &str| Endpoint {
            url: url.into(),
            ca_pem: String::new(),
            ca_from: Source::FleetDir,
            token: String::new(),
            token_from: Source::FleetDir,
        };
        assert!(at("https://127.0.0.1:8443").is_of(&f));
        assert!(!at("https://127.0.0.1:9443").is_of(&f));
        assert!(!at("https://prod.example").is_of(&f));
    }
}
