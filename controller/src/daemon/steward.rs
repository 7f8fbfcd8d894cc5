//! The spec Steward: turns edits of the spec directory, changes through the API and restarts of
//! the Locust master into publications (docs/architecture-daemon.md, "A spec edit, from the
//! watcher to the agents"). It is the one writer of publications of new content, so an edit on
//! disk and one through the API never interleave; every new content passes the validation
//! gate first (`spec::gate`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_common::bundle::{self, pack_dir, Limits, Packed};
use fleet_common::manifest::MasterAddr;
use fleet_common::wire::GateRefusal;
use tokio::sync::mpsc;

use crate::config::Fleet;
use crate::daemon::publish::{rfc3339_now, Publication, Publisher, Target};
use crate::daemon::spec::change::{check_base, mirror, spec_path};
use crate::daemon::spec::gate::Verdict;
use crate::daemon::spec::{Answer, Edit, Gate, Request};
use crate::master::Master;

/// The origin of a publication of the spec directory's own edits.
const DIRECTORY: &str = "directory";

/// The epochs for a log line: `3` for one master, `3/1/2` for shards.
fn epochs_line(epochs: &[u64]) -> String {
    let all: Vec<String> = epochs.iter().map(u64::to_string).collect();
    all.join("/")
}

/// Turns spec changes and master restarts into publications.
pub(super) struct Steward {
    pub(super) fleet: Fleet,
    pub(super) publisher: Arc<Publisher>,
    pub(super) master: Master,
    pub(super) spec_dir: PathBuf,
    pub(super) master_specs: PathBuf,
    pub(super) gate: Gate,
    /// Where API changes are assembled before they reach the spec directory.
    pub(super) edits: PathBuf,
}

impl Steward {
    /// What agents run against: shard 0 as `master` (what agents that know no shards join),
    /// and with shards every master with its epoch.
    fn target(&self, epochs: &[u64]) -> Target {
        let m = &self.fleet.config.master;
        Target {
            master: MasterAddr {
                host: m.host.clone(),
                port: m.port,
            },
            master_epoch: epochs.first().copied().unwrap_or(0),
            worker_args: self.fleet.config.agents.worker_args.clone(),
            masters: self.master.masters(epochs),
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            max_packed: self.fleet.config.controller.max_bundle_bytes,
            ..Limits::default()
        }
    }

    fn locustfile(&self) -> &str {
        &self.fleet.config.controller.locustfile
    }

    pub(super) async fn run(
        self,
        mut events: mpsc::UnboundedReceiver<()>,
        mut requests: mpsc::Receiver<Request>,
        debounce: Duration,
    ) {
        let gate = self.gate.describe();
        log!("spec validation gate: {gate}");
        self.publisher.set_gate(gate);
        self.sync().await;
        let mut epoch_rx = self.master.epoch();
        epoch_rx.borrow_and_update();
        let mut epochs_open = true;
        loop {
            tokio::select! {
                ev = events.recv() => {
                    if ev.is_none() {
                        return;
                    }
                    // Settle: publish once the directory has been quiet for `debounce`.
                    while let Ok(Some(())) = tokio::time::timeout(debounce, events.recv()).await {}
                    self.sync().await;
                }
                Some(req) = requests.recv() => {
                    let answer = self.change(req.base, req.edit, req.validate).await;
                    let _ = req.reply.send(answer);
                }
                changed = epoch_rx.changed(), if epochs_open => {
                    if changed.is_err() {
                        // No supervisor (an external master): nothing will ever restart it.
                        epochs_open = false;
                        continue;
                    }
                    let epochs = epoch_rx.borrow_and_update().clone();
                    let target = self.target(&epochs);
                    let stale = self.publisher.current().is_some_and(|p| {
                        p.manifest.master_epoch != target.master_epoch || p.manifest.masters != target.masters
                    });
                    if stale {
                        match self.publisher.retarget(&target) {
                            Ok(Some(p)) => log!("published sequence {} for master epoch {}", p.manifest.sequence, epochs_line(&epochs)),
                            Ok(None) => {}
                            Err(e) => log!("cannot publish: {e:#}"),
                        }
                    }
                }
            }
        }
    }

