//! `fleet nginx`: renders the optional nginx front (docs/nginx.md).
//!
//! Writes `<out>/fleet.conf` from `nginx/fleet.conf.template` (built in) and fleet.toml,
//! `<out>/htpasswd` with the web UI password, and the directories nginx writes to (logs and temp
//! files), so `nginx -c <out>/fleet.conf -p <out>` runs without touching /etc/nginx.
//!
//! The controller keeps the UI password only as a PBKDF2 hash, so the password itself comes
//! from stdin (checked against `secrets/ui.hash` before anything is written) or is made anew.
//! nginx checks it with the system `crypt()`, so htpasswd holds SHA-512-crypt (`$6$`).

use std::io::BufRead;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::Fleet;
use crate::daemon::Cidr;
use crate::daemon::UI_USER;
use crate::ops::Output;
use crate::secrets::{write_public, write_secret, PasswordHash};

/// The built-in template (the repository's `nginx/fleet.conf.template`).
pub const TEMPLATE: &str = include_str!("../../nginx/fleet.conf.template");
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
/// SHA-512-crypt rounds: crypt()'s default, so the hash carries no `rounds=` field. nginx
/// hashes on every request it authenticates (it caches nothing); the password is 20 random
/// characters, so more rounds would cost nginx CPU without making it harder to guess.
const CRYPT_ROUNDS: usize = 5_000;
const CRYPT_SALT_LEN: usize = 16;
const CRYPT_ALPHABET: &[u8; 64] =
    b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

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

/// `fleet nginx` as the CLI runs it: render, then print the paths and the commands.
pub fn command(fleet: &Fleet, o: &NginxOptions, output: Output) -> Result<()> {
    let r = render(fleet, o)?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&r).expect("serialises"));
        return Ok(());
    }
    println!("wrote {}", r.conf.display());
    println!("wrote {} (user {UI_USER})", r.htpasswd.display());
    if let Some(p) = &r.password {
        println!("web UI user: {UI_USER}  password: {p}");
        println!("the password is shown only now; restart `fleet serve` to use it");
    }
    if let Some(u) = &r.user {
        println!("nginx's workers run as {u} (when nginx starts as root)");
    }
    if let Some(t) = &r.trust {
        println!("note: {t}");
    }
    println!("test it: {}", r.test);
    println!("run it:  {}", r.run);
    println!(
        "reload:  nginx -s reload -c {} -p {}",
        r.conf.display(),
        r.dir.display()
    );
    println!("nginx serves {}", r.url);
    Ok(())
}

/// The resolved settings, before anything is written.
struct Plan {
    dir: PathBuf,
    listen: String,
    https_port: u16,
    redirect: Option<String>,
    server_name: String,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    upstream: String,
    upstream_name: String,
    trust: Option<String>,
    worker: Option<Worker>,
    template: String,
}

/// The account of nginx's worker processes.
struct Worker {
    name: String,
    group: String,
    uid: u32,
    gid: u32,
}

