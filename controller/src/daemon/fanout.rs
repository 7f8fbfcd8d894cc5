//! Fan-out accounting: for each recent publication, how many manifest and bundle answers the
//! controller has given for it and when the last one went out. Propagation measured at the
//! agents mixes the controller's work with the agents' (and, on one machine, with their share of
//! the CPU); this is the controller's own part: publication → last answer served
//! (docs/protocol.md, `GET /api/fanout`).
//!
//! The log is decided by pure functions of the event and `now`; the `manifest`, `bundle_body`
//! and `published` hooks only read the clock.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use serde::{Deserialize, Serialize};

use crate::daemon::router::Shared;

/// The operator route that shows the log.
pub const ROUTE: &str = "/api/fanout";

/// Publications kept, newest last: a minute of edits, and more than `bench/control_plane.py`
/// looks back over.
const KEEP: usize = 32;

/// Bundles are handed to the connection in frames of this size, so that the end of the last
/// frame is close to the last byte written rather than to the first (a connection buffers a
/// few hundred KiB at most before it asks for more).
const FRAME: usize = 64 << 10;

/// One publication as `GET /api/fanout` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FanoutView {
    pub sequence: u64,
    pub sha256: String,
    /// Wall clock of the publication, in milliseconds since the Unix epoch.
    pub published_unix_ms: u64,
    /// Manifest answers (`200`) carrying this sequence.
    pub manifests: u64,
    /// Bundle answers of this sequence's bundle, counted once their last byte was handed to the
    /// connection.
    pub bundles: u64,
    /// Milliseconds from the publication to the last manifest answer; null before the first.
    pub last_manifest_ms: Option<f64>,
    /// Milliseconds from the publication to the last complete bundle answer; null before the first.
    pub last_bundle_ms: Option<f64>,
}

#[derive(Debug)]
struct Record {
    sequence: u64,
    sha256: String,
    published: Instant,
    published_unix_ms: u64,
    manifests: u64,
    last_manifest: Option<Instant>,
    bundles: u64,
    last_bundle: Option<Instant>,
}

/// The log itself: pure, one method per event.
#[derive(Debug, Default)]
struct Log {
    /// Newest last.
    records: VecDeque<Record>,
}

impl Log {
    fn published(&mut self, sequence: u64, sha256: &str, now: Instant, wall: SystemTime) {
        self.records.push_back(Record {
            sequence,
            sha256: sha256.to_string(),
            published: now,
            published_unix_ms: wall
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            manifests: 0,
            last_manifest: None,
            bundles: 0,
            last_bundle: None,
        });
        while self.records.len() > KEEP {
            self.records.pop_front();
        }
    }

    /// A manifest answer of `sequence`. Sequences published before this controller started, or
    /// trimmed from the log, are not counted.
    fn manifest(&mut self, sequence: u64, now: Instant) {
        if let Some(r) = self
            .records
            .iter_mut()
            .rev()
            .find(|r| r.sequence == sequence)
        {
            r.manifests += 1;
            r.last_manifest = Some(now);
        }
    }

    /// A complete bundle answer of `sha256`: it counts for the newest publication of that
    /// bundle (a restarted master republishes the same bundle under a new sequence).
    fn bundle(&mut self, sha256: &str, now: Instant) {
        if let Some(r) = self.records.iter_mut().rev().find(|r| r.sha256 == sha256) {
            r.bundles += 1;
            r.last_bundle = Some(now);
        }
    }

    /// Newest first.
    fn view(&self) -> Vec<FanoutView> {
        let after = |r: &Record, t: Option<Instant>| {
            t.map(|t| t.saturating_duration_since(r.published).as_secs_f64() * 1000.0)
        };
        self.records
            .iter()
            .rev()
            .map(|r| FanoutView {
                sequence: r.sequence,
                sha256: r.sha256.clone(),
                published_unix_ms: r.published_unix_ms,
                manifests: r.manifests,
                bundles: r.bundles,
                last_manifest_ms: after(r, r.last_manifest),
                last_bundle_ms: after(r, r.last_bundle),
            })
            .collect()
    }
}

/// The shared log: cheap to clone, one short lock per event.
#[derive(Debug, Clone, Default)]
pub struct Fanout {
    log: Arc<Mutex<Log>>,
}

impl Fanout {
    /// A new publication, now.
    pub fn published(&self, sequence: u64, sha256: &str) {
        let mut log = self.log.lock().unwrap();
        log.published(sequence, sha256, Instant::now(), SystemTime::now());
    }

    /// A manifest answer of `sequence`, now.
    pub fn manifest(&self, sequence: u64) {
        self.log.lock().unwrap().manifest(sequence, Instant::now());
    }

