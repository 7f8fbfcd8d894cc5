//! A small HTTPS client for talking to the controller: HTTP/1.1 over rustls, trusting only the
//! fleet CA. Used by the agent (so it needs no HTTP client framework) and by the CLI.
//!
//! Every request opens a new connection. rustls keeps a session cache in the shared
//! `ClientConfig`, so reconnects resume TLS sessions instead of paying a full handshake.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

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
    /// Whether the controller could not be reached at all (as opposed to a bad answer).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. } | ClientError::Timeout { .. }
        )
    }

    /// Whether trying again later may succeed: everything but a bad URL or CA, and a body
    /// over the caller's limit (the answer itself is wrong, not the way it came).
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            ClientError::BadUrl(_) | ClientError::BadCa(_) | ClientError::Body { .. }
        )
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

#[derive(Clone)]
pub struct Client {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    host_header: HeaderValue,
    tls: TlsConnector,
    auth: Option<HeaderValue>,
}

/// Splits `https://host:port[/]` into host and port.
pub fn parse_base_url(url: &str) -> Result<(String, u16), ClientError> {
    let bad = || ClientError::BadUrl(url.to_string());
    let rest = url.strip_prefix("https://").ok_or_else(bad)?;
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') || rest.is_empty() {
        return Err(bad());
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, p) = v6.split_once(']').ok_or_else(bad)?;
        (h.to_string(), p.strip_prefix(':').unwrap_or("443"))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (rest.to_string(), "443"),
        }
    };
    let port = port.parse().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host, port))
}

/// A rustls client config trusting exactly the certificates in `ca_pem`.
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

impl Client {
    /// `auth` is the whole `Authorization` header value (`Bearer …` or `Basic …`).
    pub fn new(base_url: &str, ca_pem: &str, auth: Option<&str>) -> Result<Client, ClientError> {
        let (host, port) = parse_base_url(base_url)?;
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| ClientError::BadUrl(base_url.to_string()))?;
        let host_header = HeaderValue::from_str(&if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        })
        .map_err(|_| ClientError::BadUrl(base_url.to_string()))?;
        let auth = match auth {
            Some(a) => Some(
                HeaderValue::from_str(a)
                    .map_err(|_| ClientError::BadUrl("bad credential characters".into()))?,
            ),
            None => None,
        };
        Ok(Client {
            host,
            port,
            server_name,
            host_header,
            tls: TlsConnector::from(tls_config(ca_pem)?),
            auth,
        })
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
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

    /// A GET for a large body with no overall deadline: it fails once no data arrived for
    /// `idle` (for the answer's head or any part of its body), so a slow but moving download
    /// completes and a stalled one is given up quickly.
    pub async fn download(
        &self,
        path: &str,
        idle: Duration,
        max_body: usize,
    ) -> Result<Response, ClientError> {
        self.request_inner(Method::GET, path, None, max_body, Some(idle))
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
            Err(_) => Err(ClientError::Timeout {
                addr,
                after: timeout,
            }),
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
        let addr = self.addr();
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| ClientError::Tls {
                addr: addr.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|source| ClientError::Http {
                addr: addr.clone(),
                source,
            })?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.host_header.clone());
        if let Some(a) = &self.auth {
            req = req.header(AUTHORIZATION, a.clone());
        }
        let payload = match body {
            Some((ct, b)) => {
                req = req.header(CONTENT_TYPE, ct);
                Bytes::from(b)
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|_| ClientError::BadUrl(path.to_string()))?;
        let resp = within(idle, &addr, sender.send_request(req))
            .await?
            .map_err(|source| ClientError::Http {
                addr: addr.clone(),
                source,
            })?;
        let (parts, body) = resp.into_parts();
        let body = read_body(body, max_body, idle, &addr).await;
        driver.abort();
        let body = body?;
        Ok(Response {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }
}

/// `fut`, failing as [`ClientError::Stalled`] if `idle` passes first.
async fn within<T>(
    idle: Option<Duration>,
    addr: &str,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, ClientError> {
    match idle {
        None => Ok(fut.await),
        Some(after) => tokio::time::timeout(after, fut)
            .await
            .map_err(|_| ClientError::Stalled {
                addr: addr.to_string(),
                after,
            }),
    }
}

/// Reads a whole body of at most `max` bytes, each frame within `idle` of the last.
async fn read_body(
    mut body: hyper::body::Incoming,
    max: usize,
    idle: Option<Duration>,
    addr: &str,
) -> Result<Bytes, ClientError> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = within(idle, addr, body.frame()).await? {
        let frame = frame.map_err(|source| ClientError::BodyBroken {
            addr: addr.to_string(),
            source,
        })?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > max {
                return Err(ClientError::Body {
                    addr: addr.to_string(),
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
            parse_base_url("https://127.0.0.1:8443").unwrap(),
            ("127.0.0.1".into(), 8443)
        );
        assert_eq!(
            parse_base_url("https://ctl.example/").unwrap(),
            ("ctl.example".into(), 443)
        );
        assert_eq!(
            parse_base_url("https://[::1]:9").unwrap(),
            ("::1".into(), 9)
        );
        assert!(parse_base_url("http://x:1").is_err());
        assert!(parse_base_url("https://x:1/path").is_err());
        assert!(parse_base_url("https://x:notaport").is_err());
    }
}
