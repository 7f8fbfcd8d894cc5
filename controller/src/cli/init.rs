//! `fleet init`: a fleet directory with its config, PKI, keys and secrets.
//!
//! Re-running it keeps every existing secret and only fills in what is missing; `--force`
//! replaces secrets (which means re-baking user-data for running nodes: docs/security.md).

use std::fmt;
use std::path::Path;

use anyhow::{Context, Result};
use fleet_common::manifest::SigningKey;
use fleet_common::secret::random_token;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::config::{Fleet, CONFIG_FILE};
use crate::daemon::UI_USER;
use crate::secrets::{hash_password, write_public, write_secret};

/// Make a fleet directory: fleet.toml, CA and server certificate, signing key, tokens, UI password.
#[derive(clap::Args)]
pub struct InitArgs {
    #[arg(long, default_value = "fleet")]
    name: String,
    /// Address `fleet serve` listens on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: String,
    /// URL agents use to reach the controller (default: from --listen).
    #[arg(long)]
    url: Option<String>,
    /// Extra names or addresses for the server certificate.
    #[arg(long = "cert-name")]
    cert_names: Vec<String>,
    /// The `locust` executable for the master and local agents.
    #[arg(long, default_value = "locust")]
    locust: String,
    /// The host the sample locustfile targets.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    target: String,
    /// Replace existing secrets.
    #[arg(long)]
    force: bool,
}

impl InitArgs {
    pub fn run(self, dir: &Path) -> Result<InitReport> {
        init(
            dir,
            &InitOptions {
                name: self.name,
                listen: self.listen,
                url: self.url,
                cert_names: self.cert_names,
                locust: self.locust,
                target: self.target,
                force: self.force,
            },
        )
    }
}

#[derive(Debug, Clone)]
pub struct InitOptions {
    pub name: String,
    pub listen: String,
    pub url: Option<String>,
    pub cert_names: Vec<String>,
    pub locust: String,
    pub target: String,
    pub force: bool,
}

/// What `init` did, for the CLI to print.
#[derive(Debug, Default, serde::Serialize)]
pub struct InitReport {
    pub created: Vec<String>,
    pub kept: Vec<String>,
    /// The new UI password, when one was made. Shown once; only its hash is stored.
    pub password: Option<String>,
}

impl fmt::Display for InitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.created {
            writeln!(f, "created {c}")?;
        }
        if !self.kept.is_empty() {
            writeln!(
                f,
                "kept {} (use --force to replace secrets)",
                self.kept.join(", ")
            )?;
        }
        if let Some(p) = &self.password {
            writeln!(f, "web UI user: {UI_USER}  password: {p}")?;
            writeln!(
                f,
                "the password is shown only now; `fleet passwd` makes a new one"
            )?;
        }
        Ok(())
    }
}

pub const SAMPLE_LOCUSTFILE: &str = r#"# A sample spec: fleet publishes this directory to every agent when it changes.
# Edit it while `fleet serve` runs and watch the agents restart their workers on it.
from locust import FastHttpUser, between, task


class WebsiteUser(FastHttpUser):
    host = "{target}"
    wait_time = between(0.5, 1.5)

    @task(3)
    def index(self):
        self.client.get("/")

    @task
    def item(self):
        self.client.get("/items/42", name="/items/[id]")
"#;

fn host_of(url: &str) -> String {
    fleet_common::client::parse_base_url(url)
        .map(|hp| hp.host)
        .unwrap_or_default()
}

pub fn init(dir: &Path, o: &InitOptions) -> Result<InitReport> {
    let mut r = InitReport::default();
    crate::config::check_name(&o.name)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cfg_path = dir.join(CONFIG_FILE);
    // `--force` replaces secrets, never the operator's own fleet.toml.
    if !cfg_path.exists() {
        write_config(&cfg_path, o)?;
        r.created.push(CONFIG_FILE.into());
    } else {
        r.kept.push(CONFIG_FILE.into());
    }
    let fleet = Fleet::load(dir)?;
    // A fleet.toml from before fleet ids gets its id now; an existing one is kept.
    if fleet.config.id.is_none() {
        fleet.ensure_id()?;
        r.created.push("id in fleet.toml".into());
    }

    let spec = fleet.spec_dir();
    let lf = spec.join(&fleet.config.controller.locustfile);
    if !lf.exists() {
        std::fs::create_dir_all(&spec)?;
        std::fs::write(&lf, SAMPLE_LOCUSTFILE.replace("{target}", &o.target))?;
        r.created
            .push(format!("{}", lf.strip_prefix(dir).unwrap_or(&lf).display()));
    }

    // PKI: an ECDSA P-256 CA and a server certificate it signs.
    if !fleet.ca_key().exists() || o.force {
        let (ca_params, ca_key) = ca_params()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        write_secret(&fleet.ca_key(), ca_key.serialize_pem().as_bytes(), true)?;
        write_public(&fleet.ca_pem(), ca_cert.pem().as_bytes(), true)?;
        issue_server_cert(&fleet, ca_params, ca_key)?;
        r.created
            .extend(["certs/ca.pem".into(), "certs/server.pem".into()]);
    } else {
        r.kept.push("certs/".into());
    }

    if !fleet.signing_key().exists() || o.force {
        let (key, pkcs8) = SigningKey::generate();
        write_secret(&fleet.signing_key(), &pkcs8, true)?;
        write_public(
            &fleet.verify_key(),
            format!("{}\n", key.verify_key().to_base64()).as_bytes(),
            true,
        )?;
        r.created
            .extend(["secrets/signing.pk8".into(), "verify.key".into()]);
    } else {
        r.kept.push("secrets/signing.pk8".into());
    }
    for (path, name) in [
        (fleet.agent_token(), "secrets/agent.token"),
        (fleet.operator_token(), "secrets/operator.token"),
    ] {
        if !path.exists() || o.force {
            write_secret(&path, format!("{}\n", random_token(32)).as_bytes(), true)?;
            r.created.push(name.into());
        } else {
            r.kept.push(name.into());
        }
    }
    if !fleet.ui_hash().exists() || o.force {
        r.password = Some(set_password(&fleet)?);
        r.created.push("secrets/ui.hash".into());
    } else {
        r.kept.push("secrets/ui.hash".into());
    }
    Ok(r)
}

