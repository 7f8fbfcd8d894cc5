//! Editing the spec through the API, and the validation gate every new spec passes before it
//! is published (docs/protocol.md, "Editing the spec"; docs/configuration.md, `[spec]`).
//!
//! The spec directory stays the one source of truth. A change through the API (a whole spec, one
//! file, a rollback) is handed to the Steward, which also publishes the directory's own edits:
//! one actor, so changes never interleave. It checks the change's base version
//! ([`change::check_base`]), builds the new tree in a scratch directory, packs it with the
//! watcher's rules and caps, runs the [`gate`], and only then writes the spec directory
//! ([`change::mirror`]) and publishes. A refused change leaves the directory as it was.
//!
//! `tree` reads versions (files, one file, diffs) from their bundles; `routes` answers HTTP.

pub(crate) mod change;
pub(super) mod gate;
pub(super) mod routes;
pub(super) mod tree;

use std::path::PathBuf;

use fleet_common::bundle::Limits;
use fleet_common::wire::{GateRefusal, SpecVersion};
use tokio::sync::{mpsc, oneshot};

pub(super) use change::Edit;
pub(super) use gate::Gate;

/// One change for the Steward, and where its answer goes.
pub(super) struct Request {
    /// The sequence the change was based on; `None` applies it whatever came between.
    pub base: Option<u64>,
    pub edit: Edit,
    /// `false` skips the validation gate for this change only.
    pub validate: bool,
    pub reply: oneshot::Sender<Answer>,
}

/// How a change ended.
#[derive(Debug, Clone)]
pub(super) enum Answer {
    /// Published (or, `changed: false`, already the current version).
    Published { version: SpecVersion, changed: bool },
    /// Someone published in between (409).
    Conflict(String),
    /// The spec breaks a packing rule or cap, or the request is malformed (400).
    Invalid(String),
    /// No such version or file (404).
    NotFound(String),
    /// The validation gate refused it (422).
    Refused(GateRefusal),
    /// The controller could not carry it out (500).
    Failed(String),
}

/// What the routes need to reach the spec: the Steward's queue, and the directory (for the
/// `dir` version) with its packing rules.
#[derive(Clone)]
pub(crate) struct Handle {
    pub(super) tx: mpsc::Sender<Request>,
    pub(super) spec_dir: PathBuf,
    pub(super) locustfile: String,
    pub(super) limits: Limits,
}

impl Handle {
    pub(super) fn new(
        spec_dir: PathBuf,
        locustfile: String,
        limits: Limits,
    ) -> (Handle, mpsc::Receiver<Request>) {
        // Changes are quick to queue and one at a time to carry out: a short queue is enough,
        // and a full one answers 503 rather than piling up.
        let (tx, rx) = mpsc::channel(16);
        (
            Handle {
                tx,
                spec_dir,
                locustfile,
                limits,
            },
            rx,
        )
    }
}
