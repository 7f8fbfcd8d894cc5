//! Security headers on every answer the controller sends: the dashboard, `/api/*`, refusals,
//! and the Locust UI proxied under `/locust/` (docs/security.md, "Browsers").
//!
//! The Locust UI has Start and Stop buttons and no defence of its own against being framed, so
//! a page the operator visits could frame it and trick a click (clickjacking) while the browser
//! sends the cached basic-auth credentials. No page of the controller is ever framed, so both
//! the old header (`X-Frame-Options`) and the CSP directive that replaces it forbid any framing.
//! The controller is HTTPS only, so browsers are also told never to try plain HTTP (HSTS). The
//! nginx template sends the same set (docs/nginx.md).

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

/// HSTS lifetime: one year, the usual value. No `includeSubDomains`: the controller's name may
/// share a parent domain with sites fleet knows nothing about.
pub const HSTS: &str = "max-age=31536000";

/// The headers, in the order they are set. A value from the proxied Locust UI is replaced.
pub const SECURITY_HEADERS: &[(&str, &str)] = &[
    ("strict-transport-security", HSTS),
    ("x-frame-options", "DENY"),
    ("content-security-policy", "frame-ancestors 'none'"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "same-origin"),
];

/// Sets [`SECURITY_HEADERS`] on `headers`, replacing what was there.
pub fn apply(headers: &mut HeaderMap) {
    for (name, value) in SECURITY_HEADERS {
        headers.insert(
            header::HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
}

/// The middleware around the whole router.
pub(super) async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    apply(resp.headers_mut());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_forbids_framing_and_replaces_what_an_upstream_sent() {
        let mut h = HeaderMap::new();
        h.insert("x-frame-options", HeaderValue::from_static("ALLOWALL"));
        h.insert("content-security-policy", HeaderValue::from_static("x"));
        apply(&mut h);
        assert_eq!(h.get_all("x-frame-options").iter().count(), 1);
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["content-security-policy"], "frame-ancestors 'none'");
        assert_eq!(h["strict-transport-security"], HSTS);
    }
}
