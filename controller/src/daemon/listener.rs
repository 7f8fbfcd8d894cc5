//! What the controller does before and around `accept`: it raises its open-files limit, caps
//! the connections it serves below that limit, and sheds the excess in a way clients back off
//! from, instead of letting `accept` fail with `EMFILE` in a loop (docs/protocol.md,
//! "Connections").
//!
//! Every served connection holds one file descriptor; so do the listening socket, the Locust
//! master's pipes, the spec watcher, the connections to the master's web UI and to AWS, and the
//! files read while publishing. [`connection_cap`] keeps [`reserved_fds`] of the limit for
//! those. Past the cap, up to [`SHED_SLOTS`] connections at a time are answered over HTTP/1.1:
//! `/healthz` normally, anything else `503` with `Retry-After` ([`SHED_RETRY_AFTER_S`]), then
//! closed; beyond that a connection is closed as soon as it is accepted. The agent's client
//! treats both as a reason to wait before its next connection.

use std::time::{Duration, Instant};

/// Connections answered at once past the cap, each for at most [`SHED_TIMEOUT`].
pub const SHED_SLOTS: usize = 32;
/// What a shed connection is told to wait, in seconds.
pub const SHED_RETRY_AFTER_S: u64 = 5;
/// A shed connection's TLS handshake and one request must fit in this.
pub const SHED_TIMEOUT: Duration = Duration::from_secs(5);
/// File descriptors kept for everything but client connections: at least this many...
pub const RESERVED_FDS_MIN: u64 = 256;
/// ...or this fraction of the limit (1/16), whichever is larger.
pub const RESERVED_FDS_DIVISOR: u64 = 16;
/// Pause after a failed `accept`, doubling per consecutive failure up to
/// [`ACCEPT_PAUSE_MAX`]: the listening socket stays readable while `accept` fails, so without
/// a pause the loop would spin.
pub const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
pub const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// At most one log line per this interval for a repeated condition (failing `accept`,
/// shedding), with the count of what it stands for.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

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

/// One line per [`LOG_EVERY`] for a condition that may repeat thousands of times a second.
#[derive(Debug, Default)]
pub struct Throttle {
    last: Option<Instant>,
    /// Occurrences not logged since the last line.
    pub held: u64,
}

impl Throttle {
    /// `Some(count)` when a line is due, with the occurrences it stands for (this one
    /// included).
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        self.held += 1;
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < LOG_EVERY)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

/// The pause after the `n`-th consecutive failed `accept` (n ≥ 1).
pub fn accept_pause(n: u32) -> Duration {
    ACCEPT_PAUSE_MIN
        .saturating_mul(1 << n.saturating_sub(1).min(16))
        .min(ACCEPT_PAUSE_MAX)
}

/// Answers one connection past the cap: the TLS handshake (HTTP/1.1 only), then `/healthz`
/// as usual and anything else `503` with `Retry-After`, then close; all within
/// [`SHED_TIMEOUT`].
pub async fn shed(tcp: tokio::net::TcpStream, acceptor: tokio_rustls::TlsAcceptor) {
    use axum::http::{header, StatusCode};
    use fleet_common::wire::routes;
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;

    let svc = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
        let mut resp = hyper::Response::new(Full::new(bytes::Bytes::from_static(
            b"controller at its connection limit; retry later\n",
        )));
        if req.uri().path() == routes::HEALTH {
            *resp.body_mut() = Full::new(bytes::Bytes::from_static(b"ok\n"));
        } else {
            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(SHED_RETRY_AFTER_S),
            );
        }
        resp.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        Ok::<_, std::convert::Infallible>(resp)
    });
    let _ = tokio::time::timeout(SHED_TIMEOUT, async move {
        let tls = acceptor.accept(tcp).await.ok()?;
        hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .serve_connection(TokioIo::new(tls), svc)
            .await
            .ok()
    })
    .await;
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
    fn accept_failures_pause_longer_each_time_up_to_a_second() {
        let p: Vec<u128> = (1..=9).map(|n| accept_pause(n).as_millis()).collect();
        assert_eq!(p, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert_eq!(accept_pause(u32::MAX), ACCEPT_PAUSE_MAX);
    }

    #[test]
    fn a_repeated_condition_logs_once_per_interval_with_its_count() {
        let t0 = Instant::now();
        let mut th = Throttle::default();
        assert_eq!(th.hit(t0), Some(1));
        for i in 1..1000 {
            assert_eq!(th.hit(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(th.hit(t0 + LOG_EVERY), Some(1000));
        assert_eq!(th.hit(t0 + LOG_EVERY + Duration::from_secs(1)), None);
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
