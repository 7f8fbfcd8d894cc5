//! A minimal IMDSv2 client: what the agent reads from EC2's instance metadata service at start.
//!
//! Plain HTTP/1.1 (IMDS has no TLS) with hyper's client connection over a tokio `TcpStream`, one
//! connection per request, as `fleet_common::client` does over TLS. No AWS SDK: the agent stays
//! small. IMDSv2 only (the session-token protocol):
//! 1. `PUT <base>/latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds: 21600`;
//! 2. `GET <base>/latest/user-data` and `GET <base>/latest/meta-data/instance-id` with
//!    `X-aws-ec2-metadata-token: <token>`.
//!
//! The base URI is a parameter ([`ImdsClient::new`]), so tests run against a local server;
//! [`endpoint_from_env`] picks it the way AWS SDKs do. This module only fetches bytes: turning
//! user-data into configuration is `config::resolve`'s job, tested on strings.

use std::fmt;
use std::time::Duration;

use fleet_common::url::{split_url, HostPort};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::header::{HeaderValue, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::{Env, UserData};

/// IMDS's IPv4 address, used unless the environment names another endpoint.
pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
/// IMDS's IPv6 address (Nitro instances), chosen by `AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6`.
pub const DEFAULT_ENDPOINT_IPV6: &str = "http://[fd00:ec2::254]";
/// Overrides the endpoint, as in AWS SDKs: a base URL such as `http://127.0.0.1:9999/i-0abc`.
pub const ENDPOINT_ENV: &str = "AWS_EC2_METADATA_SERVICE_ENDPOINT";
/// `IPv4` (default) or `IPv6`: which default endpoint to use, as in AWS SDKs.
pub const ENDPOINT_MODE_ENV: &str = "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE";

/// Session token lifetime asked for, seconds (6 h, the maximum). The agent reads everything it
/// needs within seconds, so the token never has to be renewed except after an IMDS restart.
pub const TOKEN_TTL_SECONDS: &str = "21600";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";

pub const TOKEN_PATH: &str = "/latest/api/token";
pub const USER_DATA_PATH: &str = "/latest/user-data";
pub const INSTANCE_ID_PATH: &str = "/latest/meta-data/instance-id";

/// Every request (connect, answer and body) must finish within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Waits before each retry of one request after a connect error, a timeout, a broken answer or
/// a 5xx: 0.25, 0.5, 1, 2, 4 s. That is six attempts and 7.75 s of waiting (at most ~20 s with
/// every attempt timing out) before IMDS counts as unreachable. Retries exist because right
/// after boot the unit may start before the network is up, and IMDS can be slow to answer.
/// A 4xx is an answer, not an outage: it is never retried (401 is handled by re-tokening).
pub const RETRY_DELAYS: [Duration; 5] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

/// EC2 caps user-data at 16 KB (before base64); IMDS serves it decoded.
pub const MAX_USER_DATA: usize = 16 * 1024;
/// Tokens and instance ids are short; anything longer is not IMDS.
const MAX_SMALL_ANSWER: usize = 4096;

#[derive(Debug)]
pub enum ImdsError {
    /// The endpoint is not an `http://host[:port][/path]` URL.
    BadEndpoint { url: String, why: String },
    /// No answer after every attempt: connect errors, timeouts, broken answers or 5xx.
    Unreachable {
        endpoint: String,
        attempts: usize,
        last: String,
    },
    /// The token request was refused (403: IMDS turned off; 404/405: no IMDSv2 there).
    Disabled { endpoint: String, status: u16 },
    /// Any other unexpected status.
    Status {
        endpoint: String,
        request: String,
        status: u16,
    },
    /// An answer over its size cap.
    TooLarge {
        endpoint: String,
        path: String,
        limit: usize,
    },
    /// An answer that cannot be what IMDS sends (an empty token, a non-UTF-8 instance id).
    BadAnswer { endpoint: String, what: String },
}

impl ImdsError {
    /// IMDS could not be used at all, as opposed to IMDS answering something wrong. The caller
    /// may go on without user-data when it does not need it.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            ImdsError::Unreachable { .. } | ImdsError::Disabled { .. }
        )
    }
}

