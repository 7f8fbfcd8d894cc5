//! A small client for the Locust master's web API on loopback: the numbers the keeper and the
//! dashboard read, and the two calls that start and stop a test. What Locust answers, and how,
//! is in docs/locust.md ("The web UI and REST API, as a proxy in front sees them").

use std::time::Duration;

use bytes::Bytes;
use fleet_common::wire::SwarmRequest;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use serde::Deserialize;

use super::merge::{Snapshot, SnapshotError, PATH};

/// How long one call may take: a saturated master answers its web API late (docs/locust.md,
/// "How many workers one master holds"), and a keeper poll must not hang behind it.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a new connection to the web UI may take: it is on loopback, or (an external
/// master) inside the VPC, so a connection that takes longer is not coming.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a call to the master's web API failed: the master is not there, it answered with an
/// HTTP error, or Locust itself declined (it answers its own errors as HTTP 200).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the Locust master at {url} is unreachable ({reason}); is it running?")]
    Unreachable { url: String, reason: String },
    #[error("the Locust master did not answer {call} within {CALL_TIMEOUT:?}")]
    Timeout { call: &'static str },
    #[error("{call}: the Locust master answered HTTP {status}")]
    Status { call: &'static str, status: u16 },
    #[error("Locust refused the swarm: {0}")]
    Refused(String),
    #[error("{call}: the Locust master's answer is not the JSON fleet expects: {source}")]
    Body {
        call: &'static str,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

impl ApiError {
    /// The master did not answer at all (as opposed to answering with an error).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ApiError::Unreachable { .. } | ApiError::Timeout { .. }
        )
    }
}

/// `GET /stats/requests`, the fields fleet reads. Missing fields read as zero.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Stats {
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub user_count: u64,
    #[serde(default)]
    pub worker_count: u64,
    #[serde(default)]
    pub total_rps: f64,
    #[serde(default)]
    pub fail_ratio: f64,
}

impl Stats {
    /// Locust is not running a test: a fresh master (`ready`) or one that stopped (`stopped`).
    pub fn idle(&self) -> bool {
        matches!(self.state.as_str(), "ready" | "stopped")
    }

    pub fn running(&self) -> bool {
        self.state == "running"
    }
}