/// Renders fleet.conf and htpasswd into the output directory.
pub fn render(fleet: &Fleet, o: &NginxOptions) -> Result<Rendered> {
    let plan = plan(fleet, o)?;
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
            let p = crate::init::set_password(fleet)?;
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

fn plan(fleet: &Fleet, o: &NginxOptions) -> Result<Plan> {
    let cfg = &fleet.config.nginx;
    let in_fleet = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            fleet.dir.join(p)
        }
    };

    let listen = o
        .listen
        .clone()
        .or_else(|| cfg.listen.clone())
        .unwrap_or_else(|| "443".into());
    let https_port = listen_port(&listen).context("--listen")?;
    let redirect = match &cfg.redirect_http {
        Some(r) => {
            listen_port(r).context("[nginx] redirect_http")?;
            Some(r.clone())
        }
        None => None,
    };
    let server_name = o
        .server_name
        .clone()
        .or_else(|| cfg.server_name.clone())
        .unwrap_or_else(|| "_".into());
    if server_name.split_whitespace().next().is_none() {
        bail!("--server-name is empty");
    }

    // Flags are relative to the working directory, fleet.toml's paths to the fleet directory.
    let (cert, key) = match (&o.cert, &o.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        (None, None) => (
            cfg.cert
                .as_deref()
                .map(in_fleet)
                .unwrap_or_else(|| fleet.server_pem()),
            cfg.key
                .as_deref()
                .map(in_fleet)
                .unwrap_or_else(|| fleet.server_key()),
        ),
        _ => bail!("--cert and --key go together"),
    };
    let existing = |p: &Path, what: &str| {
        std::fs::canonicalize(p).with_context(|| format!("{what} {}", p.display()))
    };
    let cert = existing(&cert, "cannot read the certificate")?;
    let key = existing(&key, "cannot read the key")?;
    let ca = existing(&fleet.ca_pem(), "cannot read the fleet CA")?;

    let upstream_url = cfg
        .upstream
        .clone()
        .unwrap_or_else(|| fleet.config.controller.url.clone());
    if !upstream_url.starts_with("https://") {
        bail!("[nginx] upstream must be https:// (the controller has no plaintext listener)");
    }
    let (host, port) = fleet_common::client::parse_base_url(&upstream_url)
        .map_err(|e| anyhow::anyhow!("[nginx] upstream: {e}"))?;
    let upstream = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let upstream_name = match &cfg.upstream_name {
        Some(n) => n.clone(),
        None => upstream_name(&host, &fleet.config.controller.cert_names)?,
    };
    let trust = trust_hint(&host, &fleet.config.controller.trusted_proxies);

    let dir = match (&o.out, &cfg.out_dir) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) => in_fleet(d),
        (None, None) => fleet.dir.join("nginx"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = std::fs::canonicalize(&dir)?;

    let worker = worker(o.user.clone().or_else(|| cfg.user.clone()))?;
    if let Some(w) = worker.as_ref().filter(|w| needs_group_access(w)) {
        check_reachable(&dir, w)?;
    }

    let template = match &cfg.template {
        Some(t) => {
            let t = in_fleet(t);
            std::fs::read_to_string(&t)
                .with_context(|| format!("cannot read the template {}", t.display()))?
        }
        None => TEMPLATE.to_string(),
    };
    Ok(Plan {
        dir,
        listen,
        https_port,
        redirect,
        server_name,
        cert,
        key,
        ca,
        upstream,
        upstream_name,
        trust,
        worker,
        template,
    })
}

/// What to tell the operator when the controller would not believe nginx's `X-Real-IP`:
/// without it every failed login through nginx counts against nginx's address. nginx connects
/// from loopback to a loopback upstream; from another host, only the operator knows the
/// address, so the hint is given only while no proxy is trusted at all.
fn trust_hint(upstream_host: &str, trusted: &[Cidr]) -> Option<String> {
    let from = match upstream_host.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => Some(ip),
        Ok(_) => None,
        Err(_) if upstream_host == "localhost" => Some(IpAddr::from([127, 0, 0, 1])),
        Err(_) => None,
    };
    let advice = "so that failed logins count against each client rather than against nginx";
    match from {
        Some(ip) if trusted.iter().any(|c| c.contains(ip)) => None,
        Some(ip) => Some(format!(
            "the controller does not trust nginx's X-Real-IP yet: add trusted_proxies = [\"{ip}\"] under [controller] in fleet.toml and restart `fleet serve`, {advice}"
        )),
        None if trusted.is_empty() => Some(format!(
            "the controller does not trust nginx's X-Real-IP yet: add the address nginx connects to the controller from to controller.trusted_proxies in fleet.toml and restart `fleet serve`, {advice}"
        )),
        None => None,
    }
}

/// The port of an nginx `listen` value: `PORT`, `ADDR:PORT` or `[V6]:PORT`.
fn listen_port(s: &str) -> Result<u16> {
    if let Ok(p) = s.parse::<u16>() {
        return Ok(p);
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a.port());
    }
    // A host name: nginx resolves it at start.
    if let Some((h, p)) = s.rsplit_once(':') {
        if !h.is_empty() && !h.contains(':') {
            if let Ok(p) = p.parse::<u16>() {
                return Ok(p);
            }
        }
    }
    bail!("{s:?} is not PORT or ADDR:PORT")
}

fn listen_host(listen: &str) -> String {
    match listen.parse::<SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => "localhost".into(),
        Ok(a) => match a.ip() {
            IpAddr::V6(v6) => format!("[{v6}]"),
            IpAddr::V4(v4) => v4.to_string(),
        },
        Err(_) => match listen.rsplit_once(':') {
            Some((h, _)) if listen.parse::<u16>().is_err() => h.to_string(),
            _ => "localhost".into(),
        },
    }
}

