//! A small HTTPS client for talking to the controller over rustls, trusting only the fleet CA.
//! Used by the agent (so it needs no HTTP client framework) and by the CLI.
//!
//! One `Client` (and every clone of it) keeps one TLS connection to the controller and sends
//! all its requests over it: the agent's long-poll, its heartbeats and its bundle downloads
//! share a single HTTP/2 connection (ALPN `h2`), one stream each. A server that offers only
//! HTTP/1.1 (ALPN `http/1.1`, or none) gets keep-alive connections instead, one per request in
//! flight: an idle one is reused, a busy one never is, and at most [`MAX_IDLE_H1`] idle ones
//! are kept.
//!
//! New connections are made one at a time. When the connection drops, the next one is made
//! after a short random delay (so a thousand agents that lost the same controller do not all
//! come back in the same millisecond); failed attempts then back off exponentially with
//! jitter ([`Backoff`]). A `503` with `Retry-After` (what a controller at its connection cap
//! answers) also holds back the next connection for that long. rustls keeps a session cache
//! in the shared `ClientConfig`, so reconnects resume TLS sessions.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST, RETRY_AFTER};
use hyper::{Method, Request, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::url::HostPort;

/// Delay before the first retry after a failed connection attempt; it doubles per failure.
pub const RECONNECT_INITIAL: Duration = Duration::from_millis(200);
/// Cap on the delay between connection attempts.
pub const RECONNECT_MAX: Duration = Duration::from_secs(10);
/// Idle HTTP/1.1 connections kept for reuse (HTTP/2 needs only one connection).
pub const MAX_IDLE_H1: usize = 4;
/// HTTP/2 pings on an idle connection, so a connection that died silently (a NAT that forgot
/// it, a controller host that vanished) is noticed and replaced before the next request.
pub const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
/// A ping unanswered for this long closes the connection.
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `Retry-After` honoured, so a confused server cannot park a client for hours.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("controller URL {0:?} must look like https://host:port")]
    BadUrl(String),
    #[error("fleet CA: {0}")]
    BadCa(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP error talking to {addr}: {source}")]
    Http { addr: String, source: hyper::Error },
    #[error("response body from {addr} exceeds {limit} bytes")]
    Body { addr: String, limit: usize },
    #[error("response body from {addr} broke off: {source}")]
    BodyBroken { addr: String, source: hyper::Error },
    #[error("response from {addr} stalled: no data for {after:?}")]
    Stalled { addr: String, after: Duration },
    #[error("request to {addr} timed out after {after:?}")]
    Timeout { addr: String, after: Duration },
}

impl ClientError {
    /// Whether trying again later may succeed: everything but a bad URL or CA, and a body
    /// over the caller's limit (the answer itself is wrong, not the way it came).
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            ClientError::BadUrl(_) | ClientError::BadCa(_) | ClientError::Body { .. }
        )
    }

    /// Whether the controller could not be reached at all (as opposed to a bad answer): no
    /// connection, a timeout, a connection the server closed during the handshake (a
    /// controller at its connection cap does that) or before answering.
    pub fn is_unreachable(&self) -> bool {
        use std::io::ErrorKind::*;
        match self {
            ClientError::Connect { .. } | ClientError::Timeout { .. } => true,
            ClientError::Tls { source, .. } => matches!(
                source.kind(),
                UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
            ),
            ClientError::Http { source, .. } => {
                source.is_closed() || source.is_incomplete_message() || source.is_canceled()
            }
            _ => false,
        }
    }
}

/// An answer with its body read.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// When the next connection attempt may start: a pure state machine driven by the outcome
/// of each attempt, `now` and a jitter fraction in [0, 1).
///
/// - After an established connection drops: wait `jitter × RECONNECT_INITIAL` (0-200 ms).
/// - After the n-th consecutive failed attempt: `d = min(RECONNECT_MAX, RECONNECT_INITIAL ×
///   2^(n-1))`, wait `d/2 + jitter × d/2` (200 ms, 400 ms, 800 ms ... 10 s, each 50-100 %).
/// - After a `503` with `Retry-After: s`: wait at least `s` (capped at [`MAX_RETRY_AFTER`])
///   plus up to half of it again.
/// - A successful connection clears the failures.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Backoff {
    failures: u32,
    not_before: Option<Instant>,
}

