//! The agents' routes (agent token only): the long-polled manifest, bundle downloads, and
//! heartbeats (docs/protocol.md).

use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use fleet_common::bundle::is_sha256_hex;
use fleet_common::manifest::SIGNATURE_HEADER;
use fleet_common::wire::{json_error, Heartbeat, MAX_WAIT_SECS};
use serde::Deserialize;

use crate::daemon::publish::Publisher;
use crate::daemon::router::{client_addr, error, Shared};

#[derive(Deserialize)]
pub(super) struct ManifestQuery {
    /// The sequence the agent runs: answer only with a newer one.
    after: Option<u64>,
    /// Seconds to hold the request open waiting for a newer one (long-poll).
    wait: Option<u64>,
}

/// `GET /v1/manifest`: the current signed manifest, or with `after` only a newer one, held
/// open up to `wait` seconds for it (docs/protocol.md, "Long-poll").
pub(super) async fn manifest(State(st): State<Shared>, Query(q): Query<ManifestQuery>) -> Response {
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

/// `GET /v1/bundles/{sha}`: a published bundle by its digest, cacheable forever.
pub(super) async fn bundle(State(st): State<Shared>, Path(sha): Path<String>) -> Response {
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

/// `POST /v1/heartbeat`: a node's report, bounded, checked, and kept in the node table.
pub(super) async fn heartbeat(State(st): State<Shared>, req: Request) -> Response {
    use crate::daemon::nodes::validate::MAX_HEARTBEAT_BYTES;
    use crate::daemon::nodes::Refusal;
    // Behind the nginx front, the node's own address (X-Real-IP from a trusted proxy).
    let addr = client_addr(&st, &req);
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
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("bad heartbeat: {}", json_error(&e)),
            )
        }
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
        Ok(Some(p)) => log!(
            "an agent has seen sequence {seen}: published bundle {} again as sequence {}",
            &p.manifest.bundle.sha256[..12],
            p.manifest.sequence
        ),
        Ok(None) => {}
        Err(e) => log!("cannot publish: {e:#}"),
    }
}