/// The name nginx checks in the controller's certificate. nginx verifies names with
/// `X509_check_host`, which matches DNS names only, so an IP host maps to a DNS name of the
/// certificate (`fleet init` always adds `localhost`).
fn upstream_name(host: &str, cert_names: &[String]) -> Result<String> {
    if host.parse::<IpAddr>().is_err() {
        return Ok(host.to_string());
    }
    let dns: Vec<&String> = cert_names
        .iter()
        .filter(|n| n.parse::<IpAddr>().is_err())
        .collect();
    dns.iter()
        .find(|n| n.as_str() == "localhost")
        .or_else(|| dns.first())
        .map(|n| n.to_string())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "controller.cert_names has no DNS name for nginx to check the controller's certificate against; set [nginx] upstream_name"
            )
        })
}

/// The `user` directive: the one asked for, else (only when run as root, which is when nginx
/// would switch users) `www-data`, else `nobody`.
fn worker(asked: Option<String>) -> Result<Option<Worker>> {
    use nix::unistd::{geteuid, Group, User};
    let name = match asked {
        Some(n) => n,
        None if geteuid().is_root() => {
            if User::from_name("www-data").ok().flatten().is_some() {
                "www-data".into()
            } else {
                "nobody".into()
            }
        }
        None => return Ok(None),
    };
    let u = User::from_name(&name)
        .ok()
        .flatten()
        .ok_or_else(|| anyhow::anyhow!("--user: no such user {name:?}"))?;
    let group = Group::from_gid(u.gid)
        .ok()
        .flatten()
        .map(|g| g.name)
        .ok_or_else(|| anyhow::anyhow!("--user: {name}'s group {} has no name", u.gid))?;
    Ok(Some(Worker {
        name,
        group,
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
    }))
}

/// Run as root for other workers: the output directory and htpasswd must be readable by
/// the workers' group (nginx reads htpasswd in the worker, on every request).
fn needs_group_access(w: &Worker) -> bool {
    nix::unistd::geteuid().is_root() && w.uid != 0
}

/// Every directory above `dir` must let the worker user through.
fn check_reachable(dir: &Path, w: &Worker) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    for a in dir.ancestors().skip(1) {
        let m = std::fs::metadata(a)?;
        let mode = m.mode();
        let ok = if m.uid() == w.uid {
            mode & 0o100 != 0
        } else if m.gid() == w.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !ok {
            bail!(
                "nginx's workers run as {}, who cannot reach {}: {} is not searchable by them (chmod o+x it, pick another --out, or pass --user)",
                w.name,
                dir.display(),
                a.display()
            );
        }
    }
    Ok(())
}