impl fmt::Display for ImdsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImdsError::BadEndpoint { url, why } => write!(f, "IMDS endpoint {url:?}: {why}"),
            ImdsError::Unreachable {
                endpoint,
                attempts,
                last,
            } => write!(
                f,
                "IMDS at {endpoint} unreachable after {attempts} attempts ({last})"
            ),
            ImdsError::Disabled { endpoint, status } => write!(
                f,
                "IMDSv2 is not available at {endpoint} (PUT {TOKEN_PATH} answered {status}; is the instance metadata service turned off?)"
            ),
            ImdsError::Status {
                endpoint,
                request,
                status,
            } => write!(f, "IMDS at {endpoint}: {request} answered {status}"),
            ImdsError::TooLarge {
                endpoint,
                path,
                limit,
            } => write!(f, "IMDS at {endpoint}: {path} is over {limit} bytes"),
            ImdsError::BadAnswer { endpoint, what } => write!(f, "IMDS at {endpoint}: {what}"),
        }
    }
}

impl std::error::Error for ImdsError {}

/// The IMDS base URL, as AWS SDKs choose it: `AWS_EC2_METADATA_SERVICE_ENDPOINT` if set and not
/// empty, else the IPv6 address if `AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6`, else
/// `http://169.254.169.254`.
pub fn endpoint_from_env(env: &dyn Env) -> Result<String, ImdsError> {
    if let Some(url) = env.var(ENDPOINT_ENV).filter(|u| !u.trim().is_empty()) {
        return Ok(url.trim().to_string());
    }
    match env.var(ENDPOINT_MODE_ENV).as_deref().map(str::trim) {
        None | Some("") => Ok(DEFAULT_ENDPOINT.into()),
        Some(m) if m.eq_ignore_ascii_case("ipv4") => Ok(DEFAULT_ENDPOINT.into()),
        Some(m) if m.eq_ignore_ascii_case("ipv6") => Ok(DEFAULT_ENDPOINT_IPV6.into()),
        Some(m) => Err(ImdsError::BadEndpoint {
            url: m.into(),
            why: format!("{ENDPOINT_MODE_ENV} must be IPv4 or IPv6"),
        }),
    }
}

/// A parsed base URL: where to connect, and the path every request is prefixed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The base URL without a trailing `/`, as errors and logs show it.
    pub url: String,
    pub addr: HostPort,
    /// Empty, or a path such as `/i-0abc` (no trailing `/`).
    pub prefix: String,
}

impl Endpoint {
    /// Parses `http://host[:port][/path]`. A trailing `/` is dropped, so
    /// `http://127.0.0.1:9999/i-0abc/` asks for `/i-0abc/latest/user-data`.
    pub fn parse(url: &str) -> Result<Endpoint, ImdsError> {
        let bad = |why: &str| ImdsError::BadEndpoint {
            url: url.to_string(),
            why: why.to_string(),
        };
        let shape = "must look like http://host[:port][/path] (IMDS is plain HTTP)";
        let (hp, prefix) = split_url(url, "http", 80).ok_or_else(|| bad(shape))?;
        // `http://` and what was given after it, less a trailing `/`.
        let given = url.trim_end_matches('/');
        let given = &given[given.find("://").map_or(0, |i| i + 3)..];
        Ok(Endpoint {
            url: format!("http://{given}"),
            addr: hp,
            prefix,
        })
    }
}

/// What IMDS says about this instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub instance_id: String,
    /// The raw user-data; `None` when the instance was launched without any (IMDS answers 404).
    pub user_data: Option<Bytes>,
}

#[derive(Debug, Clone)]
pub struct ImdsClient {
    endpoint: Endpoint,
    host_header: HeaderValue,
    timeout: Duration,
    retry_delays: Vec<Duration>,
}

/// One attempt's failure: worth another attempt, or final.
enum Attempt {
    Retry(String),
    Fail(ImdsError),
}

struct Answer {
    status: StatusCode,
    body: Bytes,
}

impl ImdsClient {
    /// A client for the IMDS at `base_url`, with [`REQUEST_TIMEOUT`] and [`RETRY_DELAYS`].
    pub fn new(base_url: &str) -> Result<ImdsClient, ImdsError> {
        let endpoint = Endpoint::parse(base_url)?;
        let host_header = HeaderValue::from_str(&endpoint.addr.to_string()).map_err(|_| {
            ImdsError::BadEndpoint {
                url: base_url.to_string(),
                why: "bad host".into(),
            }
        })?;
        Ok(ImdsClient {
            endpoint,
            host_header,
            timeout: REQUEST_TIMEOUT,
            retry_delays: RETRY_DELAYS.to_vec(),
        })
    }

