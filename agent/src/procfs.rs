//! What the agent reads from `/proc`: a worker's connection to the master (its "joined"
//! signal), the node's uptime (for the max lifetime) and the host name. Whether a process is
//! still alive is `fleet_common::process`'s.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// The socket inodes a process holds.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let mut out = HashSet::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for e in rd.flatten() {
        if let Ok(target) = std::fs::read_link(e.path()) {
            let t = target.to_string_lossy();
            if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                if let Ok(n) = n.parse() {
                    out.insert(n);
                }
            }
        }
    }
    out
}

/// Parses `/proc/net/tcp{,6}`'s `HEX:PORT` address (the words in host byte order).
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| {
        u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16)
            .ok()
            .map(|w| w.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            let v6 = Ipv6Addr::from(b);
            v6.to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether process `pid` has an established TCP connection to one of `remotes`.
pub fn connected_to(pid: u32, remotes: &[SocketAddr]) -> bool {
    if remotes.is_empty() {
        return false;
    }
    let inodes = socket_inodes(pid);
    if inodes.is_empty() {
        return false;
    }
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() < 10 || f[3] != "01" {
                continue;
            }
            let (Some(rem), Ok(inode)) = (parse_proc_addr(f[2]), f[9].parse::<u64>()) else {
                continue;
            };
            if inodes.contains(&inode) && remotes.contains(&rem) {
                return true;
            }
        }
    }
    false
}

/// How long this node (its PID 1, so a container's own boot too) has been up: the system's
/// uptime less PID 1's start time (`/proc/1/stat` field 22, in USER_HZ ticks, 100 on Linux).
pub fn node_uptime() -> Option<Duration> {
    const USER_HZ: f64 = 100.0;
    let up: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // Field 22 is the 20th after the command name (fields 1 and 2).
    let start: f64 = fleet_common::process::stat(1)?.get(19)?.parse().ok()?;
    Some(Duration::from_secs_f64((up - start / USER_HZ).max(0.0)))
}

/// The host name, else `fleet-agent`: the node id when neither the config nor IMDS names one.
pub fn default_node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "fleet-agent".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_addresses_parse() {
        // 127.0.0.1:5557 as the kernel prints it on a little-endian machine.
        let le = if cfg!(target_endian = "little") {
            "0100007F:15B5"
        } else {
            "7F000001:15B5"
        };
        assert_eq!(parse_proc_addr(le), Some("127.0.0.1:5557".parse().unwrap()));
        assert_eq!(parse_proc_addr("nonsense"), None);
    }

    #[test]
    fn the_node_has_been_up_for_a_while() {
        // PID 1 started before this test did, so its uptime is at least this process's.
        let up = node_uptime().expect("/proc/uptime and /proc/1/stat are readable");
        assert!(up > Duration::ZERO, "{up:?}");
    }
}
