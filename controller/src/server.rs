//! The controller's HTTPS API (docs/protocol.md): one axum router, served over rustls only.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use fleet_common::bundle::is_sha256_hex;
use fleet_common::manifest::SIGNATURE_HEADER;
use fleet_common::wire::{routes, Heartbeat, SwarmRequest, MAX_WAIT_SECS};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::auth::{Auth, Refusal, Role};
use crate::master::Master;
use crate::nodes::Nodes;
use crate::publish::Publisher;

pub struct AppState {
    pub publisher: Arc<Publisher>,
    pub nodes: Arc<Nodes>,
    pub master: Master,
    pub auth: Arc<Auth>,
    pub name: String,
}

pub type Shared = Arc<AppState>;

/// The TCP peer of a request, set per connection by [`serve_tls`].
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

fn peer(req: &Request) -> SocketAddr {
    req.extensions()
        .get::<Peer>()
        .map(|p| p.0)
        .unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0))
}

pub fn app(state: Shared) -> Router {
    let agent = Router::new()
        .route(routes::MANIFEST, get(manifest))
        .route(&format!("{}/{{sha}}", routes::BUNDLES), get(bundle))
        .route(routes::HEARTBEAT, post(heartbeat))
        .route_layer(from_fn_with_state((state.clone(), Role::Agent), require));
    let human = Router::new()
        .route("/", get(dashboard))
        .route(routes::API_NODES, get(api_nodes).put(api_listed))
        .route(crate::events::SUMMARY_ROUTE, get(api_summary))
        .route(
            &format!("{}/{{id}}", routes::API_NODES),
            axum::routing::delete(forget_node),
        )
        .route(routes::API_SPEC, get(api_spec))
        .route(routes::API_MASTER, get(api_master))
        .route(crate::events::ROUTE, get(api_events))
        .route(routes::API_SWARM, post(api_swarm))
        .route(routes::API_STOP, post(api_stop))
        .route("/locust", any(crate::proxy::locust))
        .route("/locust/", any(crate::proxy::locust))
        .route("/locust/{*rest}", any(crate::proxy::locust))
        .route_layer(from_fn_with_state((state.clone(), Role::Operator), require));
    Router::new()
        .route(routes::HEALTH, get(|| async { "ok\n" }))
        .merge(agent)
        .merge(human)
        .fallback(fallback)
        .with_state(state)
}

fn refuse(r: Refusal, role: Role) -> Response {
    match r {
        Refusal::RateLimited => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "2")],
            "too many failed attempts; wait and retry with the right credentials\n",
        )
            .into_response(),
        Refusal::Unauthorized => {
            let mut resp = (StatusCode::UNAUTHORIZED, "credentials required\n").into_response();
            if role == Role::Operator {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"fleet\", charset=\"UTF-8\""),
                );
            }
            resp
        }
    }
}

async fn require(State((st, role)): State<(Shared, Role)>, req: Request, next: Next) -> Response {
    let authz = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match st.auth.check(authz, peer(&req).ip(), role) {
        Ok(()) if role == Role::Operator && cross_site(&req) => (
            StatusCode::FORBIDDEN,
            "cross-site request refused: the Origin is not this controller\n",
        )
            .into_response(),
        Ok(()) => next.run(req).await,
        Err(r) => refuse(r, role),
    }
}

/// A state-changing request a browser sent from another site. Browsers resend cached basic
/// auth credentials with any request to us, so a page the operator visits could otherwise
/// post to `/locust/swarm`; they also always send `Origin` on cross-origin POSTs, which must
/// then name this very host. The CLI and scripts send no `Origin`.
fn cross_site(req: &Request) -> bool {
    use axum::http::Method;
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return false;
    }
    let Some(origin) = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    origin != format!("https://{host}")
}

/// Unknown paths: still 401 without credentials, so the route table does not leak.
async fn fallback(State(st): State<Shared>, req: Request) -> Response {
    let authz = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match st.auth.check(authz, peer(&req).ip(), Role::Operator) {
        Ok(()) => (StatusCode::NOT_FOUND, "no such route\n").into_response(),
        Err(r) => refuse(r, Role::Operator),
    }
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": msg.to_string() })),
    )
        .into_response()
}