    /// Packs the spec directory and publishes it if anything changed and the gate lets it.
    async fn sync(&self) {
        let packed = match pack_dir(&self.spec_dir, self.locustfile(), &self.limits()) {
            Ok(p) => p,
            Err(e) => {
                let line = format!("spec not published: {e}");
                log!("{line}; the agents keep the current version");
                self.publisher.set_error(Some(line));
                return;
            }
        };
        let current = self
            .publisher
            .current()
            .is_some_and(|p| p.manifest.bundle.sha256 == packed.sha256);
        if current {
            // Back to what runs (an API change written here, or a refused edit undone).
            self.publisher.set_refused(None);
        } else if self.gate(&packed, DIRECTORY, true).await.is_err() {
            return;
        }
        self.publisher.set_error(None);
        let _ = self.publish(&packed, DIRECTORY).await;
    }

    /// Checks `packed` with the gate (unless `validate` is false or the gate is off); a refusal
    /// is logged with Locust's last lines and shown in `/api/spec`.
    async fn gate(&self, packed: &Packed, origin: &str, validate: bool) -> Result<(), GateRefusal> {
        if !validate || !self.gate.enabled() {
            return Ok(());
        }
        let t = Instant::now();
        match self
            .gate
            .check(packed, self.locustfile(), &self.limits())
            .await
        {
            Verdict::Passed { users } => {
                log!(
                    "validation gate: bundle {} loads with user classes {} ({} ms)",
                    &packed.sha256[..12],
                    users.join(", "),
                    t.elapsed().as_millis()
                );
                Ok(())
            }
            Verdict::Refused { reason, output } => {
                log!(
                    "spec not published ({origin}, bundle {}): the validation gate refused it: \
                     {reason}; the agents keep the current version",
                    &packed.sha256[..12]
                );
                for line in &output {
                    log!("  locust: {line}");
                }
                let r = GateRefusal {
                    sha256: packed.sha256.clone(),
                    origin: origin.to_string(),
                    reason: reason.clone(),
                    output,
                    at: rfc3339_now(),
                };
                self.publisher
                    .set_error(Some(format!("spec not published: {reason}")));
                self.publisher.set_refused(Some(r.clone()));
                Err(r)
            }
        }
    }

    /// Publishes a checked spec: the master gets its own unpacked copy first.
    async fn publish(&self, packed: &Packed, origin: &str) -> Result<Arc<Publication>, String> {
        // The master runs its own verified copy, never the directory being edited.
        let dir = self.master_specs.join(&packed.sha256);
        if !dir.exists() {
            if let Err(e) = bundle::unpack(&packed.bytes, &dir, &self.limits()) {
                let line = format!("cannot unpack the spec for the master: {e}");
                log!("{line}");
                return Err(line);
            }
        }
        let epochs = match self.master.ensure(dir).await {
            Ok(e) => e,
            Err(e) => {
                let line = format!("Locust master: {e:#}");
                log!("{line}");
                self.publisher.set_error(Some(line.clone()));
                return Err(line);
            }
        };
        let before = self.publisher.current().map(|p| p.manifest.sequence);
        let epoch = epochs_line(&epochs);
        match self
            .publisher
            .publish(packed, &self.target(&epochs), origin)
        {
            Ok(p) => {
                if Some(p.manifest.sequence) != before {
                    log!(
                        "published sequence {} ({origin}; bundle {}, {} bytes, master epoch {epoch})",
                        p.manifest.sequence,
                        &packed.sha256[..12],
                        packed.bytes.len()
                    );
                }
                Ok(p)
            }
            Err(e) => {
                log!("cannot publish: {e:#}");
                Err(format!("cannot publish: {e:#}"))
            }
        }
    }