fn share_with_group(p: &Path, w: &Worker, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(p, Some(0), Some(w.gid))
        .with_context(|| format!("cannot chown {}", p.display()))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn make_dirs(plan: &Plan) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let shared = plan.worker.as_ref().filter(|w| needs_group_access(w));
    match shared {
        Some(w) => share_with_group(&plan.dir, w, 0o750)?,
        // Only the owner: htpasswd and the logs are nobody else's business.
        None => std::fs::set_permissions(&plan.dir, std::fs::Permissions::from_mode(0o700))?,
    }
    let logs = plan.dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    std::fs::set_permissions(&logs, std::fs::Permissions::from_mode(0o700))?;
    // nginx's master (as root) gives these to the worker user itself when it starts.
    for d in TEMP_DIRS {
        let p = plan.dir.join(d);
        std::fs::create_dir_all(&p)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// A value that goes into the config as one nginx token: no spaces, quotes, `;`, braces,
/// variables or comments (a path like that would change the config's meaning).
fn token(what: &str, v: &str) -> Result<String> {
    let bad = |c: char| c.is_whitespace() || c.is_control() || ";{}\"'\\$#".contains(c);
    if v.is_empty() || v.chars().any(bad) {
        bail!(
            "{what} {v:?} cannot go into an nginx config (no spaces or any of ; {{ }} \" ' \\ $ #)"
        );
    }
    Ok(v.to_string())
}

fn path_token(what: &str, p: &Path) -> Result<String> {
    token(what, &p.to_string_lossy())
}

fn render_conf(plan: &Plan) -> Result<String> {
    let names = plan
        .server_name
        .split_whitespace()
        .map(|n| token("--server-name", n))
        .collect::<Result<Vec<_>>>()?
        .join(" ");
    let mut vars: Vec<(&str, String)> = vec![
        ("prefix", path_token("--out", &plan.dir)?),
        ("listen", token("--listen", &plan.listen)?),
        ("server_name", names),
        ("cert", path_token("--cert", &plan.cert)?),
        ("key", path_token("--key", &plan.key)?),
        ("ca", path_token("the fleet CA", &plan.ca)?),
        (
            "htpasswd",
            path_token("--out", &plan.dir.join(HTPASSWD_FILE))?,
        ),
        ("upstream", token("[nginx] upstream", &plan.upstream)?),
        (
            "upstream_name",
            token("[nginx] upstream_name", &plan.upstream_name)?,
        ),
        (
            "https_port_suffix",
            if plan.https_port == 443 {
                String::new()
            } else {
                format!(":{}", plan.https_port)
            },
        ),
    ];
    if let Some(r) = &plan.redirect {
        vars.push(("redirect_listen", token("[nginx] redirect_http", r)?));
    }
    if let Some(w) = &plan.worker {
        vars.push(("user", token("--user", &w.name)?));
        vars.push(("group", token("--user's group", &w.group)?));
    }
    let sections = [
        ("user", plan.worker.is_some()),
        ("redirect", plan.redirect.is_some()),
    ];
    render_template(&plan.template, &vars, &sections)
}

/// Fills `{{name}}` placeholders and keeps or drops `# {{#name}}` ... `# {{/name}}` sections.
/// Any placeholder left over is an error, so a template and this code cannot drift apart
/// silently.
pub fn render_template(
    template: &str,
    vars: &[(&str, String)],
    sections: &[(&str, bool)],
) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut open: Vec<(&str, bool)> = vec![];
    for (n, line) in template.lines().enumerate() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("# {{#").and_then(|s| s.strip_suffix("}}")) {
            let on = sections
                .iter()
                .find(|(s, _)| *s == name)
                .map(|(_, on)| *on)
                .ok_or_else(|| {
                    anyhow::anyhow!("template line {}: unknown section {name}", n + 1)
                })?;
            open.push((name, on));
            continue;
        }
        if let Some(name) = t.strip_prefix("# {{/").and_then(|s| s.strip_suffix("}}")) {
            match open.pop() {
                Some((o, _)) if o == name => continue,
                _ => bail!("template line {}: unmatched end of section {name}", n + 1),
            }
        }
        if open.iter().any(|(_, on)| !on) {
            continue;
        }
        let mut l = line.to_string();
        for (k, v) in vars {
            l = l.replace(&format!("{{{{{k}}}}}"), v);
        }
        if let Some(i) = l.find("{{") {
            let rest = &l[i..];
            let end = rest.find("}}").map(|e| e + 2).unwrap_or(rest.len());
            bail!(
                "template line {}: unknown placeholder {}",
                n + 1,
                &rest[..end]
            );
        }
        out.push_str(&l);
        out.push('\n');
    }
    if let Some((name, _)) = open.pop() {
        bail!("template: section {name} is not closed");
    }
    Ok(out)
}

/// SHA-512-crypt (`$6$<salt>$<hash>`, 5000 rounds, 16-character random salt): what glibc's and
/// libxcrypt's `crypt()`, and so nginx's `auth_basic_user_file`, accept.
pub fn sha512_crypt(password: &str) -> Result<String> {
    let mut raw = [0u8; CRYPT_SALT_LEN];
    SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| anyhow::anyhow!("system RNG failed"))?;
    let salt: String = raw
        .iter()
        .map(|b| CRYPT_ALPHABET[usize::from(b & 63)] as char)
        .collect();
    sha512_crypt_with_salt(password, &salt)
}

