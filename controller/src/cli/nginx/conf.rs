//! The nginx config itself: the template, its placeholders and sections, the values that may
//! go into it, and the SHA-512-crypt hash nginx checks the UI password with.

use std::path::Path;

use anyhow::{bail, Result};
use ring::rand::{SecureRandom, SystemRandom};

use super::settings::NginxSettings;
use super::HTPASSWD_FILE;

/// SHA-512-crypt rounds: crypt()'s default, so the hash carries no `rounds=` field. nginx
/// hashes on every request it authenticates (it caches nothing); the password is 20 random
/// characters, so more rounds would cost nginx CPU without making it harder to guess.
const CRYPT_ROUNDS: usize = 5_000;
const CRYPT_SALT_LEN: usize = 16;
const CRYPT_ALPHABET: &[u8; 64] =
    b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

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

pub(super) fn render_conf(plan: &NginxSettings) -> Result<String> {
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
    fn the_template_sends_the_controllers_security_headers_once_each() {
        let t = super::super::TEMPLATE.to_ascii_lowercase();
        for (name, value) in crate::daemon::headers::SECURITY_HEADERS {
            let add = format!("add_header {name} \"{value}\" always;").to_ascii_lowercase();
            assert_eq!(t.matches(&add).count(), 1, "{add}");
            let hide = format!("proxy_hide_header {name};");
            assert_eq!(t.matches(&hide).count(), 1, "{hide}");
        }
        assert_eq!(
            t.lines()
                .filter(|l| l.trim_start().starts_with("add_header "))
                .count(),
            crate::daemon::headers::SECURITY_HEADERS.len(),
            "an add_header elsewhere would stop a location inheriting the set"
        );
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
}
