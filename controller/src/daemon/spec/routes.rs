//! The spec editor's routes, for `fleet spec` and the web UI (docs/protocol.md, "Editing the
//! spec"). Reads take a version: a sequence from the history, `current` (the default), or
//! `dir` (the spec directory as it is now, published or not). Changes carry the sequence they
//! were based on and go through the Steward.

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use fleet_common::wire::SpecVersion;
use serde::Deserialize;
use tokio::sync::oneshot;

use super::{tree, Answer, Edit, Request};
use crate::daemon::router::{error, Shared};

/// A refusal: its status and its one line, answered as `{"error": ...}`.
pub(crate) struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

fn refuse(status: StatusCode, msg: impl std::fmt::Display) -> Refusal {
    Refusal(status, msg.to_string())
}

type Answered = Result<Response, Refusal>;

/// Which version a read is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Current,
    Dir,
    Sequence(u64),
}

/// Parses a `version` parameter: absent or `current`, `dir`, or a sequence number.
pub fn which(v: Option<&str>) -> Result<Which, String> {
    match v.map(str::trim) {
        None | Some("") | Some("current") => Ok(Which::Current),
        Some("dir") => Ok(Which::Dir),
        Some(n) => n
            .parse()
            .map(Which::Sequence)
            .map_err(|_| format!("bad version {n:?}: give a sequence number, `current` or `dir`")),
    }
}

/// A version's bundle, and its publication if it is one (`dir` may not be).
struct Read {
    bundle: Bytes,
    sha256: String,
    version: Option<SpecVersion>,
}

async fn read(st: &Shared, w: Which) -> Result<Read, Refusal> {
    let published = |p: std::sync::Arc<crate::daemon::publish::Publication>| Read {
        bundle: p.bundle.clone(),
        sha256: p.manifest.bundle.sha256.clone(),
        version: Some(p.version()),
    };
    match w {
        Which::Current => st.publisher.current().map(published).ok_or_else(|| {
            refuse(
                StatusCode::NOT_FOUND,
                "nothing is published yet; push a spec or fix the one in the spec directory",
            )
        }),
        Which::Sequence(n) => st.publisher.find(n).map(published).ok_or_else(|| {
            refuse(
                StatusCode::NOT_FOUND,
                format!(
                    "version {n} is not in the history the controller keeps; see GET /api/spec"
                ),
            )
        }),
        Which::Dir => {
            let h = st.spec.clone();
            let packed = tokio::task::spawn_blocking(move || {
                fleet_common::bundle::pack_dir(&h.spec_dir, &h.locustfile, &h.limits)
            })
            .await
            .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e))?
            .map_err(|e| {
                refuse(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("the spec directory does not pack: {e}"),
                )
            })?;
            let version = st
                .publisher
                .current()
                .filter(|p| p.manifest.bundle.sha256 == packed.sha256)
                .map(|p| p.version());
            Ok(Read {
                sha256: packed.sha256,
                bundle: Bytes::from(packed.bytes),
                version,
            })
        }
    }
}

fn query<T>(q: Result<Query<T>, QueryRejection>, what: &str) -> Result<T, Refusal> {
    q.map(|Query(t)| t)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("bad query ({e}); {what}")))
}

/// The version a `version` parameter names, read.
async fn read_param(st: &Shared, v: Option<&str>) -> Result<Read, Refusal> {
    let w = which(v).map_err(|e| refuse(StatusCode::BAD_REQUEST, e))?;
    read(st, w).await
}

/// The headers that say which version an answer is.
fn version_headers(resp: &mut Response, r: &Read) {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&r.sha256) {
        h.insert("x-fleet-sha256", v);
    }
    if let Some(v) = &r.version {
        h.insert("x-fleet-sequence", HeaderValue::from(v.sequence));
    }
}

#[derive(Deserialize)]
pub(crate) struct VersionQuery {
    version: Option<String>,
}

