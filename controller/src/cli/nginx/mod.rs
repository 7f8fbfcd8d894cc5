//! `fleet nginx`: renders the optional nginx front (docs/nginx.md).
//!
//! Writes `<out>/fleet.conf` from `nginx/fleet.conf.template` (built in) and fleet.toml,
//! `<out>/htpasswd` with the web UI password, and the directories nginx writes to (logs and temp
//! files), so `nginx -c <out>/fleet.conf -p <out>` runs without touching /etc/nginx.
//!
//! The controller keeps the UI password only as a PBKDF2 hash, so the password itself comes
//! from stdin (checked against `secrets/ui.hash` before anything is written) or is made anew.
//! nginx checks it with the system `crypt()`, so htpasswd holds SHA-512-crypt (`$6$`).

mod conf;
mod settings;

use std::fmt;
use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use self::conf::{render_conf, sha512_crypt};
use self::settings::{listen_host, make_dirs, needs_group_access, settings, share_with_group};
use crate::config::Fleet;
use crate::daemon::UI_USER;
use crate::secrets::{write_public, write_secret, PasswordHash};

/// Render the nginx front (docs/nginx.md): fleet.conf, htpasswd with the UI password, runtime dirs.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("password").required(true).args(["password_stdin", "new_password"])))]
pub struct NginxArgs {
    /// Output directory (default: nginx/ in the fleet directory).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where nginx listens for HTTPS: ADDR:PORT or PORT (default 443).
    #[arg(long)]
    listen: Option<String>,
    /// nginx's server_name (default `_`).
    #[arg(long)]
    server_name: Option<String>,
    /// Certificate chain nginx serves (default: the fleet's certs/server.pem).
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Its private key (default: the fleet's certs/server.key).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// The account nginx's workers run as when nginx starts as root (default www-data).
    #[arg(long)]
    user: Option<String>,
    /// Read the current web UI password from stdin (one line); it is checked first.
    #[arg(long)]
    password_stdin: bool,
    /// Make a new web UI password for the controller and nginx (printed once).
    #[arg(long)]
    new_password: bool,
}

impl NginxArgs {
    pub fn run(self, fleet: &Fleet) -> Result<Rendered> {
        let password = if self.password_stdin {
            Password::Given(read_password(std::io::stdin().lock())?)
        } else {
            Password::New
        };
        render(
            fleet,
            &NginxOptions {
                out: self.out,
                listen: self.listen,
                server_name: self.server_name,
                cert: self.cert,
                key: self.key,
                user: self.user,
                password,
            },
        )
    }
}

/// The built-in template (the repository's `nginx/fleet.conf.template`).
pub const TEMPLATE: &str = include_str!("../../../../nginx/fleet.conf.template");
pub const CONF_FILE: &str = "fleet.conf";
pub const HTPASSWD_FILE: &str = "htpasswd";
/// Directories nginx writes to, made in the output directory.
pub const TEMP_DIRS: [&str; 5] = [
    "client_body_temp",
    "proxy_temp",
    "fastcgi_temp",
    "uwsgi_temp",
    "scgi_temp",
];
/// Where the htpasswd's password comes from.
pub enum Password {
    /// The current web UI password (checked against `secrets/ui.hash`).
    Given(String),
    /// Make a new UI password (`fleet passwd`), for both the controller and nginx.
    New,
}

/// `fleet nginx`'s flags; unset ones come from `[nginx]` in fleet.toml, then the defaults.
pub struct NginxOptions {
    pub out: Option<PathBuf>,
    pub listen: Option<String>,
    pub server_name: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Password,
}

/// What was written.
#[derive(Debug, serde::Serialize)]
pub struct Rendered {
    pub dir: PathBuf,
    pub conf: PathBuf,
    pub htpasswd: PathBuf,
    /// `https://<server name or listen address>:<port>`: what agents and browsers use.
    pub url: String,
    /// The `user` directive's account, if one was written.
    pub user: Option<String>,
    /// The new UI password (with `--new-password`), shown once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// What to add to `controller.trusted_proxies`, when it does not trust nginx yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust: Option<String>,
    /// The command that checks the config.
    pub test: String,
    /// The command that starts nginx.
    pub run: String,
}

/// Reads the password: one line, without its line ending.
pub fn read_password(r: impl BufRead) -> Result<String> {
    let mut line = String::new();
    let mut r = r;
    r.read_line(&mut line)
        .context("cannot read the password from stdin")?;
    let p = line.trim_end_matches(['\n', '\r']);
    if p.is_empty() {
        bail!("no password on stdin: pass the web UI password as one line");
    }
    Ok(p.to_string())
}

/// The paths and the commands to test, run and reload nginx.
impl fmt::Display for Rendered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "wrote {}", self.conf.display())?;
        writeln!(f, "wrote {} (user {UI_USER})", self.htpasswd.display())?;
        if let Some(p) = &self.password {
            writeln!(f, "web UI user: {UI_USER}  password: {p}")?;
            writeln!(
                f,
                "the password is shown only now; send SIGHUP to `fleet serve` (systemctl reload fleet-controller) to use it"
            )?;
        }
        if let Some(u) = &self.user {
            writeln!(f, "nginx's workers run as {u} (when nginx starts as root)")?;
        }
        if let Some(t) = &self.trust {
            writeln!(f, "note: {t}")?;
        }
        writeln!(f, "test it: {}", self.test)?;
        writeln!(f, "run it:  {}", self.run)?;
        writeln!(
            f,
            "reload:  nginx -s reload -c {} -p {}",
            self.conf.display(),
            self.dir.display()
        )?;
        writeln!(f, "nginx serves {}", self.url)
    }
}