impl Backoff {
    /// How long to wait before the next attempt.
    pub fn wait(&self, now: Instant) -> Duration {
        self.not_before
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or_default()
    }

    pub fn connected(&mut self) {
        self.failures = 0;
        self.not_before = None;
    }

    pub fn failed(&mut self, now: Instant, jitter: f64) {
        self.failures = self.failures.saturating_add(1);
        let d = RECONNECT_INITIAL
            .saturating_mul(1 << (self.failures - 1).min(16))
            .min(RECONNECT_MAX);
        self.push(now + d / 2 + d.mul_f64(jitter.clamp(0.0, 1.0) / 2.0));
    }

    pub fn dropped(&mut self, now: Instant, jitter: f64) {
        self.push(now + RECONNECT_INITIAL.mul_f64(jitter.clamp(0.0, 1.0)));
    }

    pub fn retry_after(&mut self, now: Instant, after: Duration, jitter: f64) {
        let after = after.min(MAX_RETRY_AFTER);
        self.push(now + after + after.mul_f64(jitter.clamp(0.0, 1.0) / 2.0));
    }

    fn push(&mut self, t: Instant) {
        self.not_before = Some(self.not_before.map_or(t, |old| old.max(t)));
    }
}

/// A fraction in [0, 1) that differs between processes and calls: std's `RandomState` is
/// seeded from the OS once per process, so no RNG crate is needed for spreading reconnects.
fn jitter() -> f64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Seconds of a `Retry-After` header (the delta-seconds form; an HTTP date is ignored).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Splits `https://host:port[/]` into host and port.
pub fn parse_base_url(url: &str) -> Result<HostPort, ClientError> {
    match crate::url::split_url(url, "https", 443) {
        Some((hp, path)) if path.is_empty() => Ok(hp),
        _ => Err(ClientError::BadUrl(url.to_string())),
    }
}

/// A rustls client config trusting exactly the certificates in `ca_pem` (no ALPN: the
/// [`Client`] adds its own).
pub fn tls_config(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut ca_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| ClientError::BadCa(e.to_string()))?;
    if certs.is_empty() {
        return Err(ClientError::BadCa("no PEM certificate found".into()));
    }
    for c in certs {
        roots
            .add(c)
            .map_err(|e| ClientError::BadCa(e.to_string()))?;
    }
    // The provider is chosen explicitly rather than through a process-wide default: both
    // binaries link only ring, and an explicit provider cannot be changed under us by a
    // dependency installing another one.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::BadCa(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

type Body = Full<Bytes>;

/// A connection to send one request on.
enum Sender {
    H2(http2::SendRequest<Body>),
    H1(http1::SendRequest<Body>),
}

#[derive(Default)]
struct Pool {
    h2: Option<http2::SendRequest<Body>>,
    idle_h1: Vec<http1::SendRequest<Body>>,
    backoff: Backoff,
}

struct Inner {
    addr: HostPort,
    server_name: ServerName<'static>,
    host_header: HeaderValue,
    /// `https://host:port`, the authority of HTTP/2 requests.
    origin: String,
    tls: TlsConnector,
    /// Replaceable while requests run ([`Client::set_auth`]): the agent picks up a new token.
    auth: std::sync::RwLock<Option<HeaderValue>>,
    pool: Mutex<Pool>,
    /// Held while a new connection is being made, so there is one attempt at a time.
    dial: tokio::sync::Mutex<()>,
}

/// Clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// `auth` is the whole `Authorization` header value (`Bearer …` or `Basic …`).
    pub fn new(base_url: &str, ca_pem: &str, auth: Option<&str>) -> Result<Client, ClientError> {
        let hp = parse_base_url(base_url)?;
        let server_name = ServerName::try_from(hp.host.clone())
            .map_err(|_| ClientError::BadUrl(base_url.to_string()))?;
        let authority = hp.to_string();
        let host_header = HeaderValue::from_str(&authority)
            .map_err(|_| ClientError::BadUrl(base_url.to_string()))?;
        let auth = auth.map(auth_header).transpose()?;
        let mut tls = Arc::unwrap_or_clone(tls_config(ca_pem)?);
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Client {
            inner: Arc::new(Inner {
                addr: hp,
                server_name,
                host_header,
                origin: format!("https://{authority}"),
                tls: TlsConnector::from(Arc::new(tls)),
                auth: std::sync::RwLock::new(auth),
                pool: Mutex::new(Pool::default()),
                dial: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Sends `auth` (the whole `Authorization` value) with every request from now on, on
    /// this client and all its clones; requests already sent keep the old one.
    pub fn set_auth(&self, auth: &str) -> Result<(), ClientError> {
        *self.inner.auth.write().unwrap() = Some(auth_header(auth)?);
        Ok(())
    }

    /// Whether `auth` is the `Authorization` value sent now.
    pub fn sends_auth(&self, auth: &str) -> bool {
        self.inner
            .auth
            .read()
            .unwrap()
            .as_ref()
            .is_some_and(|a| a.as_bytes() == auth.as_bytes())
    }

    pub fn addr(&self) -> String {
        self.inner.addr.to_string()
    }

    pub async fn get(
        &self,
        path: &str,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Response, ClientError> {
        self.request(Method::GET, path, None, timeout, max_body)
            .await
    }

    pub async fn post_json(
        &self,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        self.request(
            Method::POST,
            path,
            Some(("application/json", body)),
            timeout,
            1 << 20,
        )
        .await
    }

    /// One request with its answer read, within `timeout` (waiting for a connection
    /// included).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Response, ClientError> {
        let addr = self.addr();
        match tokio::time::timeout(
            timeout,
            self.request_inner(method, path, body, max_body, None),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => {
                // No answer in time: the shared connection may be dead without knowing it yet.
                self.forget_h2();
                Err(ClientError::Timeout {
                    addr,
                    after: timeout,
                })
            }
        }
    }

    /// A GET for a large body with no overall deadline: it fails once no data arrived for
    /// `idle` (for the answer's head or any part of its body), so a slow but moving download
    /// completes and a stalled one is given up quickly.
    pub async fn download(
        &self,
        path: &str,
        idle: Duration,
        max_body: usize,
    ) -> Result<Response, ClientError> {
        let r = self
            .request_inner(Method::GET, path, None, max_body, Some(idle))
            .await;
        if let Err(ClientError::Stalled { .. }) = r {
            self.forget_h2();
        }
        r
    }

    /// Drops the shared HTTP/2 connection, so the next request dials a new one. Requests
    /// already on it keep it until they end.
    fn forget_h2(&self) {
        self.inner.pool.lock().unwrap().h2 = None;
    }

    fn http_err(&self, source: hyper::Error) -> ClientError {
        ClientError::Http {
            addr: self.addr(),
            source,
        }
    }

    async fn request_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
        max_body: usize,
        idle: Option<Duration>,
    ) -> Result<Response, ClientError> {
        let inner = &self.inner;
        let mut req = Request::builder().method(method);
        if let Some(a) = inner.auth.read().unwrap().clone() {
            req = req.header(AUTHORIZATION, a);
        }
        let payload = match body {
            Some((ct, b)) => {
                req = req.header(CONTENT_TYPE, ct);
                Bytes::from(b)
            }
            None => Bytes::new(),
        };
        let mut req = req
            .body(Full::new(payload))
            .map_err(|_| ClientError::BadUrl(path.to_string()))?;
        let bad_path = || ClientError::BadUrl(path.to_string());
        // A connection taken from the pool may turn out closed before the request went out
        // (the server timed it out a moment ago): then the same request goes out once more on
        // a fresh connection. A request that was sent is never repeated here.
        let mut attempts = 0;
        let resp = loop {
            attempts += 1;
            let (sender, reused) = self.checkout().await?;
            let sent = match sender {
                Sender::H2(mut s) => {
                    *req.uri_mut() = format!("{}{path}", inner.origin)
                        .parse::<Uri>()
                        .map_err(|_| bad_path())?;
                    req.headers_mut().remove(HOST);
                    within(idle, &inner.host_header, s.try_send_request(req))
                        .await?
                        .map(|r| (r, None))
                }
                Sender::H1(mut s) => {
                    *req.uri_mut() = path.parse::<Uri>().map_err(|_| bad_path())?;
                    req.headers_mut().insert(HOST, inner.host_header.clone());
                    let r = within(idle, &inner.host_header, s.try_send_request(req)).await?;
                    r.map(|r| (r, Some(s)))
                }
            };
            match sent {
                Ok(r) => break r,
                Err(mut e) => match e.take_message() {
                    Some(back) if reused && attempts < 2 => req = back,
                    _ => return Err(self.http_err(e.into_error())),
                },
            }
        };
        let ((parts, body), h1) = (resp.0.into_parts(), resp.1);
        let body = read_body(body, max_body, idle, &inner.host_header).await?;
        let retry_after = (parts.status == hyper::StatusCode::SERVICE_UNAVAILABLE)
            .then(|| parts.headers.get(RETRY_AFTER))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        {
            let mut pool = inner.pool.lock().unwrap();
            if let Some(after) = retry_after {
                pool.backoff.retry_after(Instant::now(), after, jitter());
            }
            // Not `is_ready()`: the connection becomes ready for the next request only once
            // its driver has seen this answer end, a moment from now; checkout waits for that.
            if let Some(s) = h1 {
                if !s.is_closed() && pool.idle_h1.len() < MAX_IDLE_H1 {
                    pool.idle_h1.push(s);
                }
            }
        }
        Ok(Response {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }

    /// The shared HTTP/2 connection, an idle HTTP/1.1 one, or a new connection; `true` when
    /// the connection had been used before.
    async fn checkout(&self) -> Result<(Sender, bool), ClientError> {
        if let Some(s) = self.pooled().await {
            return Ok((s, true));
        }
        let _dial = self.inner.dial.lock().await;
        // Another request may have connected while this one waited for its turn.
        if let Some(s) = self.pooled().await {
            return Ok((s, true));
        }
        let wait = self.inner.pool.lock().unwrap().backoff.wait(Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let res = self.connect().await;
        let mut pool = self.inner.pool.lock().unwrap();
        match res {
            Ok(Sender::H2(s)) => {
                pool.backoff.connected();
                pool.h2 = Some(s.clone());
                Ok((Sender::H2(s), false))
            }
            Ok(s) => {
                pool.backoff.connected();
                Ok((s, false))
            }
            Err(e) => {
                pool.backoff.failed(Instant::now(), jitter());
                Err(e)
            }
        }
    }

    async fn pooled(&self) -> Option<Sender> {
        {
            let mut pool = self.inner.pool.lock().unwrap();
            if let Some(h2) = &pool.h2 {
                if !h2.is_closed() {
                    return Some(Sender::H2(h2.clone()));
                }
                pool.h2 = None;
                pool.backoff.dropped(Instant::now(), jitter());
            }
        }
        loop {
            let mut s = self.inner.pool.lock().unwrap().idle_h1.pop()?;
            // Ready once the previous answer has been taken off the connection; an error when
            // the server closed it meanwhile (then the next idle one, or a new connection).
            if !s.is_closed() && s.ready().await.is_ok() {
                return Some(Sender::H1(s));
            }
        }
    }

    async fn connect(&self) -> Result<Sender, ClientError> {
        let inner = &self.inner;
        let addr = self.addr();
        let tcp = TcpStream::connect((inner.addr.host.as_str(), inner.addr.port))
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let tls = inner
            .tls
            .connect(inner.server_name.clone(), tcp)
            .await
            .map_err(|source| ClientError::Tls {
                addr: addr.clone(),
                source,
            })?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        if h2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(H2_PING_INTERVAL)
                .keep_alive_timeout(H2_PING_TIMEOUT)
                .keep_alive_while_idle(true)
                .handshake(io)
                .await
                .map_err(|e| self.http_err(e))?;
            // The connection lives until every clone of this client is gone (or it breaks).
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = http1::handshake(io).await.map_err(|e| self.http_err(e))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Sender::H1(sender))
        }
    }
}

/// An `Authorization` value, marked sensitive (hyper keeps it out of debug output).
fn auth_header(auth: &str) -> Result<HeaderValue, ClientError> {
    let mut v = HeaderValue::from_str(auth)
        .map_err(|_| ClientError::BadUrl("bad credential characters".into()))?;
    v.set_sensitive(true);
    Ok(v)
}

/// `fut`, failing as [`ClientError::Stalled`] if `idle` passes first.
async fn within<T>(
    idle: Option<Duration>,
    addr: &HeaderValue,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, ClientError> {
    match idle {
        None => Ok(fut.await),
        Some(after) => tokio::time::timeout(after, fut)
            .await
            .map_err(|_| ClientError::Stalled {
                addr: addr.to_str().unwrap_or("?").to_string(),
                after,
            }),
    }
}

/// Reads a whole body of at most `max` bytes, each frame within `idle` of the last.
async fn read_body(
    mut body: hyper::body::Incoming,
    max: usize,
    idle: Option<Duration>,
    addr: &HeaderValue,
) -> Result<Bytes, ClientError> {
    let addr_str = || addr.to_str().unwrap_or("?").to_string();
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = within(idle, addr, body.frame()).await? {
        let frame = frame.map_err(|source| ClientError::BodyBroken {
            addr: addr_str(),
            source,
        })?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > max {
                return Err(ClientError::Body {
                    addr: addr_str(),
                    limit: max,
                });
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(
            parse_base_url("https://127.0.0.1:8443")
                .unwrap()
                .to_string(),
            "127.0.0.1:8443"
        );
        assert_eq!(
            parse_base_url("https://ctl.example/").unwrap().to_string(),
            "ctl.example:443"
        );
        assert_eq!(parse_base_url("https://[::1]:9").unwrap().host, "::1");
        assert!(parse_base_url("http://x:1").is_err());
        assert!(parse_base_url("https://x:1/path").is_err());
        assert!(parse_base_url("https://x:notaport").is_err());
    }

    #[test]
    fn failed_attempts_back_off_exponentially_up_to_the_cap() {
        let now = Instant::now();
        let mut b = Backoff::default();
        assert_eq!(b.wait(now), Duration::ZERO, "a new client connects at once");
        let mut waits = vec![];
        for _ in 0..10 {
            b.failed(now, 0.0);
            waits.push(b.wait(now).as_millis());
        }
        assert_eq!(
            waits,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]
        );
        b.failed(now, 0.999_999);
        assert!(b.wait(now) > RECONNECT_MAX - Duration::from_millis(1));
        assert!(b.wait(now) <= RECONNECT_MAX);
        b.connected();
        b.failed(now, 0.0);
        assert_eq!(b.wait(now), RECONNECT_INITIAL / 2, "a success starts over");
    }

    #[test]
    fn a_dropped_connection_is_replaced_within_the_first_step_spread_by_jitter() {
        let now = Instant::now();
        let mut early = Backoff::default();
        early.dropped(now, 0.0);
        assert_eq!(early.wait(now), Duration::ZERO);
        let mut late = Backoff::default();
        late.dropped(now, 0.5);
        assert_eq!(late.wait(now), RECONNECT_INITIAL / 2);
        assert_eq!(
            late.wait(now + Duration::from_secs(1)),
            Duration::ZERO,
            "the wait is measured from the drop"
        );
    }

    #[test]
    fn retry_after_holds_back_the_next_connection_and_is_capped() {
        let now = Instant::now();
        let mut b = Backoff::default();
        b.retry_after(now, Duration::from_secs(5), 0.0);
        assert_eq!(b.wait(now), Duration::from_secs(5));
        b.dropped(now, 0.9);
        assert_eq!(
            b.wait(now),
            Duration::from_secs(5),
            "a drop does not shorten it"
        );
        let mut c = Backoff::default();
        c.retry_after(now, Duration::from_secs(86_400), 1.0);
        assert_eq!(c.wait(now), MAX_RETRY_AFTER * 3 / 2);
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn jitter_is_a_fraction_that_varies() {
        let v: Vec<f64> = (0..20).map(|_| jitter()).collect();
        assert!(v.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(v.windows(2).any(|w| w[0] != w[1]));
    }
}
