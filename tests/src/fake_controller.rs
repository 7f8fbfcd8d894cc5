//! A fake controller: just enough of the agent's side of the protocol, over real TLS, for a
//! real `fleet-agent` to follow it. The test decides what is published, byte for byte
//! (manifests it signed, tampered or not, and any bundle bytes), and reads back what the agent
//! did: its heartbeats, which bundles it downloaded, how many connections failed the TLS
//! handshake.
//!
//! Served:
//! - `GET /v1/manifest?wait=N[&after=SEQ]`: the current manifest and its signature header at
//!   once, unless the agent already has that sequence; then held until the next publication or
//!   until the wait (at most 5 s) runs out, with 204. A sequence lower than `after` is served
//!   too, so the agent's own refusal of a rollback can be tested.
//! - `GET /v1/bundles/<id>`: the bytes put under that id, or 404.
//! - `POST /v1/heartbeat`: recorded.
//!
//! Every request needs `Authorization: Bearer <token>`; anything else is 401 or 404.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use fleet_common::manifest::{Signed, SIGNATURE_HEADER};
use fleet_common::wire::Heartbeat;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

/// The longest a manifest request is held, whatever `wait` asks.
const MAX_HOLD: Duration = Duration::from_secs(5);

pub struct FakeController {
    state: Mutex<State>,
    /// Bumped on every publication, to wake held long-polls.
    published: watch::Sender<u64>,
    url: String,
    token: String,
}

struct Served {
    sequence: u64,
    bytes: Bytes,
    signature_b64: String,
}

#[derive(Default)]
struct State {
    manifest: Option<Served>,
    bundles: HashMap<String, Bytes>,
    heartbeats: Vec<Heartbeat>,
    /// Every `GET /v1/bundles/<id>`, in order.
    bundle_gets: Vec<String>,
    /// Requests that reached the HTTP layer (so passed the TLS handshake).
    requests: u64,
    /// Connections whose TLS handshake failed.
    tls_failures: u64,
}

impl FakeController {
    /// Listens on a free port of 127.0.0.1 with `tls`, accepting agents that present `token`.
    pub async fn start(tls: Arc<rustls::ServerConfig>, token: &str) -> Arc<FakeController> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        let fake = Arc::new(FakeController {
            state: Mutex::new(State::default()),
            published: watch::channel(0).0,
            url: format!("https://127.0.0.1:{port}"),
            token: token.to_string(),
        });
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let f = fake.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let f = f.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        f.state().tls_failures += 1;
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| f.clone().handle(req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        fake
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Serves `bytes` under `GET /v1/bundles/<id>`.
    pub fn put_bundle(&self, id: &str, bytes: &[u8]) {
        self.state()
            .bundles
            .insert(id.to_string(), Bytes::copy_from_slice(bytes));
    }

    /// Makes `bytes` (with `signature_b64` in the signature header) the current manifest, at
    /// `sequence`, and wakes held polls. The bytes need not be a manifest, nor match the
    /// signature.
    pub fn publish_raw(&self, sequence: u64, bytes: Vec<u8>, signature_b64: String) {
        self.state().manifest = Some(Served {
            sequence,
            bytes: Bytes::from(bytes),
            signature_b64,
        });
        self.published.send_modify(|n| *n += 1);
    }

    /// Publishes a signed manifest whose sequence is `sequence`.
    pub fn publish(&self, signed: &Signed, sequence: u64) {
        self.publish_raw(sequence, signed.bytes.clone(), signed.signature_b64());
    }

    pub fn heartbeat_count(&self) -> usize {
        self.state().heartbeats.len()
    }

    /// The heartbeats after the first `n`.
    pub fn heartbeats_since(&self, n: usize) -> Vec<Heartbeat> {
        self.state().heartbeats[n..].to_vec()
    }

    pub fn last_heartbeat(&self) -> Option<Heartbeat> {
        self.state().heartbeats.last().cloned()
    }

    /// How many times bundle `id` was requested.
    pub fn bundle_gets(&self, id: &str) -> usize {
        self.state().bundle_gets.iter().filter(|s| *s == id).count()
    }

    /// How many bundle requests there were, for any id.
    pub fn all_bundle_gets(&self) -> usize {
        self.state().bundle_gets.len()
    }

    /// Requests that got through a TLS handshake, authorized or not.
    pub fn requests(&self) -> u64 {
        self.state().requests
    }

    /// Connections whose TLS handshake failed.
    pub fn tls_failures(&self) -> u64 {
        self.state().tls_failures
    }

    /// Every worker PID any heartbeat reported, sorted, once each.
    pub fn worker_pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .state()
            .heartbeats
            .iter()
            .flat_map(|h| h.workers.iter().filter_map(|w| w.pid))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("fake controller state")
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        self.state().requests += 1;
        let authorized = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            == Some(format!("Bearer {}", self.token).as_str());
        if !authorized {
            return Ok(reply(StatusCode::UNAUTHORIZED, ""));
        }
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let method = req.method().clone();
        if method == Method::GET && path == "/v1/manifest" {
            return Ok(self.manifest(&query).await);
        }
        if method == Method::GET {
            if let Some(id) = path.strip_prefix("/v1/bundles/") {
                return Ok(self.bundle(id));
            }
        }
        if method == Method::POST && path == "/v1/heartbeat" {
            let Ok(body) = req.into_body().collect().await else {
                return Ok(reply(StatusCode::BAD_REQUEST, ""));
            };
            return Ok(
                match serde_json::from_slice::<Heartbeat>(&body.to_bytes()) {
                    Ok(hb) => {
                        self.state().heartbeats.push(hb);
                        reply(StatusCode::OK, "{}")
                    }
                    Err(_) => reply(StatusCode::BAD_REQUEST, ""),
                },
            );
        }
        Ok(reply(StatusCode::NOT_FOUND, ""))
    }

    async fn manifest(&self, query: &str) -> Response<Full<Bytes>> {
        let mut after = None;
        let mut wait = 0u64;
        for kv in query.split('&') {
            match kv.split_once('=') {
                Some(("after", v)) => after = v.parse::<u64>().ok(),
                Some(("wait", v)) => wait = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(wait).min(MAX_HOLD);
        let mut rx = self.published.subscribe();
        loop {
            if let Some(m) = &self.state().manifest {
                if after != Some(m.sequence) {
                    return Response::builder()
                        .status(StatusCode::OK)
                        .header(CONTENT_TYPE, "application/json")
                        .header(SIGNATURE_HEADER, m.signature_b64.as_str())
                        .body(Full::new(m.bytes.clone()))
                        .expect("manifest response");
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return reply(StatusCode::NO_CONTENT, ""),
            }
        }
    }

    fn bundle(&self, id: &str) -> Response<Full<Bytes>> {
        let mut st = self.state();
        st.bundle_gets.push(id.to_string());
        match st.bundles.get(id) {
            Some(b) => Response::builder()
                .status(StatusCode::OK)
                .header(CONTENT_TYPE, "application/gzip")
                .body(Full::new(b.clone()))
                .expect("bundle response"),
            None => reply(StatusCode::NOT_FOUND, ""),
        }
    }
}

fn reply(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("response")
}
