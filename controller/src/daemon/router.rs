//! The controller's HTTPS API (docs/protocol.md): one axum router, and the check every guarded
//! route passes first (credentials for its role, and for the operator's routes no cross-site
//! write). The handlers live in `agent_routes` and `operator_routes`; `listener` serves the
//! router over rustls only.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use fleet_common::wire::routes;

use crate::daemon::auth::{Auth, Refusal, Role};
use crate::daemon::nodes::Nodes;
use crate::daemon::publish::Publisher;
use crate::daemon::reload::Reloaded;
use crate::daemon::spec::routes as spec;
use crate::daemon::{agent_routes, operator_routes};
use crate::master::Master;

/// What every handler reads: the publications, the node table, the Locust master, the
/// credentials and how to reload them, and the fleet's name.
pub(crate) struct AppState {
    pub publisher: Arc<Publisher>,
    pub nodes: Arc<Nodes>,
    pub master: Master,
    pub auth: Arc<Auth>,
    /// Reloads the certificate and the credentials (`reload::Reloader::reload`).
    pub reload: Arc<dyn Fn() -> anyhow::Result<Reloaded> + Send + Sync>,
    pub name: String,
    /// The spec editor's way to the Steward.
    pub spec: crate::daemon::spec::Handle,
    /// The test's stats as last read, for the event stream.
    pub stats: crate::master::view::StatsView,
}

pub(crate) type Shared = Arc<AppState>;

/// The TCP peer of a request, set per connection by the listener (`listener::serve_tls`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Peer(pub SocketAddr);

pub(super) fn peer(req: &Request) -> SocketAddr {
    req.extensions()
        .get::<Peer>()
        .map(|p| p.0)
        .unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0))
}

/// The whole API: the agents' routes (agent token), the operator's (UI password or operator
/// token), `/healthz` open to all, and a fallback that refuses like any guarded route.
pub(super) fn app(state: Shared) -> Router {
    let agent = Router::new()
        .route(routes::MANIFEST, get(agent_routes::manifest))
        .route(
            &format!("{}/{{sha}}", routes::BUNDLES),
            get(agent_routes::bundle),
        )
        .route(routes::HEARTBEAT, post(agent_routes::heartbeat))
        .route_layer(from_fn_with_state((state.clone(), Role::Agent), require));
    let human = Router::new()
        .route("/", get(operator_routes::dashboard))
        .route("/ui/{*name}", get(crate::daemon::ui::asset))
        .route(
            routes::API_NODES,
            get(operator_routes::api_nodes).put(operator_routes::api_listed),
        )
        .route(
            crate::daemon::events::SUMMARY_ROUTE,
            get(operator_routes::api_summary),
        )
        .route(
            &format!("{}/{{id}}", routes::API_NODES),
            axum::routing::delete(operator_routes::forget_node),
        )
        .route(routes::API_SPEC, get(operator_routes::api_spec))
        .route(routes::API_SPEC_FILES, get(spec::files))
        .route(
            routes::API_SPEC_FILE,
            get(spec::file)
                .put(spec::put_file)
                .delete(spec::delete_file),
        )
        .route(routes::API_SPEC_DIFF, get(spec::diff))
        .route(
            routes::API_SPEC_BUNDLE,
            get(spec::get_bundle).post(spec::push),
        )
        .route(routes::API_SPEC_ROLLBACK, post(spec::rollback))
        .route(routes::API_MASTER, get(operator_routes::api_master))
        .route(routes::API_STATS, get(operator_routes::api_stats))
        .route(routes::API_STATS_CSV, get(operator_routes::api_stats_csv))
        .route(
            crate::daemon::events::ROUTE,
            get(operator_routes::api_events),
        )
        .route(
            crate::daemon::fanout::ROUTE,
            get(crate::daemon::fanout::api),
        )
        .route(routes::API_SWARM, post(operator_routes::api_swarm))
        .route(routes::API_STOP, post(operator_routes::api_stop))
        .route(routes::API_RELOAD, post(operator_routes::api_reload))
        .route("/locust", any(crate::daemon::proxy::locust))
        .route("/locust/", any(crate::daemon::proxy::locust))
        .route("/locust/{*rest}", any(crate::daemon::proxy::locust))
        .route_layer(from_fn_with_state((state.clone(), Role::Operator), require));
    Router::new()
        .route(routes::HEALTH, get(|| async { "ok\n" }))
        .merge(agent)
        .merge(human)
        .fallback(fallback)
        .layer(axum::middleware::from_fn(
            crate::daemon::headers::security_headers,
        ))
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

/// The address a request comes from, for display: the TCP peer, or the client a trusted proxy
/// named in `X-Real-IP` (its port unknown, so 0).
pub(super) fn client_addr(st: &AppState, req: &Request) -> SocketAddr {
    let (_, client) = credentials(st, req);
    let p = peer(req);
    if client == p.ip() {
        p
    } else {
        SocketAddr::new(client, 0)
    }
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

/// A JSON `{"error": ...}` body: the one shape every refusal of a handler takes.
pub(super) fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": msg.to_string() })),
    )
        .into_response()
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