#[derive(Deserialize)]
struct ManifestQuery {
    /// The sequence the agent runs: answer only with a newer one.
    after: Option<u64>,
    /// Seconds to hold the request open waiting for a newer one (long-poll).
    wait: Option<u64>,
}

async fn manifest(State(st): State<Shared>, Query(q): Query<ManifestQuery>) -> Response {
    let mut rx = st.publisher.subscribe();
    let wait = Duration::from_secs(q.wait.unwrap_or(0).min(MAX_WAIT_SECS));
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let cur = rx.borrow_and_update().clone();
        if let Some(p) = cur {
            if q.after.is_none_or(|a| p.manifest.sequence > a) {
                return (
                    [
                        (
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("application/json"),
                        ),
                        (
                            header::HeaderName::from_static(SIGNATURE_HEADER),
                            HeaderValue::from_str(&p.signature_b64)
                                .expect("base64 is a valid header"),
                        ),
                        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
                    ],
                    p.bytes.clone(),
                )
                    .into_response();
            }
        }
        if wait.is_zero() {
            let status = if st.publisher.current().is_some() {
                StatusCode::NO_CONTENT
            } else {
                StatusCode::NOT_FOUND
            };
            return status.into_response();
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => continue,
            _ => return StatusCode::NO_CONTENT.into_response(),
        }
    }
}

async fn bundle(State(st): State<Shared>, Path(sha): Path<String>) -> Response {
    if !is_sha256_hex(&sha) {
        return StatusCode::NOT_FOUND.into_response();
    }
    match st.publisher.bundle(&sha) {
        Some(b) => (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/gzip"),
                ),
                (
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("private, max-age=31536000, immutable"),
                ),
                (
                    header::ETAG,
                    HeaderValue::from_str(&format!("\"{sha}\"")).expect("hex"),
                ),
            ],
            Body::from(b),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn heartbeat(State(st): State<Shared>, req: Request) -> Response {
    use crate::nodes::Refusal;
    use crate::validate::MAX_HEARTBEAT_BYTES;
    let addr = peer(&req);
    let body = match axum::body::to_bytes(req.into_body(), MAX_HEARTBEAT_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("heartbeat over {} KiB", MAX_HEARTBEAT_BYTES >> 10),
            )
        }
    };
    let hb: Heartbeat = match serde_json::from_slice(&body) {
        Ok(h) => h,
        // serde_json's message is one line and quotes no more than the offending token.
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad heartbeat: {e}")),
    };
    match st.nodes.update(hb, addr, std::time::Instant::now()) {
        Ok(()) => StatusCode::OK.into_response(),
        Err(r @ Refusal::Invalid(_)) => error(StatusCode::BAD_REQUEST, r),
        Err(r @ Refusal::Full(_)) => {
            let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, r);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
            resp
        }
    }
}

/// The current publication, as nodes are classified against it.
fn classified_nodes(st: &AppState) -> Vec<fleet_common::wire::NodeView> {
    let spec = st.publisher.view();
    let current = spec.current.as_ref().map(crate::standing::Current::from);
    st.nodes.list(current, std::time::Instant::now())
}

/// Every node, or with any query parameter of [`crate::overview::Filter`] the matching ones; the
/// `x-total-count` header says how many matched before `offset` and `limit`.
async fn api_nodes(
    State(st): State<Shared>,
    q: Result<Query<crate::overview::Filter>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(filter)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad query: use standing, status, bundle, q, offset, limit",
        );
    };
    let (total, rows) = filter.apply(classified_nodes(&st));
    let mut resp = Json(rows).into_response();
    resp.headers_mut()
        .insert("x-total-count", HeaderValue::from(total));
    resp
}

/// The node table in counts (the dashboard's summary, for clients that poll).
async fn api_summary(State(st): State<Shared>) -> Response {
    Json(crate::events::node_summary(&st)).into_response()
}

/// The backend's live node ids, from `fleet scale` and `fleet status`: silent nodes among them
/// are kept rather than forgotten (nodes.rs).
async fn api_listed(State(st): State<Shared>, body: axum::body::Bytes) -> Response {
    let listing: crate::nodes::Listing = match serde_json::from_slice(&body) {
        Ok(l) => l,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad node listing: {e}")),
    };
    st.nodes.set_listed(listing.listed);
    StatusCode::NO_CONTENT.into_response()
}