    /// Carries out one change through the API: base check, the new tree assembled aside,
    /// packed with the watcher's rules, gated, then written to the spec directory and published.
    async fn change(&self, base: Option<u64>, edit: Edit, validate: bool) -> Answer {
        if let Some(base) = base {
            if let Err(c) = check_base(base, &self.publisher.view().history) {
                return Answer::Conflict(c.message);
            }
        }
        let origin = edit.origin();
        let next = self.edits.join("next");
        let answer = self.assemble(&edit, &next).and_then(|()| {
            pack_dir(&next, self.locustfile(), &self.limits())
                .map_err(|e| Answer::Invalid(format!("spec refused: {e}")))
        });
        let packed = match answer {
            Ok(p) => p,
            Err(a) => {
                let _ = std::fs::remove_dir_all(&next);
                return a;
            }
        };
        if let Err(r) = self.gate(&packed, &origin, validate).await {
            let _ = std::fs::remove_dir_all(&next);
            return Answer::Refused(r);
        }
        let written = mirror(&next, &self.spec_dir);
        let _ = std::fs::remove_dir_all(&next);
        if let Err(e) = written {
            return Answer::Failed(format!(
                "cannot write the spec directory {}: {e}",
                self.spec_dir.display()
            ));
        }
        self.publisher.set_error(None);
        let before = self.publisher.current().map(|p| p.manifest.sequence);
        match self.publish(&packed, &origin).await {
            Ok(p) => Answer::Published {
                changed: Some(p.manifest.sequence) != before,
                version: p.version(),
            },
            Err(e) => Answer::Failed(e),
        }
    }

    /// Writes the tree `edit` asks for into `next` (which must not exist afterwards on error).
    fn assemble(&self, edit: &Edit, next: &std::path::Path) -> Result<(), Answer> {
        let _ = std::fs::remove_dir_all(next);
        let limits = self.limits();
        let unpack = |bytes: &[u8], what: &str| {
            bundle::unpack(bytes, next, &limits)
                .map(|_| ())
                .map_err(|e| Answer::Invalid(format!("{what} refused: {e}")))
        };
        match edit {
            Edit::Replace(bytes) => unpack(bytes, "the uploaded spec"),
            Edit::Rollback(seq) => match self.publisher.find(*seq) {
                Some(p) => unpack(&p.bundle, "the old version"),
                None => Err(Answer::NotFound(format!(
                    "version {seq} is not in the history the controller keeps; see `fleet spec log`"
                ))),
            },
            Edit::Put { path, .. } | Edit::Delete { path } => {
                let rel = spec_path(path).map_err(Answer::Invalid)?;
                // The directory as it is, by the packer's rules (a link in it is refused here);
                // without its locustfile yet (the edit may create it), copied file by file.
                match pack_dir(&self.spec_dir, self.locustfile(), &limits) {
                    Ok(now) => unpack(&now.bytes, "the spec directory")?,
                    Err(bundle::BundleError::MissingEntryPoint(_)) => std::fs::create_dir_all(next)
                        .and_then(|()| mirror(&self.spec_dir, next).map(|_| ()))
                        .map_err(|e| Answer::Failed(format!("cannot copy the spec: {e}")))?,
                    Err(e) => {
                        return Err(Answer::Invalid(format!(
                            "the spec directory does not pack: {e}"
                        )))
                    }
                }
                let target = next.join(&rel);
                let io = |e: std::io::Error| Answer::Failed(format!("cannot assemble {rel}: {e}"));
                match edit {
                    Edit::Put { data, .. } => {
                        if target.is_dir() {
                            return Err(Answer::Invalid(format!("{rel} is a directory")));
                        }
                        if let Some(p) = target.parent() {
                            std::fs::create_dir_all(p).map_err(io)?;
                        }
                        std::fs::write(&target, data).map_err(io)
                    }
                    _ if target.is_file() => std::fs::remove_file(&target).map_err(io),
                    _ => Err(Answer::NotFound(format!("no file {rel} in the spec"))),
                }
            }
        }
    }
}
