//! `fleet nginx`'s settings: flags first, then `[nginx]` in fleet.toml, then the defaults,
//! resolved and checked before anything is written; and the account nginx's workers run as.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use fleet_common::url::split_authority;

use super::{NginxOptions, TEMPLATE, TEMP_DIRS};
use crate::config::Fleet;
use crate::daemon::Cidr;

/// The resolved settings, before anything is written.
pub(super) struct NginxSettings {
    pub(super) dir: PathBuf,
    pub(super) listen: String,
    pub(super) https_port: u16,
    pub(super) redirect: Option<String>,
    pub(super) server_name: String,
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    pub(super) ca: PathBuf,
    pub(super) upstream: String,
    pub(super) upstream_name: String,
    pub(super) trust: Option<String>,
    pub(super) worker: Option<Worker>,
    pub(super) template: String,
}

/// The account of nginx's worker processes.
pub(super) struct Worker {
    pub(super) name: String,
    pub(super) group: String,
    pub(super) uid: u32,
    pub(super) gid: u32,
}

/// Resolves and checks every setting; makes the output directory (nothing is written yet).
pub(super) fn settings(fleet: &Fleet, o: &NginxOptions) -> Result<NginxSettings> {
    let cfg = &fleet.config.nginx;
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
    let (cert, key, ca) = certificates(fleet, o)?;
    let upstream = Upstream::of(fleet)?;
    let dir = out_dir(fleet, o)?;
    let worker = worker(o.user.clone().or_else(|| cfg.user.clone()))?;
    if let Some(w) = worker.as_ref().filter(|w| needs_group_access(w)) {
        check_reachable(&dir, w)?;
    }
    let template = match &cfg.template {
        Some(t) => {
            let t = in_fleet(fleet, t);
            std::fs::read_to_string(&t)
                .with_context(|| format!("cannot read the template {}", t.display()))?
        }
        None => TEMPLATE.to_string(),
    };
    Ok(NginxSettings {
        dir,
        listen,
        https_port,
        redirect,
        server_name,
        cert,
        key,
        ca,
        upstream: upstream.addr,
        upstream_name: upstream.name,
        trust: upstream.trust,
        worker,
        template,
    })
}

/// Flags are relative to the working directory, fleet.toml's paths to the fleet directory.
fn in_fleet(fleet: &Fleet, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        fleet.dir.join(p)
    }
}

/// The certificate and key nginx serves, and the CA it checks the controller with.
fn certificates(fleet: &Fleet, o: &NginxOptions) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let cfg = &fleet.config.nginx;
    let (cert, key) = match (&o.cert, &o.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        (None, None) => (
            cfg.cert
                .as_deref()
                .map(|p| in_fleet(fleet, p))
                .unwrap_or_else(|| fleet.server_pem()),
            cfg.key
                .as_deref()
                .map(|p| in_fleet(fleet, p))
                .unwrap_or_else(|| fleet.server_key()),
        ),
        _ => bail!("--cert and --key go together"),
    };
    let existing = |p: &Path, what: &str| {
        std::fs::canonicalize(p).with_context(|| format!("{what} {}", p.display()))
    };
    Ok((
        existing(&cert, "cannot read the certificate")?,
        existing(&key, "cannot read the key")?,
        existing(&fleet.ca_pem(), "cannot read the fleet CA")?,
    ))
}

/// The controller as nginx reaches it.
struct Upstream {
    /// `host:port` (`[v6]:port`).
    addr: String,
    /// The name nginx checks in the controller's certificate.
    name: String,
    trust: Option<String>,
}

impl Upstream {
    fn of(fleet: &Fleet) -> Result<Upstream> {
        let cfg = &fleet.config.nginx;
        let url = cfg
            .upstream
            .clone()
            .unwrap_or_else(|| fleet.config.controller.url.clone());
        if !url.starts_with("https://") {
            bail!("[nginx] upstream must be https:// (the controller has no plaintext listener)");
        }
        let hp = fleet_common::client::parse_base_url(&url)
            .map_err(|e| anyhow::anyhow!("[nginx] upstream: {e}"))?;
        let addr = hp.to_string();
        let host = hp.host;
        let name = match &cfg.upstream_name {
            Some(n) => n.clone(),
            None => upstream_name(&host, &fleet.config.controller.cert_names)?,
        };
        let trust = trust_hint(&host, &fleet.config.controller.trusted_proxies);
        Ok(Upstream { addr, name, trust })
    }
}

/// The output directory, made and canonical.
fn out_dir(fleet: &Fleet, o: &NginxOptions) -> Result<PathBuf> {
    let dir = match (&o.out, &fleet.config.nginx.out_dir) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) => in_fleet(fleet, d),
        (None, None) => fleet.dir.join("nginx"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(std::fs::canonicalize(&dir)?)
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

/// The port of an nginx `listen` value: `PORT`, `ADDR:PORT` or `[V6]:PORT` (a host name
/// too: nginx resolves it at start).
fn listen_port(s: &str) -> Result<u16> {
    if let Ok(p) = s.parse::<u16>() {
        return Ok(p);
    }
    match split_authority(s) {
        Some((_, Some(p))) => Ok(p),
        _ => bail!("{s:?} is not PORT or ADDR:PORT"),
    }
}

/// The host a browser reaches nginx at: `listen`'s address, `localhost` for a bare port or an
/// unspecified address.
pub(super) fn listen_host(listen: &str) -> String {
    if listen.parse::<u16>().is_ok() {
        return "localhost".into();
    }
    match split_authority(listen) {
        None => "localhost".into(),
        Some((h, _)) => match h.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() => "localhost".into(),
            Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
            _ => h,
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
pub(super) fn needs_group_access(w: &Worker) -> bool {
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

pub(super) fn share_with_group(p: &Path, w: &Worker, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(p, Some(0), Some(w.gid))
        .with_context(|| format!("cannot chown {}", p.display()))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

pub(super) fn make_dirs(plan: &NginxSettings) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_values_and_upstream_names() {
        assert_eq!(listen_port("443").unwrap(), 443);
        assert_eq!(listen_port("127.0.0.1:9443").unwrap(), 9443);
        assert_eq!(listen_port("[::]:443").unwrap(), 443);
        assert_eq!(listen_port("fleet.example:8443").unwrap(), 8443);
        assert!(listen_port("nope").is_err());
        assert_eq!(listen_host("0.0.0.0:443"), "localhost");
        assert_eq!(listen_host("127.0.0.1:9443"), "127.0.0.1");
        assert_eq!(listen_host("[::1]:9443"), "[::1]");
        assert_eq!(listen_host("[::]:443"), "localhost");
        assert_eq!(listen_host("fleet.example:8443"), "fleet.example");
        assert_eq!(listen_host("8443"), "localhost");
        let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        assert_eq!(upstream_name("127.0.0.1", &names).unwrap(), "localhost");
        assert_eq!(upstream_name("ctl.example", &names).unwrap(), "ctl.example");
        assert!(upstream_name("127.0.0.1", &["127.0.0.1".into()]).is_err());
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
}