/// Forgets a node the backend terminated, so it stops showing as silent.
async fn forget_node(State(st): State<Shared>, Path(id): Path<String>) -> Response {
    st.nodes.forget(&id);
    StatusCode::NO_CONTENT.into_response()
}

async fn api_spec(State(st): State<Shared>) -> Response {
    Json(st.publisher.view()).into_response()
}

async fn api_master(State(st): State<Shared>) -> Response {
    Json(st.master.view()).into_response()
}

/// The dashboard's live feed: a Server-Sent Events stream of snapshots (`events.rs`).
async fn api_events(State(st): State<Shared>) -> Response {
    crate::events::response(st)
}

async fn api_swarm(State(st): State<Shared>, Json(s): Json<SwarmRequest>) -> Response {
    if s.users == 0 || s.spawn_rate.is_nan() || s.spawn_rate <= 0.0 {
        return error(
            StatusCode::BAD_REQUEST,
            "users and spawn_rate must be positive",
        );
    }
    // With no worker, Locust answers success and runs nothing (LOCUST.md): say so instead.
    match st.master.api.stats().await {
        Ok(stats) if stats.worker_count == 0 => {
            return error(
                StatusCode::CONFLICT,
                "no Locust worker is connected; scale the fleet up first",
            )
        }
        Ok(_) => {}
        Err(e) => {
            return error(
                StatusCode::BAD_GATEWAY,
                format!("Locust master unreachable: {e:#}"),
            )
        }
    }
    match st.master.api.swarm(&s).await {
        Ok(()) => {
            st.master.set_swarm(Some(s));
            Json(serde_json::json!({ "ok": true })).into_response()
        }
        Err(e) => error(StatusCode::BAD_GATEWAY, format!("{e:#}")),
    }
}

async fn api_stop(State(st): State<Shared>) -> Response {
    st.master.set_swarm(None);
    match st.master.api.stop().await {
        Ok(()) => Json(serde_json::json!({ "ok": true })).into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, format!("{e:#}")),
    }
}

async fn dashboard(State(st): State<Shared>) -> Response {
    let page = include_str!("dashboard.html").replace("{{fleet}}", &html_escape(&st.name));
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page,
    )
        .into_response()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The rustls server config: exactly one certificate chain and one private key, ring as the
/// explicit provider (as in the client), session tickets and a session cache so agents that
/// reconnect for every request resume instead of paying a full handshake.
pub fn tls_config(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .context("server certificate is not valid PEM")?;
    anyhow::ensure!(
        !certs.is_empty(),
        "server certificate file holds no certificate"
    );
    let mut keys: Vec<_> = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .context("server key is not valid PEM")?
        .into_iter()
        .collect();
    anyhow::ensure!(
        keys.len() == 1,
        "server key file must hold exactly one private key"
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, keys.remove(0))
        .context("server certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(8192);
    cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(cfg))
}

/// Serves `app` over TLS on `listener` until `shutdown` turns true. There is no plaintext path:
/// a connection that does not complete a TLS handshake within 10 s is dropped.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    use tower::ServiceExt;
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    crate::log(format_args!("accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let svc = app
            .clone()
            .map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(Peer(addr));
                req
            });
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let svc = hyper_util::service::TowerToHyperService::new(svc);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(tls), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, origin: Option<&str>) -> Request {
        let mut b = axum::http::Request::builder()
            .method(method)
            .uri("/locust/swarm")
            .header(header::HOST, "ctl.example:8443");
        if let Some(o) = origin {
            b = b.header(header::ORIGIN, o);
        }
        b.body(Body::empty()).unwrap()
    }

    #[test]
    fn cross_site_posts_are_told_apart() {
        assert!(cross_site(&req("POST", Some("https://evil.example"))));
        assert!(cross_site(&req("POST", Some("http://ctl.example:8443"))));
        assert!(cross_site(&req("DELETE", Some("null"))));
        assert!(!cross_site(&req("POST", Some("https://ctl.example:8443"))));
        assert!(!cross_site(&req("POST", None)), "scripts send no Origin");
        assert!(
            !cross_site(&req("GET", Some("https://evil.example"))),
            "reads change nothing"
        );
    }
}