/// Plain HTTP to the master's web API on loopback.
#[derive(Clone)]
pub struct LocustApi {
    base: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl LocustApi {
    pub fn new(base: &str) -> LocustApi {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let http = Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        LocustApi {
            base: base.trim_end_matches('/').to_string(),
            http,
        }
    }

    /// The HTTP client, for the reverse proxy in front of the web UI.
    pub fn client(&self) -> &Client<HttpConnector, Full<Bytes>> {
        &self.http
    }

    /// The web UI's URL without a trailing slash (it includes `--web-base-path`).
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call(
        &self,
        call: &'static str,
        method: hyper::Method,
        path: &str,
        form: Option<String>,
    ) -> Result<(u16, Bytes), ApiError> {
        let url = format!("{}{path}", self.base);
        let unreachable = |reason: String| ApiError::Unreachable {
            url: url.clone(),
            reason,
        };
        let mut req = hyper::Request::builder().method(method).uri(&url);
        let body = match form {
            Some(f) => {
                req = req.header("content-type", "application/x-www-form-urlencoded");
                Bytes::from(f)
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(body))
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = tokio::time::timeout(CALL_TIMEOUT, self.http.request(req))
            .await
            .map_err(|_| ApiError::Timeout { call })?
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = tokio::time::timeout(CALL_TIMEOUT, resp.into_body().collect())
            .await
            .map_err(|_| ApiError::Timeout { call })?
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }

    /// `GET path`, whose answer must be 200; its body.
    async fn get_ok(&self, call: &'static str, path: &str) -> Result<Bytes, ApiError> {
        let (status, body) = self.call(call, hyper::Method::GET, path, None).await?;
        if status != 200 {
            return Err(ApiError::Status { call, status });
        }
        Ok(body)
    }

    pub async fn stats(&self) -> Result<Stats, ApiError> {
        let call = "GET /stats/requests";
        let body = self.get_ok(call, "/stats/requests").await?;
        serde_json::from_slice(&body).map_err(|source| ApiError::Body { call, source })
    }

    /// `GET /fleet/stats`: the raw numbers of fleet's stats plugin, for merging with other
    /// masters' ([`super::merge`]). A master without the plugin (an external one) answers 404.
    pub async fn snapshot(&self) -> Result<Snapshot, ApiError> {
        let body = self.get_ok("GET /fleet/stats", PATH).await?;
        Ok(Snapshot::from_json(&body)?)
    }

    /// `GET /stats/requests` in the merged view's shape: the view of a master without the
    /// plugin ([`super::view`]).
    pub async fn report(&self) -> Result<super::merge::Report, ApiError> {
        let call = "GET /stats/requests";
        let body = self.get_ok(call, "/stats/requests").await?;
        super::view::report_from_requests(&body).map_err(|source| ApiError::Body { call, source })
    }

    /// `GET /stats/requests/csv`: Locust's own `stats.csv`.
    pub async fn requests_csv(&self) -> Result<String, ApiError> {
        let body = self
            .get_ok("GET /stats/requests/csv", "/stats/requests/csv")
            .await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// Starts (or re-sizes) the test. Locust answers errors as HTTP 200 with `success: false`.
    pub async fn swarm(&self, s: &SwarmRequest) -> Result<(), ApiError> {
        let call = "POST /swarm";
        let form = format!("user_count={}&spawn_rate={}", s.users, s.spawn_rate);
        let (status, body) = self
            .call(call, hyper::Method::POST, "/swarm", Some(form))
            .await?;
        swarm_answer(status, &body)
    }

    pub async fn stop(&self) -> Result<(), ApiError> {
        let call = "POST /stop";
        let (status, _) = self.call(call, hyper::Method::POST, "/stop", None).await?;
        match status {
            200 => Ok(()),
            status => Err(ApiError::Status { call, status }),
        }
    }
}

/// Reads Locust's answer to `POST /swarm`: an HTTP error, or HTTP 200 whose JSON says
/// `success: false` with a `message`, or success.
fn swarm_answer(status: u16, body: &[u8]) -> Result<(), ApiError> {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let reason = || {
        v.get("message")
            .and_then(|m| m.as_str())
            .unwrap_or("no reason given")
            .to_string()
    };
    if v.get("success") == Some(&serde_json::Value::Bool(false)) {
        return Err(ApiError::Refused(reason()));
    }
    if status != 200 {
        return Err(ApiError::Status {
            call: "POST /swarm",
            status,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locusts_own_refusal_comes_back_as_http_200_with_success_false() {
        let body = br#"{"success": false, "message": "spawn_rate must be positive"}"#;
        match swarm_answer(200, body) {
            Err(ApiError::Refused(m)) => assert_eq!(m, "spawn_rate must be positive"),
            other => panic!("{other:?}"),
        }
        assert!(swarm_answer(200, br#"{"success": true, "message": "Swarming started"}"#).is_ok());
    }

    #[test]
    fn an_http_error_is_a_status_error_and_not_a_refusal() {
        match swarm_answer(502, b"Bad Gateway") {
            Err(ApiError::Status { status: 502, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stats_read_missing_fields_as_zero_and_tell_idle_from_running() {
        let s: Stats = serde_json::from_str(r#"{"state": "stopped", "user_count": 3}"#).unwrap();
        assert_eq!((s.user_count, s.worker_count), (3, 0));
        assert!(s.idle() && !s.running());
        let s: Stats = serde_json::from_str(r#"{"state": "spawning"}"#).unwrap();
        assert!(!s.idle() && !s.running(), "spawning is neither");
    }

    /// A web UI on loopback that answers every request with `status` and `body`; its URL.
    async fn answering(status: &'static str, body: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/locust", l.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        url
    }

    #[tokio::test]
    async fn a_snapshot_of_another_format_or_from_a_master_without_the_plugin_is_an_error() {
        let api = LocustApi::new(&answering("200 OK", r#"{"format": 9}"#).await);
        match api.snapshot().await {
            Err(ApiError::Snapshot(SnapshotError::Format { found: 9 })) => {}
            other => panic!("{other:?}"),
        }
        let api = LocustApi::new(&answering("404 Not Found", "").await);
        match api.snapshot().await {
            Err(ApiError::Status { status: 404, call }) => assert_eq!(call, "GET /fleet/stats"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_master_that_is_not_there_is_unreachable() {
        // A port that was just free: nothing listens on it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let api = LocustApi::new(&format!("http://127.0.0.1:{port}/locust/"));
        assert_eq!(api.base(), format!("http://127.0.0.1:{port}/locust"));
        let e = api.stats().await.unwrap_err();
        assert!(e.is_unreachable(), "{e}");
        assert!(e.to_string().contains("unreachable"), "{e}");
    }
}