/// Renders fleet.conf and htpasswd into the output directory.
pub fn render(fleet: &Fleet, o: &NginxOptions) -> Result<Rendered> {
    let plan = settings(fleet, o)?;
    let conf_text = render_conf(&plan)?;

    // Check the password before writing anything.
    if let Password::Given(p) = &o.password {
        let hash = PasswordHash::parse(&fleet.read(&fleet.ui_hash())?)?;
        if !hash.verify(p) {
            bail!(
                "the password on stdin is not the web UI password (secrets/ui.hash); nothing written (use --new-password to make a new one)"
            );
        }
    }

    make_dirs(&plan)?;
    let conf = plan.dir.join(CONF_FILE);
    write_public(&conf, conf_text.as_bytes(), true)?;

    let htpasswd = plan.dir.join(HTPASSWD_FILE);
    let (password, new_password) = match &o.password {
        Password::Given(p) => (p.clone(), None),
        Password::New => {
            let p = crate::cli::init::set_password(fleet)?;
            (p.clone(), Some(p))
        }
    };
    let line = format!("{UI_USER}:{}\n", sha512_crypt(&password)?);
    let written = write_secret(&htpasswd, line.as_bytes(), true).and_then(|()| {
        if let Some(w) = plan.worker.as_ref().filter(|w| needs_group_access(w)) {
            share_with_group(&htpasswd, w, 0o640)?;
        }
        Ok(())
    });
    if let Err(e) = written {
        match &new_password {
            // The controller already has the new password: do not lose it.
            Some(p) => bail!(
                "{e:#}; the new web UI password is {p} (shown only now; rerun with --password-stdin)"
            ),
            None => return Err(e),
        }
    }

    let dir = plan.dir.display().to_string();
    let host = match plan.server_name.split_whitespace().next() {
        Some(n)
            if n != "_" && !n.starts_with('*') && !n.starts_with('.') && !n.starts_with('~') =>
        {
            n.to_string()
        }
        _ => listen_host(&plan.listen),
    };
    Ok(Rendered {
        url: if plan.https_port == 443 {
            format!("https://{host}")
        } else {
            format!("https://{host}:{}", plan.https_port)
        },
        test: format!("nginx -t -c {} -p {dir}", conf.display()),
        run: format!(
            "nginx -c {} -p {dir}   (add -g 'daemon off;' to stay in the foreground)",
            conf.display()
        ),
        conf,
        htpasswd,
        user: plan.worker.as_ref().map(|w| w.name.clone()),
        password: new_password,
        trust: plan.trust,
        dir: plan.dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> (tempfile::TempDir, Fleet, String) {
        let d = tempfile::tempdir().unwrap();
        let r = crate::cli::init::init(
            d.path(),
            &crate::cli::init::InitOptions {
                name: "t".into(),
                listen: "127.0.0.1:8443".into(),
                url: None,
                cert_names: vec![],
                locust: "locust".into(),
                target: "http://127.0.0.1:8080".into(),
                force: false,
            },
        )
        .unwrap();
        let f = Fleet::load(d.path()).unwrap();
        (d, f, r.password.unwrap())
    }

    fn opts(password: Password) -> NginxOptions {
        NginxOptions {
            out: None,
            listen: Some("127.0.0.1:9443".into()),
            server_name: None,
            cert: None,
            key: None,
            // The current user (root or not): no chown, and any temp directory will do.
            user: nix::unistd::User::from_uid(nix::unistd::geteuid())
                .unwrap()
                .map(|u| u.name),
            password,
        }
    }

    #[test]
    fn renders_a_complete_config_and_refuses_a_wrong_password() {
        use std::os::unix::fs::PermissionsExt;
        let (_d, f, pw) = fleet();
        let e = render(&f, &opts(Password::Given("wrong".into()))).unwrap_err();
        assert!(
            format!("{e:#}").contains("not the web UI password"),
            "{e:#}"
        );
        assert!(!f.dir.join("nginx/htpasswd").exists(), "nothing written");

        let r = render(&f, &opts(Password::Given(pw.clone()))).unwrap();
        let conf = std::fs::read_to_string(&r.conf).unwrap();
        assert!(!conf.contains("{{"), "{conf}");
        for want in [
            "listen 127.0.0.1:9443 ssl;",
            "server 127.0.0.1:8443;",
            "proxy_ssl_name localhost;",
            "proxy_ssl_verify on;",
            "ssl_protocols TLSv1.2 TLSv1.3;",
            "proxy_read_timeout 1h;",
            "limit_req zone=fleet_agents burst=10000 nodelay;",
            "proxy_set_header X-Real-IP $remote_addr;",
            &format!("auth_basic_user_file {}/htpasswd;", r.dir.display()),
            &format!("ssl_certificate {};", f.server_pem().display()),
            &format!("proxy_ssl_trusted_certificate {};", f.ca_pem().display()),
        ] {
            assert!(conf.contains(want), "missing {want:?}");
        }
        // No plaintext server unless asked for.
        assert!(!conf.contains("return 301"));
        let ht = std::fs::read_to_string(&r.htpasswd).unwrap();
        assert!(ht.starts_with("fleet:$6$"), "{ht}");
        assert!(!ht.contains(&pw));
        if !nix::unistd::geteuid().is_root() {
            let mode = std::fs::metadata(&r.htpasswd).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            assert!(r.user.is_none());
        }
        for d in TEMP_DIRS.iter().chain(&["logs"]) {
            assert!(r.dir.join(d).is_dir(), "{d}");
        }

        // A new password replaces the controller's and nginx's together.
        let r2 = render(&f, &opts(Password::New)).unwrap();
        let p2 = r2.password.unwrap();
        assert!(
            PasswordHash::parse(&std::fs::read_to_string(f.ui_hash()).unwrap())
                .unwrap()
                .verify(&p2)
        );
        assert!(render(&f, &opts(Password::Given(pw))).is_err());
    }

    #[test]
    fn the_redirect_server_is_rendered_only_when_configured() {
        let (_d, mut f, pw) = fleet();
        f.config.nginx.redirect_http = Some("127.0.0.1:9080".into());
        let r = render(&f, &opts(Password::Given(pw))).unwrap();
        let conf = std::fs::read_to_string(&r.conf).unwrap();
        assert!(conf.contains("listen 127.0.0.1:9080;"));
        assert!(conf.contains("return 301 https://$host:9443$request_uri;"));
    }

    #[test]
    fn stdin_password_is_one_line() {
        assert_eq!(read_password(&b"abc\r\n"[..]).unwrap(), "abc");
        assert_eq!(read_password(&b"abc\nmore\n"[..]).unwrap(), "abc");
        assert!(read_password(&b"\n"[..]).is_err());
        assert!(read_password(&b""[..]).is_err());
    }
}