/// `GET /api/spec/files?version=V`: the version's tree.
pub(crate) async fn files(
    State(st): State<Shared>,
    q: Result<Query<VersionQuery>, QueryRejection>,
) -> Answered {
    let q = query(q, "use version")?;
    let r = read_param(&st, q.version.as_deref()).await?;
    let files = tree::tree(&r.bundle).map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Json(serde_json::json!({
        "version": r.version,
        "sha256": r.sha256,
        "files": files,
    }))
    .into_response())
}

#[derive(Deserialize)]
pub(crate) struct FileQuery {
    version: Option<String>,
    path: String,
}

/// `GET /api/spec/file?version=V&path=P`: one file's bytes.
pub(crate) async fn file(
    State(st): State<Shared>,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> Answered {
    let q = query(q, "use path and version")?;
    let r = read_param(&st, q.version.as_deref()).await?;
    let data = tree::file(&r.bundle, &q.path)
        .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e))?
        .ok_or_else(|| {
            refuse(
                StatusCode::NOT_FOUND,
                format!(
                    "no file {:?} in this version; see GET /api/spec/files",
                    q.path
                ),
            )
        })?;
    let ty = if std::str::from_utf8(&data).is_ok() {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    };
    let mut resp = ([(header::CONTENT_TYPE, ty)], data).into_response();
    version_headers(&mut resp, &r);
    Ok(resp)
}

#[derive(Deserialize)]
pub(crate) struct DiffQuery {
    from: String,
    to: Option<String>,
}

/// `GET /api/spec/diff?from=A&to=B`: what changed from A to B (B defaults to `current`).
pub(crate) async fn diff(
    State(st): State<Shared>,
    q: Result<Query<DiffQuery>, QueryRejection>,
) -> Answered {
    let q = query(q, "use from and to")?;
    let a = read_param(&st, Some(&q.from)).await?;
    let b = read_param(&st, q.to.as_deref()).await?;
    let files = tree::diff(&a.bundle, &b.bundle)
        .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Json(serde_json::json!({
        "from": { "version": a.version, "sha256": a.sha256 },
        "to": { "version": b.version, "sha256": b.sha256 },
        "files": files,
    }))
    .into_response())
}

/// `GET /api/spec/bundle?version=V`: the version as a bundle (gzipped tar), for `fleet spec
/// pull`.
pub(crate) async fn get_bundle(
    State(st): State<Shared>,
    q: Result<Query<VersionQuery>, QueryRejection>,
) -> Answered {
    let q = query(q, "use version")?;
    let r = read_param(&st, q.version.as_deref()).await?;
    let mut resp = (
        [(header::CONTENT_TYPE, "application/gzip")],
        r.bundle.clone(),
    )
        .into_response();
    version_headers(&mut resp, &r);
    Ok(resp)
}

/// The parameters of a change.
#[derive(Deserialize)]
pub(crate) struct ChangeQuery {
    /// The sequence the change is based on.
    base: Option<u64>,
    /// `true` applies the change whatever was published since (no `base` needed).
    #[serde(default)]
    force: bool,
    /// `false` skips the validation gate for this change.
    validate: Option<bool>,
    /// The file, for `PUT` and `DELETE /api/spec/file`.
    path: Option<String>,
}

impl ChangeQuery {
    fn base(&self) -> Result<Option<u64>, Refusal> {
        match (self.base, self.force) {
            (_, true) => Ok(None),
            (Some(b), false) => Ok(Some(b)),
            (None, false) => Err(refuse(
                StatusCode::BAD_REQUEST,
                "give base=SEQ (the version your change is based on: current.sequence in GET \
                 /api/spec, 0 if none) or force=true",
            )),
        }
    }

    fn path(&self) -> Result<String, Refusal> {
        self.path
            .clone()
            .ok_or_else(|| refuse(StatusCode::BAD_REQUEST, "give path=FILE"))
    }
}

/// Reads a request body up to the bundle cap.
async fn body(st: &Shared, body: Body) -> Result<Vec<u8>, Refusal> {
    let cap = st.spec.limits.max_packed as usize;
    axum::body::to_bytes(body, cap)
        .await
        .map(|b| b.to_vec())
        .map_err(|_| {
            refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the upload is over the cap of {cap} bytes (controller.max_bundle_bytes) or \
                     was cut off"
                ),
            )
        })
}

