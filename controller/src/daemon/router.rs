//! The controller's HTTPS API (docs/protocol.md): one axum router, served over rustls only.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
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

use crate::daemon::auth::{Auth, Refusal, Role};
use crate::daemon::nodes::Nodes;
use crate::daemon::publish::Publisher;
use crate::master::Master;

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
        .route(crate::daemon::events::SUMMARY_ROUTE, get(api_summary))
        .route(
            &format!("{}/{{id}}", routes::API_NODES),
            axum::routing::delete(forget_node),
        )
        .route(routes::API_SPEC, get(api_spec))
        .route(routes::API_MASTER, get(api_master))
        .route(crate::daemon::events::ROUTE, get(api_events))
        .route(
            crate::daemon::fanout::ROUTE,
            get(crate::daemon::fanout::api),
        )
        .route(routes::API_SWARM, post(api_swarm))
        .route(routes::API_STOP, post(api_stop))
        .route("/locust", any(crate::daemon::proxy::locust))
        .route("/locust/", any(crate::daemon::proxy::locust))
        .route("/locust/{*rest}", any(crate::daemon::proxy::locust))
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
        Refusal::Busy => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "too many password checks at once; retry in a moment\n",
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

/// The `Authorization` value and the client it counts for, owned: nothing borrowed from the
/// request is held while the check waits (the body is not `Sync`).
fn credentials(st: &AppState, req: &Request) -> (Option<String>, IpAddr) {
    let h = req.headers();
    let text = |name| h.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    let authz = text(header::AUTHORIZATION.as_str()).map(str::to_string);
    let client = st
        .auth
        .client(peer(req), text(crate::daemon::client_ip::REAL_IP_HEADER));
    (authz, client)
}

async fn require(State((st, role)): State<(Shared, Role)>, req: Request, next: Next) -> Response {
    let (authz, client) = credentials(&st, &req);
    match st.auth.check(authz.as_deref(), client, role).await {
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
    let (authz, client) = credentials(&st, &req);
    match st
        .auth
        .check(authz.as_deref(), client, Role::Operator)
        .await
    {
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
                st.publisher.fanout.manifest(p.manifest.sequence);
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
            st.publisher.fanout.bundle_body(&sha, b),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn heartbeat(State(st): State<Shared>, req: Request) -> Response {
    use crate::daemon::nodes::validate::MAX_HEARTBEAT_BYTES;
    use crate::daemon::nodes::Refusal;
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
    let current = st.publisher.current();
    let past = crate::daemon::publish::count_past(&hb, current.as_ref().map(|p| &p.manifest));
    match st.nodes.update(hb, addr, std::time::Instant::now()) {
        Ok(()) => {
            if let Some(seen) = past {
                learn(&st.publisher, seen);
            }
            StatusCode::OK.into_response()
        }
        Err(r @ Refusal::Invalid(_)) => error(StatusCode::BAD_REQUEST, r),
        Err(r @ Refusal::Full(_)) => {
            let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, r);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
            resp
        }
    }
}

/// An agent has seen a sequence at or above the current one: count on from above it
/// (docs/protocol.md, "State loss").
fn learn(publisher: &Publisher, seen: u64) {
    match publisher.learn(seen) {
        Ok(Some(p)) => crate::log(format_args!(
            "an agent has seen sequence {seen}: published bundle {} again as sequence {}",
            &p.manifest.bundle.sha256[..12],
            p.manifest.sequence
        )),
        Ok(None) => {}
        Err(e) => crate::log(format_args!("cannot publish: {e:#}")),
    }
}

/// The current publication, as nodes are classified against it.
fn classified_nodes(st: &AppState) -> Vec<fleet_common::wire::NodeView> {
    let spec = st.publisher.view();
    let current = spec
        .current
        .as_ref()
        .map(crate::daemon::nodes::standing::Current::from);
    st.nodes.list(current, std::time::Instant::now())
}

/// Every node, or with any query parameter of [`crate::daemon::nodes::overview::Filter`] the matching ones; the
/// `x-total-count` header says how many matched before `offset` and `limit`.
async fn api_nodes(
    State(st): State<Shared>,
    q: Result<
        Query<crate::daemon::nodes::overview::Filter>,
        axum::extract::rejection::QueryRejection,
    >,
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
    Json(crate::daemon::events::node_summary(&st)).into_response()
}

/// The backend's live node ids, from `fleet scale` and `fleet status`: silent nodes among them
/// are kept rather than forgotten (nodes.rs).
async fn api_listed(State(st): State<Shared>, body: axum::body::Bytes) -> Response {
    let listing: crate::daemon::nodes::Listing = match serde_json::from_slice(&body) {
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
    crate::daemon::events::response(st)
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
/// explicit provider (as in the client), session tickets and a session cache so clients that
/// reconnect resume instead of paying a full handshake. ALPN offers HTTP/2 first (an agent
/// multiplexes its long-poll, heartbeats and downloads over one connection), then HTTP/1.1
/// (nginx's upstream connections, curl, old clients).
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

/// Serves `app` over TLS on `listener` until `shutdown` turns true, HTTP/2 or HTTP/1.1 as
/// ALPN chose. There is no plaintext path. At most `max_conns` connections are served at once;
/// past that they are shed (`crate::daemon::listener`). A failing `accept` (`EMFILE` ...) pauses the
/// loop, longer each time, and is logged once per interval, not once per failure.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    max_conns: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    use crate::daemon::listener::{accept_pause, shed, Throttle, LOG_EVERY, SHED_SLOTS};
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    use tokio::sync::Semaphore;
    use tower::ServiceExt;
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
                    if let Some(n) = accept_log.hit(std::time::Instant::now()) {
                        crate::log(format_args!(
                            "accept failed {n} time(s) in {}s, last: {e}; pausing up to 1 s each \
                             time (raise LimitNOFILE or lower controller.max_connections)",
                            LOG_EVERY.as_secs()
                        ));
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
            if let Some(n) = shed_log.hit(std::time::Instant::now()) {
                crate::log(format_args!(
                    "at the cap of {max_conns} connections: shed {n} in {}s (503 with \
                     Retry-After, or closed); raise LimitNOFILE or controller.max_connections",
                    LOG_EVERY.as_secs()
                ));
            }
            if let Ok(slot) = shedding.clone().try_acquire_owned() {
                let acceptor = shed_acceptor.clone();
                tokio::spawn(async move {
                    shed(tcp, acceptor).await;
                    drop(slot);
                });
            }
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let svc = app
            .clone()
            .map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
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
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(Ok(tls)) =
                tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
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
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

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
