//! Serving the router over TLS, and what the controller does around `accept`: it serves at
//! most the connection cap (`nofile`) at once and sheds the excess in a way clients back off
//! from, instead of letting `accept` fail with `EMFILE` in a loop (docs/protocol.md,
//! "Connections").
//!
//! Past the cap, up to [`SHED_SLOTS`] connections at a time are answered over HTTP/1.1:
//! `/healthz` normally, anything else `503` with `Retry-After` ([`SHED_RETRY_AFTER_S`]), then
//! closed; beyond that a connection is closed as soon as it is accepted. The agent's client
//! treats both as a reason to wait before its next connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use axum::http::{header, HeaderValue};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::daemon::reload::CertResolver;
use crate::daemon::router::Peer;

/// Connections answered at once past the cap, each for at most [`SHED_TIMEOUT`].
pub const SHED_SLOTS: usize = 32;
/// What a shed connection is told to wait, in seconds.
pub const SHED_RETRY_AFTER_S: u64 = 5;
/// A shed connection's TLS handshake and one request must fit in this.
pub const SHED_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed `accept`, doubling per consecutive failure up to
/// [`ACCEPT_PAUSE_MAX`]: the listening socket stays readable while `accept` fails, so without
/// a pause the loop would spin.
pub const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
pub const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// At most one log line per this interval for a repeated condition (failing `accept`,
/// shedding), with the count of what it stands for.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// The rustls server config: the certificate from `certs` (exactly one chain and one private
/// key, swapped in place on reload: `reload::CertResolver`), ring as the explicit provider (as
/// in the client), session tickets and a session cache so clients that reconnect resume
/// instead of paying a full handshake. ALPN offers HTTP/2 first (an agent multiplexes its
/// long-poll, heartbeats and downloads over one connection), then HTTP/1.1 (nginx's upstream
/// connections, curl, old clients).
pub(super) fn tls_config(certs: Arc<CertResolver>) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(8192);
    cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(cfg))
}

/// Streams one HTTP/2 connection may carry at once. An agent uses three at most (long-poll,
/// heartbeat, bundle download); a browser on the dashboard and the Locust UI a few dozen.
pub const H2_MAX_STREAMS: u32 = 100;
/// The server pings an HTTP/2 connection that has been silent this long...
pub const H2_PING_INTERVAL: Duration = Duration::from_secs(60);
/// ...and closes it when the answer takes longer than this: a dead agent's connection (its
/// node terminated without a FIN) is reclaimed within 80 s. Live agents ping every 30 s
/// themselves, which keeps the server's pings from being needed.
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// An HTTP/1.1 connection must send a request's headers within this, idle keep-alive
/// connections included: it is also their idle timeout.
pub const H1_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection must complete its TLS handshake within this.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
async fn shed(tcp: TcpStream, acceptor: TlsAcceptor) {
    use axum::http::StatusCode;
    use fleet_common::wire::routes;
    use http_body_util::Full;

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

/// Serves `app` over TLS on `listener` until `shutdown` turns true, HTTP/2 or HTTP/1.1 as
/// ALPN chose. There is no plaintext path. At most `max_conns` connections are served at once;
/// past that they are shed ([`shed`]). A failing `accept` (`EMFILE` ...) pauses the loop,
/// longer each time, and is logged once per interval, not once per failure.
pub(super) async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    max_conns: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls.clone());
    let shed_acceptor = {
        let mut h1 = (*tls).clone();
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsAcceptor::from(Arc::new(h1))
    };
    let served = Arc::new(Semaphore::new(max_conns));
    let shedding = Arc::new(Semaphore::new(SHED_SLOTS));
    let (mut failures, mut accept_log, mut shed_log) =
        (0u32, Throttle::default(), Throttle::default());
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => {
                    failures = 0;
                    x
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if let Some(n) = accept_log.hit(Instant::now()) {
                        log!(
                            "accept failed {n} time(s) in {}s, last: {e}; pausing up to 1 s each \
                             time (raise LimitNOFILE or lower controller.max_connections)",
                            LOG_EVERY.as_secs()
                        );
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(accept_pause(failures)) => {}
                        _ = shutdown.changed() => return,
                    }
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = served.clone().try_acquire_owned() else {
            if let Some(n) = shed_log.hit(Instant::now()) {
                log!(
                    "at the cap of {max_conns} connections: shed {n} in {}s (503 with \
                     Retry-After, or closed); raise LimitNOFILE or controller.max_connections",
                    LOG_EVERY.as_secs()
                );
            }
            shed_excess(tcp, &shed_acceptor, &shedding);
            continue;
        };
        let conn = Conn {
            tcp,
            addr,
            permit,
            acceptor: acceptor.clone(),
        };
        tokio::spawn(conn.serve(app.clone(), shutdown.clone()));
    }
}

/// A connection past the cap: answered in one of the [`SHED_SLOTS`] if one is free, else
/// closed at once (dropped).
fn shed_excess(tcp: TcpStream, acceptor: &TlsAcceptor, slots: &Arc<Semaphore>) {
    if let Ok(slot) = slots.clone().try_acquire_owned() {
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            shed(tcp, acceptor).await;
            drop(slot);
        });
    }
}

/// One accepted connection under the cap, holding its permit until it closes.
struct Conn {
    tcp: TcpStream,
    addr: SocketAddr,
    permit: OwnedSemaphorePermit,
    acceptor: TlsAcceptor,
}

impl Conn {
    /// The TLS handshake, then HTTP/2 or HTTP/1.1 as ALPN chose, until the client leaves or
    /// `stop` turns true (then a graceful close of at most 2 s).
    async fn serve(self, app: Router, mut stop: watch::Receiver<bool>) {
        let _permit = self.permit;
        let _ = self.tcp.set_nodelay(true);
        let Ok(Ok(tls)) =
            tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, self.acceptor.accept(self.tcp)).await
        else {
            return;
        };
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let addr = self.addr;
        let svc = app.map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(Peer(addr));
            // HTTP/2 carries the host in `:authority`; handlers read `Host`.
            if !req.headers().contains_key(header::HOST) {
                if let Some(v) = req
                    .uri()
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                {
                    req.headers_mut().insert(header::HOST, v);
                }
            }
            req
        });
        let svc = hyper_util::service::TowerToHyperService::new(svc);
        let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(H1_HEADER_TIMEOUT);
        b.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_STREAMS)
            .keep_alive_interval(H2_PING_INTERVAL)
            .keep_alive_timeout(H2_PING_TIMEOUT);
        let b = if h2 { b.http2_only() } else { b.http1_only() };
        let conn = b.serve_connection(TokioIo::new(tls), svc);
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = stop.changed() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