    /// Replaces the waits between attempts (tests use a few milliseconds).
    pub fn with_retry_delays(mut self, delays: &[Duration]) -> ImdsClient {
        self.retry_delays = delays.to_vec();
        self
    }

    /// Replaces the per-request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> ImdsClient {
        self.timeout = timeout;
        self
    }

    /// The base URL, for messages.
    pub fn endpoint(&self) -> &str {
        &self.endpoint.url
    }

    /// Token, then user-data, then the instance id.
    pub async fn fetch(&self) -> Result<Instance, ImdsError> {
        let mut token = self.token().await?;
        let user_data = self.get(&mut token, USER_DATA_PATH, MAX_USER_DATA).await?;
        let id = self
            .get(&mut token, INSTANCE_ID_PATH, MAX_SMALL_ANSWER)
            .await?
            .ok_or_else(|| self.status_error(Method::GET, INSTANCE_ID_PATH, 404))?;
        let instance_id = std::str::from_utf8(&id)
            .ok()
            .map(str::trim)
            .filter(|s| !s.is_empty() && !s.contains(char::is_control))
            .ok_or_else(|| ImdsError::BadAnswer {
                endpoint: self.endpoint.url.clone(),
                what: format!("{INSTANCE_ID_PATH} is not an instance id"),
            })?
            .to_string();
        Ok(Instance {
            instance_id,
            user_data,
        })
    }

    /// [`fetch`](Self::fetch) as the user-data layer's outcome for `config::resolve`: IMDS
    /// being unavailable is an outcome (the config may not need it); any other failure is an
    /// error.
    pub async fn user_data(&self) -> Result<UserData, ImdsError> {
        match self.fetch().await {
            Ok(i) => Ok(UserData::Imds {
                endpoint: self.endpoint.url.clone(),
                instance_id: i.instance_id,
                raw: i.user_data.map(|b| b.to_vec()),
            }),
            Err(e) if e.is_unavailable() => Ok(UserData::Unavailable(e.to_string())),
            Err(e) => Err(e),
        }
    }

    /// A new session token.
    pub async fn token(&self) -> Result<String, ImdsError> {
        let a = self
            .send(
                Method::PUT,
                TOKEN_PATH,
                (TTL_HEADER, TOKEN_TTL_SECONDS),
                MAX_SMALL_ANSWER,
            )
            .await?;
        match a.status.as_u16() {
            200 => {}
            s @ 403..=405 => {
                return Err(ImdsError::Disabled {
                    endpoint: self.endpoint.url.clone(),
                    status: s,
                })
            }
            s => return Err(self.status_error(Method::PUT, TOKEN_PATH, s)),
        }
        std::str::from_utf8(&a.body)
            .ok()
            .map(str::trim)
            .filter(|t| !t.is_empty() && HeaderValue::from_str(t).is_ok())
            .map(str::to_string)
            .ok_or_else(|| ImdsError::BadAnswer {
                endpoint: self.endpoint.url.clone(),
                what: format!("PUT {TOKEN_PATH} gave no usable token"),
            })
    }

    /// GETs `path` with the token: `None` on 404. A 401 means the token expired (or IMDS
    /// restarted): `token` is replaced once and the request repeated.
    pub async fn get(
        &self,
        token: &mut String,
        path: &str,
        limit: usize,
    ) -> Result<Option<Bytes>, ImdsError> {
        let mut retokened = false;
        loop {
            let a = self
                .send(Method::GET, path, (TOKEN_HEADER, token.as_str()), limit)
                .await?;
            match a.status.as_u16() {
                200 => return Ok(Some(a.body)),
                404 => return Ok(None),
                401 if !retokened => {
                    *token = self.token().await?;
                    retokened = true;
                }
                s => return Err(self.status_error(Method::GET, path, s)),
            }
        }
    }

    /// One request with the retry schedule. Any status below 500 is returned to the caller.
    /// A body over `limit` bytes is an error, not retried.
    async fn send(
        &self,
        method: Method,
        path: &str,
        header: (&str, &str),
        limit: usize,
    ) -> Result<Answer, ImdsError> {
        let mut last = String::new();
        for attempt in 0..=self.retry_delays.len() {
            if attempt > 0 {
                tokio::time::sleep(self.retry_delays[attempt - 1]).await;
            }
            let once = self.once(method.clone(), path, header, limit);
            let result = match tokio::time::timeout(self.timeout, once).await {
                Ok(r) => r,
                Err(_) => Err(Attempt::Retry(format!(
                    "timed out after {:?}",
                    self.timeout
                ))),
            };
            match result {
                Ok(a) if a.status.is_server_error() => {
                    last = format!("{method} {path} answered {}", a.status.as_u16());
                }
                Ok(a) => return Ok(a),
                Err(Attempt::Retry(why)) => last = why,
                Err(Attempt::Fail(e)) => return Err(e),
            }
        }
        Err(ImdsError::Unreachable {
            endpoint: self.endpoint.url.clone(),
            attempts: self.retry_delays.len() + 1,
            last,
        })
    }

    async fn once(
        &self,
        method: Method,
        path: &str,
        (header, value): (&str, &str),
        limit: usize,
    ) -> Result<Answer, Attempt> {
        let ep = &self.endpoint;
        let tcp = TcpStream::connect((ep.addr.host.as_str(), ep.addr.port))
            .await
            .map_err(|e| Attempt::Retry(format!("cannot connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| Attempt::Retry(e.to_string()))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", ep.prefix))
            .header(HOST, self.host_header.clone())
            .header(header, value)
            .body(Empty::<Bytes>::new())
            .map_err(|e| Attempt::Fail(self.bad_answer(format!("cannot build request: {e}"))))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Attempt::Retry(e.to_string()))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), limit).collect().await;
        driver.abort();
        match body {
            Ok(b) => Ok(Answer {
                status,
                body: b.to_bytes(),
            }),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                Err(Attempt::Fail(self.too_large(path, limit)))
            }
            Err(e) => Err(Attempt::Retry(format!("answer broke off: {e}"))),
        }
    }

    fn status_error(&self, method: Method, path: &str, status: u16) -> ImdsError {
        ImdsError::Status {
            endpoint: self.endpoint.url.clone(),
            request: format!("{method} {path}"),
            status,
        }
    }

    fn too_large(&self, path: &str, limit: usize) -> ImdsError {
        ImdsError::TooLarge {
            endpoint: self.endpoint.url.clone(),
            path: path.to_string(),
            limit,
        }
    }

    fn bad_answer(&self, what: String) -> ImdsError {
        ImdsError::BadAnswer {
            endpoint: self.endpoint.url.clone(),
            what,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use http_body_util::Full;
    use hyper::body::Incoming;
    use hyper::Response;
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::{self, Layers};

    /// The stub serves under this prefix, as the boot harness's emulator serves each instance.
    const PREFIX: &str = "/i-123";
    const FAST: [Duration; 3] = [
        Duration::from_millis(1),
        Duration::from_millis(2),
        Duration::from_millis(3),
    ];

    /// An IMDS that enforces IMDSv2: a token from `PUT .../api/token` (with the TTL header) is
    /// needed for every GET.
    #[derive(Default)]
    struct Stub {
        user_data: Option<Vec<u8>>,
        instance_id: String,
        /// The first this-many tokens issued are treated as expired (401) when used.
        expired_tokens: usize,
        /// Answer 503 to this many requests before anything else.
        fail_first: usize,
        /// Answer 403 to the token request (IMDS turned off).
        disabled: bool,
        issued: Vec<String>,
        requests: Vec<String>,
    }

    fn reply(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(body.into()));
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        r
    }

    fn answer(stub: &Mutex<Stub>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let mut s = stub.lock().unwrap();
        s.requests
            .push(format!("{} {}", req.method(), req.uri().path()));
        if s.fail_first > 0 {
            s.fail_first -= 1;
            return reply(503, "busy");
        }
        let Some(path) = req.uri().path().strip_prefix(PREFIX) else {
            return reply(404, "");
        };
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        if path == TOKEN_PATH {
            if req.method() != Method::PUT {
                return reply(405, "");
            }
            if s.disabled {
                return reply(403, "");
            }
            match header(TTL_HEADER).and_then(|t| t.parse::<u32>().ok()) {
                Some(1..=21600) => {}
                _ => return reply(400, "missing or bad ttl"),
            }
            let token = format!("token-{}", s.issued.len());
            s.issued.push(token.clone());
            return reply(200, token);
        }
        if req.method() != Method::GET {
            return reply(405, "");
        }
        let valid = header(TOKEN_HEADER)
            .and_then(|t| s.issued.iter().position(|i| *i == t))
            .is_some_and(|n| n >= s.expired_tokens);
        if !valid {
            return reply(401, "");
        }
        match path {
            USER_DATA_PATH => match &s.user_data {
                Some(u) => reply(200, u.clone()),
                None => reply(404, ""),
            },
            INSTANCE_ID_PATH => reply(200, s.instance_id.clone()),
            _ => reply(404, ""),
        }
    }

    /// Starts the stub on 127.0.0.1:0; returns its base URL (with the prefix) and its state.
    async fn serve(stub: Stub) -> (String, Arc<Mutex<Stub>>) {
        let stub = Arc::new(Mutex::new(stub));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = stub.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let stub = stub.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let r = answer(&stub, req);
                        async move { Ok::<_, Infallible>(r) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        (format!("http://{addr}{PREFIX}"), state)
    }

    fn instance(user_data: Option<&str>) -> Stub {
        Stub {
            user_data: user_data.map(|u| u.as_bytes().to_vec()),
            instance_id: "i-0123456789abcdef0".into(),
            ..Stub::default()
        }
    }

    fn client(base: &str) -> ImdsClient {
        ImdsClient::new(base).unwrap().with_retry_delays(&FAST)
    }

    #[tokio::test]
    async fn fetches_through_a_prefixed_endpoint() {
        let (base, stub) = serve(instance(Some("workers = 3\n"))).await;
        // A trailing `/` on the endpoint is dropped, as AWS SDKs do.
        let c = client(&format!("{base}/"));
        assert_eq!(c.endpoint(), base);
        let i = c.fetch().await.unwrap();
        assert_eq!(i.instance_id, "i-0123456789abcdef0");
        assert_eq!(i.user_data.as_deref(), Some(&b"workers = 3\n"[..]));
        assert_eq!(
            stub.lock().unwrap().requests,
            [
                "PUT /i-123/latest/api/token",
                "GET /i-123/latest/user-data",
                "GET /i-123/latest/meta-data/instance-id",
            ]
        );
    }

    #[tokio::test]
    async fn no_user_data_is_none() {
        let (base, _) = serve(instance(None)).await;
        let i = client(&base).fetch().await.unwrap();
        assert_eq!(i.user_data, None);
        assert_eq!(i.instance_id, "i-0123456789abcdef0");
    }

    #[tokio::test]
    async fn an_expired_token_is_renewed_exactly_once() {
        let (base, stub) = serve(Stub {
            expired_tokens: 1,
            ..instance(Some("workers = 1"))
        })
        .await;
        let i = client(&base).fetch().await.unwrap();
        assert_eq!(i.user_data.as_deref(), Some(&b"workers = 1"[..]));
        assert_eq!(stub.lock().unwrap().issued.len(), 2);

        // A token refused again right after renewal is an error, not a loop.
        let (base, stub) = serve(Stub {
            expired_tokens: usize::MAX,
            ..instance(None)
        })
        .await;
        let e = client(&base).fetch().await.unwrap_err();
        assert!(matches!(e, ImdsError::Status { status: 401, .. }), "{e}");
        assert!(!e.is_unavailable());
        assert_eq!(stub.lock().unwrap().issued.len(), 2);
    }

    #[tokio::test]
    async fn imdsv1_style_requests_are_refused_by_the_stub() {
        // The stub really enforces IMDSv2, so the tests above prove the client sends tokens.
        let (base, _) = serve(instance(Some("x = 1"))).await;
        let ep = Endpoint::parse(&base).unwrap();
        let c = client(&base);
        let a = c
            .send(Method::GET, USER_DATA_PATH, ("x-other", "1"), 100)
            .await
            .unwrap();
        assert_eq!(a.status, 401);
        let a = c
            .send(Method::PUT, TOKEN_PATH, ("x-other", "1"), 100)
            .await
            .unwrap();
        assert_eq!(a.status, 400);
        assert_eq!(ep.prefix, PREFIX);
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_fails_after_the_retries() {
        // A port nothing listens on: every connect is refused at once.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let base = format!("http://127.0.0.1:{port}/i-123");
        let t = Instant::now();
        let e = client(&base).fetch().await.unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        match &e {
            ImdsError::Unreachable { attempts, .. } => assert_eq!(*attempts, FAST.len() + 1),
            other => panic!("{other}"),
        }
        assert!(e.is_unavailable());
        let line = e.to_string();
        assert!(
            line.contains(&base) && line.contains("4 attempts") && !line.contains('\n'),
            "{line}"
        );
        // The production schedule is the documented one.
        assert_eq!(
            RETRY_DELAYS.iter().sum::<Duration>(),
            Duration::from_millis(7750)
        );
    }

    #[tokio::test]
    async fn server_errors_are_retried_on_the_schedule() {
        let (base, stub) = serve(Stub {
            fail_first: 2,
            ..instance(None)
        })
        .await;
        client(&base).fetch().await.unwrap();
        assert_eq!(stub.lock().unwrap().requests.len(), 2 + 3);

        let (base, stub) = serve(Stub {
            fail_first: usize::MAX,
            ..instance(None)
        })
        .await;
        let e = client(&base).fetch().await.unwrap_err();
        assert!(e.is_unavailable() && e.to_string().contains("503"), "{e}");
        assert_eq!(stub.lock().unwrap().requests.len(), FAST.len() + 1);
    }

    #[tokio::test]
    async fn a_silent_endpoint_times_out() {
        // Accepts connections and never answers, like IMDS behind a too-low hop limit.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let hold = tokio::spawn(async move {
            let mut open = vec![];
            while let Ok((tcp, _)) = listener.accept().await {
                open.push(tcp);
            }
        });
        let c = ImdsClient::new(&base)
            .unwrap()
            .with_timeout(Duration::from_millis(50))
            .with_retry_delays(&[Duration::from_millis(1)]);
        let e = c.fetch().await.unwrap_err();
        assert!(
            e.is_unavailable() && e.to_string().contains("timed out"),
            "{e}"
        );
        hold.abort();
    }

    #[tokio::test]
    async fn turned_off_and_oversized_answers() {
        let (base, _) = serve(Stub {
            disabled: true,
            ..instance(None)
        })
        .await;
        let e = client(&base).fetch().await.unwrap_err();
        assert!(matches!(e, ImdsError::Disabled { status: 403, .. }), "{e}");
        assert!(e.is_unavailable());

        let big = "# x\n".repeat(MAX_USER_DATA / 4 + 1);
        let (base, _) = serve(instance(Some(&big))).await;
        let e = client(&base).fetch().await.unwrap_err();
        assert!(matches!(e, ImdsError::TooLarge { .. }), "{e}");
        assert!(!e.is_unavailable());
        let exact = "#".repeat(MAX_USER_DATA);
        let (base, _) = serve(instance(Some(&exact))).await;
        let i = client(&base).fetch().await.unwrap();
        assert_eq!(i.user_data.unwrap().len(), MAX_USER_DATA);
    }

    const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    fn user_data_toml() -> String {
        format!(
            "controller = \"https://10.0.0.5:8443\"\nca_pem = \"-----BEGIN CERTIFICATE-----\"\ntoken = \"t0k3n\"\nverify_key = \"{KEY}\"\nworkers = 2\n"
        )
    }

    /// What `main` does: fetch, then resolve.
    async fn resolve_from(base: &str, layers: Layers) -> Result<config::Config, String> {
        let ud = client(base).user_data().await.map_err(|e| e.to_string())?;
        config::resolve(layers, ud).map(|(cfg, _)| cfg)
    }

    #[tokio::test]
    async fn user_data_from_imds_configures_the_agent_and_names_the_node() {
        let (base, _) = serve(instance(Some(&user_data_toml()))).await;
        let cfg = resolve_from(&base, Layers::default()).await.unwrap();
        assert_eq!(cfg.controller, "https://10.0.0.5:8443");
        assert_eq!(cfg.workers, 2);
        assert_eq!(cfg.node_id.as_deref(), Some("i-0123456789abcdef0"));

        // A node_id from any layer wins over the instance id.
        let mut env = BTreeMap::new();
        env.insert("FLEET_AGENT_NODE_ID".to_string(), "web-7".to_string());
        let layers = Layers {
            env: config::env_source(&env),
            ..Layers::default()
        };
        let cfg = resolve_from(&base, layers).await.unwrap();
        assert_eq!(cfg.node_id.as_deref(), Some("web-7"));
    }

    #[tokio::test]
    async fn user_data_that_is_not_toml_is_one_clear_error() {
        let script = "#!/bin/bash\nyum install -y locust\n";
        let (base, _) = serve(instance(Some(script))).await;
        let e = resolve_from(&base, Layers::default()).await.unwrap_err();
        assert!(
            e.starts_with(&format!(
                "user-data from IMDS {base} is not a TOML agent config"
            )) && !e.contains('\n'),
            "{e}"
        );
        // Even when the other layers are complete: broken user-data is never skipped.
        let file = config::parse_source("file", &user_data_toml()).unwrap();
        let layers = Layers {
            file,
            ..Layers::default()
        };
        assert!(resolve_from(&base, layers).await.is_err());
    }

    #[tokio::test]
    async fn unreachable_imds_is_fatal_only_when_user_data_is_needed() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let base = format!("http://127.0.0.1:{port}");
        let e = resolve_from(&base, Layers::default()).await.unwrap_err();
        assert!(
            e.contains(&format!("IMDS at {base} unreachable"))
                && e.contains("user-data is needed")
                && !e.contains('\n'),
            "{e}"
        );
        let file = config::parse_source("file", &user_data_toml()).unwrap();
        let layers = Layers {
            file,
            ..Layers::default()
        };
        let cfg = resolve_from(&base, layers).await.unwrap();
        assert_eq!(cfg.node_id, None, "no instance id without IMDS");
    }

    #[test]
    fn endpoints_are_parsed_like_aws_sdks() {
        let ep = Endpoint::parse("http://169.254.169.254").unwrap();
        assert_eq!(
            (ep.addr.host.as_str(), ep.addr.port, ep.prefix.as_str()),
            ("169.254.169.254", 80, "")
        );
        let ep = Endpoint::parse("http://127.0.0.1:9999/i-0abc/").unwrap();
        assert_eq!(
            (ep.addr.host.as_str(), ep.addr.port, ep.prefix.as_str()),
            ("127.0.0.1", 9999, "/i-0abc")
        );
        assert_eq!(ep.url, "http://127.0.0.1:9999/i-0abc");
        let ep = Endpoint::parse("http://[fd00:ec2::254]/").unwrap();
        assert_eq!((ep.addr.host.as_str(), ep.addr.port), ("fd00:ec2::254", 80));
        assert_eq!(ep.addr.to_string(), "[fd00:ec2::254]:80");
        for bad in [
            "https://169.254.169.254",
            "169.254.169.254",
            "http://",
            "http://:80",
            "http://h:port",
            "http://u@h",
            "http://h/p?q=1",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_endpoint_comes_from_the_environment() {
        let env = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(endpoint_from_env(&env(&[])).unwrap(), DEFAULT_ENDPOINT);
        assert_eq!(
            endpoint_from_env(&env(&[(ENDPOINT_ENV, "http://127.0.0.1:9999/i-0abc/")])).unwrap(),
            "http://127.0.0.1:9999/i-0abc/"
        );
        assert_eq!(
            endpoint_from_env(&env(&[(ENDPOINT_ENV, ""), (ENDPOINT_MODE_ENV, "IPv6")])).unwrap(),
            DEFAULT_ENDPOINT_IPV6
        );
        assert_eq!(
            endpoint_from_env(&env(&[
                (ENDPOINT_ENV, "http://10.1.1.1"),
                (ENDPOINT_MODE_ENV, "IPv6")
            ]))
            .unwrap(),
            "http://10.1.1.1"
        );
        assert!(endpoint_from_env(&env(&[(ENDPOINT_MODE_ENV, "ipv5")])).is_err());
    }
}
