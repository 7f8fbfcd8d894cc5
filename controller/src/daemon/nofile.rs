//! The open-files limit and the connection cap under it (docs/protocol.md, "Connections").
//!
//! Every served connection holds one file descriptor; so do the listening socket, the Locust
//! master's pipes, the spec watcher, the connections to the master's web UI and to AWS, and the
//! files read while publishing. At start the controller raises its soft limit to the hard one
//! ([`raise_nofile`]); [`connection_cap`] then keeps [`reserved_fds`] of it for everything but
//! client connections. The listener sheds connections past the cap.

/// File descriptors kept for everything but client connections: at least this many...
pub const RESERVED_FDS_MIN: u64 = 256;
/// ...or this fraction of the limit (1/16), whichever is larger.
pub const RESERVED_FDS_DIVISOR: u64 = 16;

/// The soft open-files limit to ask for: the hard limit, or the kernel's per-process ceiling
/// (`/proc/sys/fs/nr_open`) when the hard limit is "unlimited", never lower than `soft`.
pub fn nofile_target(soft: u64, hard: u64, nr_open: Option<u64>) -> u64 {
    let ceiling = if hard == u64::MAX {
        nr_open.unwrap_or(1 << 20)
    } else {
        hard
    };
    ceiling.max(soft)
}

/// Descriptors kept for everything but client connections under a limit of `nofile`.
pub fn reserved_fds(nofile: u64) -> u64 {
    RESERVED_FDS_MIN.max(nofile / RESERVED_FDS_DIVISOR)
}

/// Connections served at once under an open-files limit of `nofile`; `configured` (0: none)
/// can only lower it. Never less than half the limit, so a tiny limit still serves.
pub fn connection_cap(nofile: u64, configured: usize) -> usize {
    let derived = nofile
        .saturating_sub(reserved_fds(nofile))
        .max(nofile / 2)
        .max(1);
    let derived = usize::try_from(derived).unwrap_or(usize::MAX);
    if configured == 0 {
        derived
    } else {
        configured.min(derived)
    }
}

/// The open-files limit before and after [`raise_nofile`].
#[derive(Debug, Clone, PartialEq)]
pub struct Nofile {
    pub before: u64,
    pub now: u64,
    pub hard: u64,
    /// Why it could not be raised, if it was meant to be.
    pub error: Option<String>,
}

impl std::fmt::Display for Nofile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hard = if self.hard == u64::MAX {
            "unlimited".to_string()
        } else {
            self.hard.to_string()
        };
        match &self.error {
            Some(e) => write!(
                f,
                "open files: soft limit {} (hard {hard}); raising it failed: {e}",
                self.now
            ),
            None if self.now > self.before => write!(
                f,
                "open files: soft limit raised from {} to {} (hard {hard})",
                self.before, self.now
            ),
            None => write!(f, "open files: soft limit {} (hard {hard})", self.now),
        }
    }
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit ([`nofile_target`]).
pub fn raise_nofile() -> Nofile {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            return Nofile {
                before: 1024,
                now: 1024,
                hard: 1024,
                error: Some(e.to_string()),
            }
        }
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let target = nofile_target(soft, hard, nr_open);
    let mut out = Nofile {
        before: soft,
        now: soft,
        hard,
        error: None,
    };
    if target > soft {
        match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
            Ok(()) => out.now = target,
            Err(e) => out.error = Some(e.to_string()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_goes_up_to_the_hard_one() {
        assert_eq!(nofile_target(1024, 524_288, Some(1_048_576)), 524_288);
        assert_eq!(
            nofile_target(1024, u64::MAX, Some(1_048_576)),
            1_048_576,
            "unlimited means the kernel's ceiling"
        );
        assert_eq!(nofile_target(1024, u64::MAX, None), 1 << 20);
        assert_eq!(nofile_target(4096, 4096, None), 4096);
    }

    #[test]
    fn the_cap_leaves_room_for_files_and_pipes() {
        assert_eq!(connection_cap(1024, 0), 768);
        assert_eq!(connection_cap(65_536, 0), 65_536 - 4096);
        assert_eq!(connection_cap(300, 0), 150, "half of a tiny limit");
        assert_eq!(connection_cap(1, 0), 1);
        assert_eq!(connection_cap(65_536, 500), 500, "a setting lowers it");
        assert_eq!(
            connection_cap(1024, 5000),
            768,
            "a setting cannot go over the limit"
        );
    }

    #[test]
    fn the_limit_is_reported_in_one_line() {
        let n = Nofile {
            before: 1024,
            now: 20_000,
            hard: 20_000,
            error: None,
        };
        assert_eq!(
            n.to_string(),
            "open files: soft limit raised from 1024 to 20000 (hard 20000)"
        );
        let same = Nofile {
            before: 20_000,
            ..n
        };
        assert_eq!(
            same.to_string(),
            "open files: soft limit 20000 (hard 20000)"
        );
    }
}
