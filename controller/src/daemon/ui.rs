//! The dashboard's static files: its own scripts and styles (the Spec view) and the vendored
//! libraries they use, compiled into the binary and served under `/ui/` (docs/security.md,
//! "Browsers"). Nothing is fetched from elsewhere: operators and nodes may have no internet.
//!
//! The dashboard names each file with a version tag, `/ui/NAME?v=TAG`, TAG taken from the
//! file's sha256. A request that carries the current tag may be cached for a year (the URL
//! changes when the file does); any other is answered `no-cache`, so a browser revalidates it
//! (`ETag` is the tag, `If-None-Match` gets `304`).

use std::sync::LazyLock;

use axum::extract::{Path, Query};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

/// One file served under `/ui/`.
pub struct Asset {
    pub name: &'static str,
    pub body: &'static [u8],
    pub content_type: &'static str,
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every file under `/ui/`. Vendored files are copied unchanged (ui/vendor/*/README.md).
pub const ASSETS: &[Asset] = &[
    Asset {
        name: "spec.js",
        body: include_bytes!("ui/spec.js"),
        content_type: JS,
    },
    Asset {
        name: "spec.css",
        body: include_bytes!("ui/spec.css"),
        content_type: CSS,
    },
    Asset {
        name: "vendor/codemirror/codemirror.js",
        body: include_bytes!("ui/vendor/codemirror/codemirror.js"),
        content_type: JS,
    },
    Asset {
        name: "vendor/codemirror/codemirror.css",
        body: include_bytes!("ui/vendor/codemirror/codemirror.css"),
        content_type: CSS,
    },
    Asset {
        name: "vendor/codemirror/python.js",
        body: include_bytes!("ui/vendor/codemirror/python.js"),
        content_type: JS,
    },
];

/// What a request with the current tag may be cached for: a year, as the URL changes with the
/// file. Private: the files sit behind the operator's credentials.
pub const CACHE_TAGGED: &str = "private, max-age=31536000, immutable";
/// Anything else: revalidate each time.
pub const CACHE_UNTAGGED: &str = "no-cache";

/// Each asset's tag: the first 16 hex digits of its sha256.
static TAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| fleet_common::bundle::sha256_hex(a.body)[..16].to_string())
        .collect()
});

/// The asset called `name`, with its tag.
pub fn find(name: &str) -> Option<(&'static Asset, &'static str)> {
    let i = ASSETS.iter().position(|a| a.name == name)?;
    Some((&ASSETS[i], TAGS[i].as_str()))
}

/// The `Cache-Control` for a request of an asset whose tag is `tag`, asked with `?v=asked`.
pub fn cache_control(asked: Option<&str>, tag: &str) -> &'static str {
    if asked == Some(tag) {
        CACHE_TAGGED
    } else {
        CACHE_UNTAGGED
    }
}

/// Replaces each `{{ui:NAME}}` in a page with the asset's tagged URL, `/ui/NAME?v=TAG`. A name
/// that is no asset is left as it is (a test checks the dashboard names only assets).
pub fn stamp(page: &str) -> String {
    let mut out = String::with_capacity(page.len());
    let mut rest = page;
    while let Some(at) = rest.find("{{ui:") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 5..];
        match after.find("}}").and_then(|end| {
            let name = &after[..end];
            find(name).map(|(_, tag)| (end, format!("/ui/{name}?v={tag}")))
        }) {
            Some((end, url)) => {
                out.push_str(&url);
                rest = &after[end + 2..];
            }
            None => {
                out.push_str("{{ui:");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[derive(Deserialize)]
pub(super) struct Tagged {
    v: Option<String>,
}

/// `GET /ui/{*name}`: one asset.
pub(super) async fn asset(
    Path(name): Path<String>,
    Query(q): Query<Tagged>,
    headers: HeaderMap,
) -> Response {
    let Some((a, tag)) = find(&name) else {
        return (StatusCode::NOT_FOUND, "no such file under /ui/\n").into_response();
    };
    let asked = q.v.as_deref();
    let etag = format!("\"{tag}\"");
    let cache = cache_control(asked, tag);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim() == etag));
    let base = [
        (header::CACHE_CONTROL, cache.to_string()),
        (header::ETAG, etag),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, base).into_response();
    }
    (base, [(header::CONTENT_TYPE, a.content_type)], a.body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dashboard_names_only_assets_and_every_asset_gets_a_tagged_url() {
        let page = stamp(include_str!("dashboard.html"));
        assert!(
            !page.contains("{{ui:"),
            "an unknown asset in dashboard.html"
        );
        for name in ["spec.js", "spec.css", "vendor/codemirror/codemirror.js"] {
            let (_, tag) = find(name).unwrap();
            assert_eq!(tag.len(), 16);
            assert!(
                page.contains(&format!("\"/ui/{name}?v={tag}\"")),
                "{name} is not linked"
            );
        }
        assert_eq!(stamp("a {{ui:nope}} b"), "a {{ui:nope}} b");
        assert_eq!(stamp("{{ui:spec.js"), "{{ui:spec.js");
    }

    #[test]
    fn only_the_current_tag_is_cached_for_long() {
        let (_, tag) = find("spec.js").unwrap();
        assert_eq!(cache_control(Some(tag), tag), CACHE_TAGGED);
        assert_eq!(cache_control(Some("0123456789abcdef"), tag), CACHE_UNTAGGED);
        assert_eq!(cache_control(None, tag), CACHE_UNTAGGED);
        assert!(find("../dashboard.html").is_none());
        assert!(find("vendor/codemirror/LICENSE").is_none());
    }

    #[tokio::test]
    async fn a_known_tag_is_not_sent_again_and_unknown_files_are_404() {
        let (a, tag) = find("spec.css").unwrap();
        let get = |name: &str, v: Option<&str>, etag: Option<String>| {
            let mut h = HeaderMap::new();
            if let Some(e) = etag {
                h.insert(header::IF_NONE_MATCH, e.parse().unwrap());
            }
            asset(
                Path(name.to_string()),
                Query(Tagged {
                    v: v.map(str::to_string),
                }),
                h,
            )
        };
        let r = get("spec.css", Some(tag), None).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], a.content_type);
        assert_eq!(r.headers()[header::CACHE_CONTROL], CACHE_TAGGED);
        assert_eq!(r.headers()[header::ETAG], format!("\"{tag}\""));
        let again = get("spec.css", None, Some(format!("W/\"x\", \"{tag}\""))).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(again.headers()[header::CACHE_CONTROL], CACHE_UNTAGGED);
        let stale = get("spec.css", None, Some("\"0000\"".into())).await;
        assert_eq!(stale.status(), StatusCode::OK);
        assert_eq!(
            get("nope.css", None, None).await.status(),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn vendored_files_are_the_ones_their_readme_lists() {
        let readme = include_str!("ui/vendor/codemirror/README.md");
        let licence = include_bytes!("ui/vendor/codemirror/LICENSE");
        let files = ASSETS
            .iter()
            .filter_map(|a| {
                let file = a.name.strip_prefix("vendor/codemirror/")?;
                Some((file, a.body))
            })
            .chain([("LICENSE", &licence[..])]);
        let mut checked = 0;
        for (file, body) in files {
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{file}` |")))
                .unwrap_or_else(|| panic!("{file} is not in the README's table"));
            let sha = fleet_common::bundle::sha256_hex(body);
            assert!(
                row.contains(&format!("`{sha}`")),
                "{file}: sha256 {sha} is not the README's ({row})"
            );
            checked += 1;
        }
        assert_eq!(checked, 4);
    }
}
