//! Host and port out of a URL or a `host[:port]` value, parsed by `http::Uri` (through hyper,
//! which both programs link already): the one address parser of fleet. The controller's URL,
//! the IMDS endpoint and nginx's `listen` values all go through it, and [`HostPort`] writes
//! the `host:port` form back (an IPv6 address in brackets) for Host headers and upstreams.

use std::fmt;

use hyper::http::uri::Authority;
use hyper::Uri;

/// A host (an IPv6 address without its brackets) and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    /// `host:port`, or `[v6]:port`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Splits `host[:port]` (`[v6]:port` too). `None` for an empty host, a bad or empty port, or
/// credentials (`user@host`).
pub fn split_authority(s: &str) -> Option<(String, Option<u16>)> {
    if s.contains('@') {
        return None;
    }
    let a: Authority = s.parse().ok()?;
    let host = a.host();
    // What follows the host: nothing, or `:PORT` (Authority lets a port that is no number
    // through, and `port_u16` cannot tell it from no port).
    let port = match a.as_str()[host.len()..].strip_prefix(':') {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok()?),
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port))
}

/// Splits `scheme://host[:port][/path]` into its host and port (`default_port` when none is
/// given) and its path without a trailing `/`. `None` for another scheme, no host,
/// credentials, a query or a fragment.
pub fn split_url(url: &str, scheme: &str, default_port: u16) -> Option<(HostPort, String)> {
    if url.contains('#') {
        return None;
    }
    let uri: Uri = url.parse().ok()?;
    if !uri.scheme_str()?.eq_ignore_ascii_case(scheme) || uri.query().is_some() {
        return None;
    }
    let (host, port) = split_authority(uri.authority()?.as_str())?;
    let hp = HostPort {
        host,
        port: port.unwrap_or(default_port),
    };
    Some((hp, uri.path().trim_end_matches('/').to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(host: &str, port: u16) -> HostPort {
        HostPort {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn authorities_split_into_host_and_port() {
        let s = |a: &str| split_authority(a);
        assert_eq!(s("127.0.0.1:9443"), Some(("127.0.0.1".into(), Some(9443))));
        assert_eq!(s("[::]:443"), Some(("::".into(), Some(443))));
        assert_eq!(
            s("fleet.example:8443"),
            Some(("fleet.example".into(), Some(8443)))
        );
        assert_eq!(s("fleet.example"), Some(("fleet.example".into(), None)));
        for bad in ["", ":80", "h:port", "h:", "h:70000", "u@h:1", "[::1"] {
            assert_eq!(s(bad), None, "{bad}");
        }
    }

    #[test]
    fn urls_split_into_host_port_and_path() {
        let u = |url: &str| split_url(url, "http", 80);
        assert_eq!(
            u("http://169.254.169.254"),
            Some((hp("169.254.169.254", 80), "".into()))
        );
        assert_eq!(
            u("http://127.0.0.1:9999/i-0abc/"),
            Some((hp("127.0.0.1", 9999), "/i-0abc".into()))
        );
        assert_eq!(
            u("HTTP://[fd00:ec2::254]/"),
            Some((hp("fd00:ec2::254", 80), "".into()))
        );
        for bad in [
            "https://h",
            "h",
            "http://",
            "http://:80",
            "http://h:port",
            "http://u@h",
            "http://h/p?q=1",
            "http://h/p#f",
        ] {
            assert_eq!(u(bad), None, "{bad}");
        }
    }

    #[test]
    fn host_and_port_are_written_back_with_brackets_for_ipv6() {
        assert_eq!(hp("127.0.0.1", 8443).to_string(), "127.0.0.1:8443");
        assert_eq!(hp("::1", 9).to_string(), "[::1]:9");
    }
}
