//! Who a request comes from, for counting failed authentications (docs/security.md).
//!
//! The address is the TCP peer's, unless that peer is a trusted proxy
//! (`controller.trusted_proxies`): then it is the proxy's `X-Real-IP` header. `X-Real-IP` and
//! not `X-Forwarded-For`, because the nginx front sets it to the address it accepted the
//! connection from, replacing whatever the client sent, so it is one address and never
//! client-written; `X-Forwarded-For` is a list that nginx appends to, whose first entries are
//! whatever the client put there. A header from any other peer is ignored.
//!
//! Failures are then counted per [`failure_key`]: an IPv4 address, or the /64 an IPv6 address
//! belongs to (one host usually holds a whole /64, so counting single IPv6 addresses would
//! give it 2^64 allowances).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

/// The header a trusted proxy names the client's address in.
pub const REAL_IP_HEADER: &str = "x-real-ip";

/// An address or a network: `10.0.0.5`, `10.0.0.0/8`, `::1`, `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not an IP address or network (write 10.0.0.5, 10.0.0.0/8 or 2001:db8::/32)")]
pub struct BadCidr(String);

impl FromStr for Cidr {
    type Err = BadCidr;
    fn from_str(s: &str) -> Result<Cidr, BadCidr> {
        let bad = || BadCidr(s.to_string());
        let (a, p) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr = canonical(IpAddr::from_str(a).map_err(|_| bad())?);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
        };
        Ok(Cidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }
}

impl TryFrom<String> for Cidr {
    type Error = BadCidr;
    fn try_from(s: String) -> Result<Cidr, BadCidr> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let max = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == max {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

/// IPv4-mapped IPv6 (`::ffff:10.0.0.1`, what a `[::]` listener reports for IPv4 peers) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// The client's address: `peer`, or the `X-Real-IP` value when `peer` is a trusted proxy and
/// the value is one address. A trusted proxy that sends no usable header is the client.
pub fn client_ip(peer: IpAddr, real_ip: Option<&str>, trusted: &[Cidr]) -> IpAddr {
    let peer = canonical(peer);
    if !trusted.iter().any(|c| c.contains(peer)) {
        return peer;
    }
    real_ip
        .and_then(|v| IpAddr::from_str(v.trim()).ok())
        .map(canonical)
        .unwrap_or(peer)
}

/// What failures are counted under: the IPv4 address, or the IPv6 address's /64.
pub fn failure_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        v4 @ IpAddr::V4(_) => v4,
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & !u128::from(u64::MAX))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(s: &[&str]) -> Vec<Cidr> {
        s.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn addresses_and_networks_parse_and_match() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains(ip("10.200.0.1")));
        assert!(c.contains(ip("::ffff:10.9.9.9")), "IPv4-mapped IPv6");
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(
            !c.contains(ip("::a00:1")),
            "an IPv6 address is not in an IPv4 network"
        );
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert_eq!(one.to_string(), "127.0.0.1");
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")) && !v6.contains(ip("2001:db9::1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "nginx",
            "10.0.0.0/",
            "10.0.0/8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_header_counts_only_from_a_trusted_proxy() {
        let trusted = nets(&["127.0.0.1", "10.0.0.0/24"]);
        // From a trusted proxy: the header's address.
        assert_eq!(
            client_ip(ip("127.0.0.1"), Some("203.0.113.7"), &trusted),
            ip("203.0.113.7")
        );
        assert_eq!(
            client_ip(ip("::ffff:10.0.0.9"), Some(" 2001:db8::5 "), &trusted),
            ip("2001:db8::5")
        );
        // From anyone else: ignored.
        assert_eq!(
            client_ip(ip("198.51.100.1"), Some("203.0.113.7"), &trusted),
            ip("198.51.100.1")
        );
        assert_eq!(
            client_ip(ip("127.0.0.1"), Some("203.0.113.7"), &[]),
            ip("127.0.0.1")
        );
        // A trusted proxy without a usable header: the proxy itself.
        assert_eq!(client_ip(ip("127.0.0.1"), None, &trusted), ip("127.0.0.1"));
        assert_eq!(
            client_ip(ip("127.0.0.1"), Some("1.2.3.4, 5.6.7.8"), &trusted),
            ip("127.0.0.1"),
            "a list is not one address"
        );
    }

    #[test]
    fn ipv6_is_counted_by_its_64() {
        assert_eq!(
            failure_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            failure_key(ip("2001:db8:1:2::1")),
            failure_key(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            failure_key(ip("2001:db8:1:2::1")),
            failure_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(failure_key(ip("192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(failure_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }
}
