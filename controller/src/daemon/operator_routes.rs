//! The operator's routes (UI password or operator token): the dashboard, `/api/*` (the node
//! table, the spec, the master, the test) (docs/protocol.md). `/api/events` is `events`,
//! `/api/fanout` is `fanout`, `/locust/*` is `proxy`.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fleet_common::wire::SwarmRequest;

use crate::daemon::router::{error, AppState, Shared};

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
pub(super) async fn api_nodes(
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
pub(super) async fn api_summary(State(st): State<Shared>) -> Response {
    Json(crate::daemon::events::node_summary(&st)).into_response()
}

/// The backend's live node ids, from `fleet scale` and `fleet status`: silent nodes among them
/// are kept rather than forgotten (nodes.rs).
pub(super) async fn api_listed(State(st): State<Shared>, body: axum::body::Bytes) -> Response {
    let listing: crate::daemon::nodes::Listing = match serde_json::from_slice(&body) {
        Ok(l) => l,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad node listing: {e}")),
    };
    st.nodes.set_listed(listing.listed);
    StatusCode::NO_CONTENT.into_response()
}

/// Forgets a node the backend terminated, so it stops showing as silent.
pub(super) async fn forget_node(State(st): State<Shared>, Path(id): Path<String>) -> Response {
    st.nodes.forget(&id);
    StatusCode::NO_CONTENT.into_response()
}

/// The publication, its history, and why the spec is not published if it is not.
pub(super) async fn api_spec(State(st): State<Shared>) -> Response {
    Json(st.publisher.view()).into_response()
}

/// The Locust master as the supervisor sees it.
pub(super) async fn api_master(State(st): State<Shared>) -> Response {
    let mut view = st.master.view();
    view.capacity_warning = st.master.capacity_warning(st.nodes.listed_count());
    Json(view).into_response()
}

/// The test's stats now, merged over its masters, in the shape of Locust's `/stats/requests`
/// (`master/view.rs`); `502` with the reason when a master cannot be read.
pub(super) async fn api_stats(State(st): State<Shared>) -> Response {
    match st.master.merged_stats().await {
        Ok(view) => {
            let mut resp = Json(view.report()).into_response();
            let exact = if view.exact() { "merged" } else { "locust" };
            resp.headers_mut()
                .insert("x-fleet-stats", HeaderValue::from_static(exact));
            no_store(resp)
        }
        Err(e) => error(StatusCode::BAD_GATEWAY, e),
    }
}

/// The same numbers as Locust's `stats.csv`.
pub(super) async fn api_stats_csv(State(st): State<Shared>) -> Response {
    match st.master.merged_stats_csv().await {
        Ok(csv) => {
            no_store(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], csv).into_response())
        }
        Err(e) => error(StatusCode::BAD_GATEWAY, e),
    }
}

fn no_store(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The dashboard's live feed: a Server-Sent Events stream of snapshots (`events.rs`).
pub(super) async fn api_events(State(st): State<Shared>) -> Response {
    crate::daemon::events::response(st)
}

/// Starts or changes the test; the swarm keeper holds it from then on.
pub(super) async fn api_swarm(State(st): State<Shared>, Json(s): Json<SwarmRequest>) -> Response {
    if s.users == 0 || s.spawn_rate.is_nan() || s.spawn_rate <= 0.0 {
        return error(
            StatusCode::BAD_REQUEST,
            "users and spawn_rate must be positive",
        );
    }
    // With no worker, Locust answers success and runs nothing (docs/locust.md, "The web UI and
    // REST API, as a proxy in front sees them"): say so instead.
    match st.master.worker_count().await {
        Ok(0) => {
            return error(
                StatusCode::CONFLICT,
                "no Locust worker is connected; scale the fleet up first",
            )
        }
        Ok(_) => {}
        Err(e) => return error(StatusCode::BAD_GATEWAY, e.to_string()),
    }
    match st.master.swarm(&s).await {
        Ok(()) => Json(serde_json::json!({ "ok": true })).into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, format!("{e:#}")),
    }
}

/// Stops the test; the swarm keeper forgets it.
pub(super) async fn api_stop(State(st): State<Shared>) -> Response {
    match st.master.stop_test().await {
        Ok(()) => Json(serde_json::json!({ "ok": true })).into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, format!("{e:#}")),
    }
}

/// `POST /api/reload`: what SIGHUP does (the certificate and the credentials), answered with
/// what changed; `422` with the reason when the files on disk are not a valid set (then
/// nothing changed).
pub(super) async fn api_reload(State(st): State<Shared>) -> Response {
    let reload = st.reload.clone();
    let r = tokio::task::spawn_blocking(move || reload())
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("the reload failed: {e}")));
    let answer = match &r {
        Ok(done) => Json(done).into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}")),
    };
    crate::daemon::log_reload("POST /api/reload", r);
    answer
}

/// The dashboard page with the fleet's name and its files' tagged URLs (`ui`) in it.
pub(super) async fn dashboard(State(st): State<Shared>) -> Response {
    let page = crate::daemon::ui::stamp(include_str!("dashboard.html"))
        .replace("{{fleet}}", &html_escape(&st.name));
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
