//! `/locust/*`: Locust's own web UI and API, reverse-proxied behind the controller's auth.
//!
//! The master runs with `--web-base-path /locust`, so paths pass through unchanged. What the
//! proxy fixes (docs/locust.md, "The web UI and REST API, as a proxy in front sees them"): the
//! 308 from `/locust` carries an absolute `http://` Location, made relative here;
//! an answer that does not come is a `504` after `master.proxy_timeout_s`;
//! `Access-Control-Allow-Origin: *` is dropped; the operator's
//! `Authorization` header is never forwarded. A `POST /locust/swarm` is also recorded, so the
//! controller re-starts that test after a master restart.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::time::Duration;

use fleet_common::wire::SwarmRequest;
use http_body_util::Full;

use crate::daemon::router::Shared;

/// Largest request body passed to Locust (its forms are tiny).
const MAX_BODY: usize = 1 << 20;

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "authorization",
    "cookie",
];

fn form_value<'a>(form: &'a str, key: &str) -> Option<&'a str> {
    form.split('&').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
    })
}

pub(super) async fn locust(State(st): State<Shared>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().strip_prefix("/locust").unwrap_or("");
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    // `/locust/<k>/...` is shard k's own UI (k > 0; its base ends in `/locust/<k>`).
    let (shard, path) = shard_of(path, st.master.shard_count());
    let api = st
        .master
        .shard_api(shard)
        .unwrap_or_else(|| st.master.api.clone());
    // `base` ends in `/locust` for a managed master; the remaining path goes after it.
    let uri = format!("{}{path}{query}", api.base());
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n").into_response()
        }
    };
    if shard == 0 {
        record(&st.master, &parts.method, path, &body);
    }
    let mut out = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(&uri);
    for (k, v) in parts.headers.iter() {
        if !HOP_BY_HOP.contains(&k.as_str()) && k != header::HOST {
            out = out.header(k, v);
        }
    }
    let out = match out.body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let timeout = st.master.proxy_timeout();
    let resp = match tokio::time::timeout(timeout, api.client().request(out)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return upstream_failure(Failure::Error(&e), timeout),
        Err(_) => return upstream_failure(Failure::NoAnswer, timeout),
    };
    let (mut rparts, rbody) = resp.into_parts();
    rparts.headers.remove(header::ACCESS_CONTROL_ALLOW_ORIGIN);
    for h in HOP_BY_HOP {
        if *h != "authorization" && *h != "cookie" {
            rparts.headers.remove(*h);
        }
    }
    if let Some(loc) = rparts
        .headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
    {
        // `http://<host>/locust/` -> `/locust/`: the browser keeps https and our host.
        if let Some(rest) = loc
            .strip_prefix("http://")
            .or_else(|| loc.strip_prefix("https://"))
        {
            let rel = rest.find('/').map(|i| &rest[i..]).unwrap_or("/");
            if let Ok(v) = HeaderValue::from_str(rel) {
                rparts.headers.insert(header::LOCATION, v);
            }
        }
    }
    Response::from_parts(rparts, Body::new(rbody))
}

/// Why the web UI gave no answer.
enum Failure<'a> {
    /// The client failed: no connection (refused, or none within
    /// [`crate::master::CONNECT_TIMEOUT`]), or the connection broke.
    Error(&'a hyper_util::client::legacy::Error),
    /// Connected, but no answer's head within `master.proxy_timeout_s`.
    NoAnswer,
}

/// The answer for a request the web UI did not answer: `504` when it was too slow (to connect
/// or to answer), `502` when it is not there; one line that says what to do.
fn upstream_failure(f: Failure<'_>, timeout: Duration) -> Response {
    let connect_timed_out = |e: &hyper_util::client::legacy::Error| {
        let mut cause = std::error::Error::source(e);
        while let Some(c) = cause {
            if c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            {
                return e.is_connect();
            }
            cause = c.source();
        }
        false
    };
    let (status, msg) = match f {
        Failure::NoAnswer => (
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the Locust master's web UI did not answer within {} s (is it overloaded?); \
                 retry, or raise master.proxy_timeout_s\n",
                timeout.as_secs()
            ),
        ),
        Failure::Error(e) if connect_timed_out(e) => (
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "no connection to the Locust master's web UI within {} s; check master.web_url \
                 and that the master is running\n",
                crate::master::CONNECT_TIMEOUT.as_secs()
            ),
        ),
        Failure::Error(_) => (
            StatusCode::BAD_GATEWAY,
            "the Locust master's web UI is not reachable (is it starting?)\n".to_string(),
        ),
    };
    (status, msg).into_response()
}

/// The shard a path after `/locust` is for, and the path its UI sees after its base:
/// `/2/stats` with 3 shards is shard 2's `/stats`; anything else is shard 0's.
fn shard_of(path: &str, shards: usize) -> (usize, &str) {
    let Some(rest) = path.strip_prefix('/') else {
        return (0, path);
    };
    let (first, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    match first.parse::<usize>() {
        Ok(k) if k > 0 && k < shards && !first.starts_with('0') => (k, tail),
        _ => (0, path),
    }
}

/// A test started or stopped through the Locust UI: the swarm keeper holds it (or forgets it)
/// as if it came through `/api/swarm` or `/api/stop`.
fn record(master: &crate::master::Master, method: &axum::http::Method, path: &str, body: &[u8]) {
    if method != axum::http::Method::POST {
        return;
    }
    if path == "/swarm" {
        let form = String::from_utf8_lossy(body);
        let users = form_value(&form, "user_count").and_then(|v| v.parse::<u64>().ok());
        let rate = form_value(&form, "spawn_rate").and_then(|v| v.parse::<f64>().ok());
        let run_time = form_value(&form, "run_time")
            .filter(|v| !v.is_empty())
            .and_then(|v| {
                v.parse::<u64>()
                    .map(Duration::from_secs)
                    .ok()
                    .or_else(|| humantime::parse_duration(v).ok())
            });
        if let (Some(users), Some(spawn_rate)) = (users, rate) {
            master.set_swarm_until(Some(SwarmRequest { users, spawn_rate }), run_time);
        }
    } else if path == "/stop" {
        master.set_swarm(None);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn form_values() {
        assert_eq!(
            super::form_value("user_count=5&spawn_rate=2.5", "spawn_rate"),
            Some("2.5")
        );
        assert_eq!(super::form_value("user_count=5", "host"), None);
    }

    #[test]
    fn a_shard_number_after_locust_picks_that_shards_ui() {
        use super::shard_of;
        assert_eq!(shard_of("/2/stats/requests", 3), (2, "/stats/requests"));
        assert_eq!(shard_of("/1/", 3), (1, "/"));
        assert_eq!(shard_of("/1", 3), (1, ""));
        // Shard 0, a number past the shards, and Locust's own paths stay with shard 0.
        for p in ["/0/x", "/3/x", "/01/x", "/stats/requests", "/", ""] {
            assert_eq!(shard_of(p, 3), (0, p), "{p}");
        }
        assert_eq!(
            shard_of("/1/x", 1),
            (0, "/1/x"),
            "no shards: no shard paths"
        );
    }
}