    /// The body of a bundle answer: `bytes` in frames, counted for `sha256` when the last
    /// frame has been taken. An answer whose connection goes away earlier is not counted.
    pub fn bundle_body(&self, sha256: &str, bytes: Bytes) -> Body {
        Body::new(CountedBody {
            rest: bytes,
            on_end: Some((self.clone(), sha256.to_string())),
        })
    }

    pub fn view(&self) -> Vec<FanoutView> {
        self.log.lock().unwrap().view()
    }
}

/// `GET /api/fanout`: the log, newest first.
pub async fn api(State(st): State<Shared>) -> Response {
    Json(st.publisher.fanout.view()).into_response()
}

struct CountedBody {
    rest: Bytes,
    on_end: Option<(Fanout, String)>,
}

impl hyper::body::Body for CountedBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.rest.is_empty() {
            return Poll::Ready(None);
        }
        let n = self.rest.len().min(FRAME);
        let frame = self.rest.split_to(n);
        if self.rest.is_empty() {
            if let Some((fanout, sha)) = self.on_end.take() {
                fanout.log.lock().unwrap().bundle(&sha, Instant::now());
            }
        }
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::time::Duration;

    fn ms(d: u64) -> Duration {
        Duration::from_millis(d)
    }

    #[test]
    fn answers_count_for_their_publication_and_time_from_it() {
        let t0 = Instant::now();
        let mut log = Log::default();
        log.published(7, "aa", t0, UNIX_EPOCH + Duration::from_secs(5));
        log.manifest(7, t0 + ms(10));
        log.manifest(7, t0 + ms(30));
        log.bundle("aa", t0 + ms(50));
        let v = log.view();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].published_unix_ms, 5000);
        assert_eq!((v[0].manifests, v[0].bundles), (2, 1));
        assert_eq!(v[0].last_manifest_ms, Some(30.0));
        assert_eq!(v[0].last_bundle_ms, Some(50.0));
    }

    #[test]
    fn unknown_sequences_and_bundles_are_not_counted() {
        let t0 = Instant::now();
        let mut log = Log::default();
        log.published(2, "bb", t0, SystemTime::now());
        log.manifest(1, t0 + ms(1));
        log.bundle("cc", t0 + ms(1));
        let v = log.view();
        assert_eq!((v[0].manifests, v[0].bundles), (0, 0));
        assert_eq!((v[0].last_manifest_ms, v[0].last_bundle_ms), (None, None));
    }

    #[test]
    fn a_republished_bundle_counts_for_its_newest_publication() {
        let t0 = Instant::now();
        let mut log = Log::default();
        log.published(1, "aa", t0, SystemTime::now());
        log.published(2, "aa", t0 + ms(100), SystemTime::now());
        log.bundle("aa", t0 + ms(150));
        log.manifest(1, t0 + ms(160));
        let v = log.view();
        assert_eq!(v[0].sequence, 2, "newest first");
        assert_eq!((v[0].bundles, v[0].last_bundle_ms), (1, Some(50.0)));
        assert_eq!((v[1].manifests, v[1].bundles), (1, 0));
        assert_eq!(v[1].last_manifest_ms, Some(160.0));
    }

    #[test]
    fn the_log_keeps_the_newest_publications() {
        let t0 = Instant::now();
        let mut log = Log::default();
        for s in 1..=(KEEP as u64 + 5) {
            log.published(s, &format!("{s:x}"), t0, SystemTime::now());
        }
        let v = log.view();
        assert_eq!(v.len(), KEEP);
        assert_eq!(v[0].sequence, KEEP as u64 + 5);
        assert_eq!(v[KEEP - 1].sequence, 6);
    }

    #[tokio::test]
    async fn a_bundle_body_streams_every_byte_and_counts_once_at_its_end() {
        let f = Fanout::default();
        f.published(1, "aa");
        let data = Bytes::from((0..FRAME * 3 + 17).map(|i| i as u8).collect::<Vec<u8>>());
        let mut body = f.bundle_body("aa", data.clone());
        assert_eq!(
            hyper::body::Body::size_hint(&body).exact(),
            Some(data.len() as u64)
        );
        let mut got = Vec::new();
        let mut frames = 0;
        while let Some(frame) = body.frame().await {
            got.extend_from_slice(&frame.unwrap().into_data().unwrap());
            frames += 1;
            let counted = if frames == 4 { 1 } else { 0 };
            assert_eq!(f.view()[0].bundles, counted, "after frame {frames}");
        }
        assert_eq!(frames, 4);
        assert_eq!(got, data);
        assert_eq!(f.view()[0].bundles, 1);
    }

    #[tokio::test]
    async fn an_abandoned_bundle_body_is_not_counted() {
        let f = Fanout::default();
        f.published(1, "aa");
        let mut body = f.bundle_body("aa", Bytes::from(vec![0u8; FRAME * 2]));
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert_eq!(f.view()[0].bundles, 0);
        assert_eq!(f.view()[0].last_bundle_ms, None);
    }
}