fn sha512_crypt_with_salt(password: &str, salt: &str) -> Result<String> {
    let params = sha_crypt::Sha512Params::new(CRYPT_ROUNDS)
        .map_err(|e| anyhow::anyhow!("sha-crypt parameters: {e:?}"))?;
    let hash = sha_crypt::sha512_crypt_b64(password.as_bytes(), salt.as_bytes(), &params)
        .map_err(|e| anyhow::anyhow!("sha-crypt: {e:?}"))?;
    Ok(format!("$6${salt}${hash}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha512_crypt_matches_the_reference_vector() {
        // From Ulrich Drepper's SHA-crypt specification (default rounds).
        assert_eq!(
            sha512_crypt_with_salt("Hello world!", "saltstring").unwrap(),
            "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1"
        );
        let h = sha512_crypt("pw").unwrap();
        let parts: Vec<&str> = h.split('$').collect();
        assert_eq!(parts[..2], ["", "6"]);
        assert_eq!(parts[2].len(), CRYPT_SALT_LEN);
        assert_eq!(parts[3].len(), 86);
        assert_ne!(h, sha512_crypt("pw").unwrap(), "salted");
    }

    #[test]
    fn template_sections_and_placeholders() {
        let t = "a {{x}}\n# {{#on}}\nb\n# {{/on}}\n# {{#off}}\nc {{nope}}\n# {{/off}}\nd\n";
        let r = render_template(t, &[("x", "1".into())], &[("on", true), ("off", false)]).unwrap();
        assert_eq!(r, "a 1\nb\nd\n");
        assert!(render_template("{{y}}\n", &[], &[]).is_err());
        assert!(render_template("# {{#on}}\n", &[], &[("on", true)]).is_err());
        assert!(render_template("# {{#what}}\n# {{/what}}\n", &[], &[]).is_err());
    }

    #[test]
    fn values_that_would_change_the_config_are_refused() {
        assert!(token("x", "/srv/fleet/nginx/htpasswd").is_ok());
        assert!(token("x", "[::]:443").is_ok());
        for bad in ["a b", "a;b", "a{", "$host", "a#b", "a\"b", "", "a\nb"] {
            assert!(token("x", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn listen_values_and_upstream_names() {
        assert_eq!(listen_port("443").unwrap(), 443);
        assert_eq!(listen_port("127.0.0.1:9443").unwrap(), 9443);
        assert_eq!(listen_port("[::]:443").unwrap(), 443);
        assert_eq!(listen_port("fleet.example:8443").unwrap(), 8443);
        assert!(listen_port("nope").is_err());
        assert_eq!(listen_host("0.0.0.0:443"), "localhost");
        assert_eq!(listen_host("127.0.0.1:9443"), "127.0.0.1");
        let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        assert_eq!(upstream_name("127.0.0.1", &names).unwrap(), "localhost");
        assert_eq!(upstream_name("ctl.example", &names).unwrap(), "ctl.example");
        assert!(upstream_name("127.0.0.1", &["127.0.0.1".into()]).is_err());
    }

    fn fleet() -> (tempfile::TempDir, Fleet, String) {
        let d = tempfile::tempdir().unwrap();
        let r = crate::init::init(
            d.path(),
            &crate::init::InitOptions {
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
    fn the_operator_is_told_to_trust_nginx_until_it_is() {
        let nets = |s: &[&str]| s.iter().map(|c| c.parse().unwrap()).collect::<Vec<Cidr>>();
        let hint = trust_hint("127.0.0.1", &[]).unwrap();
        assert!(hint.contains("trusted_proxies = [\"127.0.0.1\"]"), "{hint}");
        assert!(trust_hint("localhost", &[])
            .unwrap()
            .contains("\"127.0.0.1\""));
        assert!(trust_hint("::1", &[]).unwrap().contains("\"::1\""));
        assert_eq!(trust_hint("127.0.0.1", &nets(&["127.0.0.0/8"])), None);
        assert_eq!(trust_hint("localhost", &nets(&["127.0.0.1"])), None);
        assert!(trust_hint("127.0.0.1", &nets(&["10.0.0.0/8"])).is_some());
        // Another host: nginx's own address is unknown here.
        assert!(trust_hint("10.0.0.5", &[])
            .unwrap()
            .contains("the address nginx connects to the controller from"));
        assert_eq!(trust_hint("ctl.example", &nets(&["10.0.0.7"])), None);
    }

    #[test]
    fn stdin_password_is_one_line() {
        assert_eq!(read_password(&b"abc\r\n"[..]).unwrap(), "abc");
        assert_eq!(read_password(&b"abc\nmore\n"[..]).unwrap(), "abc");
        assert!(read_password(&b"\n"[..]).is_err());
        assert!(read_password(&b""[..]).is_err());
    }
}