/// A new fleet.toml from the flags, checked to parse before it is written.
fn write_config(cfg_path: &Path, o: &InitOptions) -> Result<()> {
    let url = o
        .url
        .clone()
        .unwrap_or_else(|| format!("https://{}", o.listen.replace("0.0.0.0", "127.0.0.1")));
    let mut names = o.cert_names.clone();
    for n in [
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        host_of(&url),
    ] {
        if !n.is_empty() && !names.contains(&n) {
            names.push(n);
        }
    }
    let text = format!(
        "# fleet configuration: docs/configuration.md\nname = {name:?}\n# Tags everything this fleet makes on AWS; never change it (docs/ec2.md).\nid = {id:?}\n\n[controller]\nlisten = {listen:?}\nurl = {url:?}\ncert_names = {names:?}\nspec_dir = \"spec\"\nlocustfile = \"locustfile.py\"\n\n[master]\nmanaged = true\nlocust = {locust:?}\nbind_host = \"127.0.0.1\"\nhost = \"127.0.0.1\"\nport = 5557\nweb_url = \"http://127.0.0.1:8089/locust\"\n\n[local]\nworkers = 1\nlocust = {locust:?}\n",
        name = o.name,
        id = crate::config::new_id(),
        listen = o.listen,
        locust = o.locust,
    );
    toml::from_str::<crate::config::FleetConfig>(&text)
        .context("generated fleet.toml does not parse")?;
    write_public(cfg_path, text.as_bytes(), true)?;
    Ok(())
}

/// Makes and stores a new UI password; returns it (the only time it is seen).
pub fn set_password(fleet: &Fleet) -> Result<String> {
    let password = random_token(15);
    write_secret(
        &fleet.ui_hash(),
        format!("{}\n", hash_password(&password)).as_bytes(),
        true,
    )?;
    Ok(password)
}

fn ca_params() -> Result<(CertificateParams, KeyPair)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.distinguished_name.push(DnType::CommonName, "fleet CA");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2025, 1, 1);
    p.not_after = rcgen::date_time_ymd(2035, 1, 1);
    Ok((p, key))
}

fn issue_server_cert(fleet: &Fleet, ca_params: CertificateParams, ca_key: KeyPair) -> Result<()> {
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::new(fleet.config.controller.cert_names.clone())?;
    p.distinguished_name
        .push(DnType::CommonName, "fleet controller");
    p.not_before = rcgen::date_time_ymd(2025, 1, 1);
    p.not_after = rcgen::date_time_ymd(2035, 1, 1);
    let cert = p.signed_by(&key, &issuer)?;
    write_secret(&fleet.server_key(), key.serialize_pem().as_bytes(), true)?;
    write_public(&fleet.server_pem(), cert.pem().as_bytes(), true)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> InitOptions {
        InitOptions {
            name: "t".into(),
            listen: "127.0.0.1:8443".into(),
            url: None,
            cert_names: vec![],
            locust: "locust".into(),
            target: "http://127.0.0.1:8080".into(),
            force: false,
        }
    }

    #[test]
    fn init_makes_everything_once_and_keeps_secrets_on_rerun() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let r = init(d.path(), &opts()).unwrap();
        let pw = r.password.expect("password shown on first run");
        let f = Fleet::load(d.path()).unwrap();
        for p in [
            f.ca_key(),
            f.server_key(),
            f.signing_key(),
            f.agent_token(),
            f.operator_token(),
            f.ui_hash(),
        ] {
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600,
                "{}",
                p.display()
            );
        }
        let hash = std::fs::read_to_string(f.ui_hash()).unwrap();
        assert!(
            !hash.contains(&pw),
            "the password itself must not be stored"
        );
        assert!(crate::secrets::PasswordHash::parse(&hash)
            .unwrap()
            .verify(&pw));
        let token = std::fs::read(f.agent_token()).unwrap();
        let id = f.config.id.clone().expect("init writes a fleet id");
        assert!(crate::config::check_id(&id).is_ok(), "{id}");

        let again = init(d.path(), &opts()).unwrap();
        assert!(again.password.is_none());
        assert_eq!(std::fs::read(f.agent_token()).unwrap(), token);
        assert_eq!(std::fs::read_to_string(f.ui_hash()).unwrap(), hash);

        let forced = init(
            d.path(),
            &InitOptions {
                force: true,
                ..opts()
            },
        )
        .unwrap();
        assert!(forced.password.is_some());
        assert_ne!(std::fs::read(f.agent_token()).unwrap(), token);
        assert_eq!(
            Fleet::load(d.path()).unwrap().config.id,
            Some(id),
            "not even --force changes the fleet id"
        );
    }

    #[test]
    fn init_refuses_a_name_ec2_filters_would_read_as_a_pattern() {
        let d = tempfile::tempdir().unwrap();
        let e = init(
            d.path(),
            &InitOptions {
                name: "load*".into(),
                ..opts()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("fleet name \"load*\" is not allowed"), "{e}");
        assert!(!d.path().join(CONFIG_FILE).exists(), "nothing written");
    }
}