/// Hands a change to the Steward and answers with its outcome.
async fn submit(st: &Shared, base: Option<u64>, edit: Edit, validate: bool) -> Answered {
    let (reply, answer) = oneshot::channel();
    let req = Request {
        base,
        edit,
        validate,
        reply,
    };
    st.spec.tx.try_send(req).map_err(|_| {
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller is busy with other spec changes; retry in a moment",
        )
    })?;
    let a = answer.await.map_err(|_| {
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller is stopping; retry when it is back",
        )
    })?;
    respond(a, st)
}

fn respond(a: Answer, st: &Shared) -> Answered {
    Ok(match a {
        Answer::Published { version, changed } => Json(serde_json::json!({
            "published": version,
            "changed": changed,
        }))
        .into_response(),
        Answer::Conflict(msg) => (
            StatusCode::CONFLICT,
            Json(serde_json::json!({
                "error": msg,
                "current": st.publisher.view().current,
            })),
        )
            .into_response(),
        Answer::Refused(r) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(serde_json::json!({
                "error": format!("spec not published: the validation gate refused it: {}", r.reason),
                "refused": r,
            })),
        )
            .into_response(),
        Answer::Invalid(msg) => return Err(refuse(StatusCode::BAD_REQUEST, msg)),
        Answer::NotFound(msg) => return Err(refuse(StatusCode::NOT_FOUND, msg)),
        Answer::Failed(msg) => return Err(refuse(StatusCode::INTERNAL_SERVER_ERROR, msg)),
    })
}

/// `POST /api/spec/bundle?base=N`: replace the whole spec with the uploaded bundle.
pub(crate) async fn push(
    State(st): State<Shared>,
    q: Result<Query<ChangeQuery>, QueryRejection>,
    b: Body,
) -> Answered {
    let q = query(q, "use base, force and validate")?;
    let base = q.base()?;
    let data = body(&st, b).await?;
    submit(&st, base, Edit::Replace(data), q.validate.unwrap_or(true)).await
}

/// `PUT /api/spec/file?path=P&base=N`: write one file (the body is its content).
pub(crate) async fn put_file(
    State(st): State<Shared>,
    q: Result<Query<ChangeQuery>, QueryRejection>,
    b: Body,
) -> Answered {
    let q = query(q, "use path, base, force and validate")?;
    let (base, path) = (q.base()?, q.path()?);
    let data = body(&st, b).await?;
    submit(
        &st,
        base,
        Edit::Put { path, data },
        q.validate.unwrap_or(true),
    )
    .await
}

/// `DELETE /api/spec/file?path=P&base=N`: remove one file.
pub(crate) async fn delete_file(
    State(st): State<Shared>,
    q: Result<Query<ChangeQuery>, QueryRejection>,
) -> Answered {
    let q = query(q, "use path, base, force and validate")?;
    let (base, path) = (q.base()?, q.path()?);
    submit(&st, base, Edit::Delete { path }, q.validate.unwrap_or(true)).await
}

/// `POST /api/spec/rollback` with `{"sequence": N}` (and `"validate": false` to skip the gate).
#[derive(Deserialize)]
pub(crate) struct Rollback {
    sequence: u64,
    #[serde(default = "yes")]
    validate: bool,
}

fn yes() -> bool {
    true
}

pub(crate) async fn rollback(
    State(st): State<Shared>,
    body: Result<Json<Rollback>, JsonRejection>,
) -> Answered {
    let Json(r) = body.map_err(|_| {
        refuse(
            StatusCode::BAD_REQUEST,
            "send {\"sequence\": N} (a version from GET /api/spec)",
        )
    })?;
    submit(&st, None, Edit::Rollback(r.sequence), r.validate).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_named_by_sequence_current_or_dir() {
        assert_eq!(which(None), Ok(Which::Current));
        assert_eq!(which(Some("current")), Ok(Which::Current));
        assert_eq!(which(Some("dir")), Ok(Which::Dir));
        assert_eq!(which(Some("12")), Ok(Which::Sequence(12)));
        assert!(which(Some("-1")).unwrap_err().contains("bad version"));
        assert!(which(Some("HEAD")).is_err());
    }
}
