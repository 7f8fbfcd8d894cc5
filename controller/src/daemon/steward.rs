//! The spec Steward: turns edits of the spec directory and restarts of the Locust master into
//! publications (docs/architecture-daemon.md, "A spec edit, from the watcher to the agents").

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fleet_common::bundle::{self, pack_dir, Limits};
use fleet_common::manifest::MasterAddr;
use tokio::sync::mpsc;

use crate::config::Fleet;
use crate::daemon::publish::{Publisher, Target};
use crate::master::Master;

/// Turns spec changes and master restarts into publications.
pub(super) struct Steward {
    pub(super) fleet: Fleet,
    pub(super) publisher: Arc<Publisher>,
    pub(super) master: Master,
    pub(super) spec_dir: PathBuf,
    pub(super) master_specs: PathBuf,
}

impl Steward {
    fn target(&self, epoch: u64) -> Target {
        let m = &self.fleet.config.master;
        Target {
            master: MasterAddr {
                host: m.host.clone(),
                port: m.port,
            },
            master_epoch: epoch,
            worker_args: self.fleet.config.agents.worker_args.clone(),
        }
    }

    pub(super) async fn run(self, mut events: mpsc::UnboundedReceiver<()>, debounce: Duration) {
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
                changed = epoch_rx.changed(), if epochs_open => {
                    if changed.is_err() {
                        // No supervisor (an external master): nothing will ever restart it.
                        epochs_open = false;
                        continue;
                    }
                    let epoch = *epoch_rx.borrow_and_update();
                    let stale = self.publisher.current().is_some_and(|p| p.manifest.master_epoch != epoch);
                    if stale {
                        match self.publisher.retarget(&self.target(epoch)) {
                            Ok(Some(p)) => log!("published sequence {} for master epoch {epoch}", p.manifest.sequence),
                            Ok(None) => {}
                            Err(e) => log!("cannot publish: {e:#}"),
                        }
                    }
                }
            }
        }
    }

    /// Packs the spec and publishes it if anything changed.
    async fn sync(&self) {
        let cfg = &self.fleet.config.controller;
        let limits = Limits {
            max_packed: cfg.max_bundle_bytes,
            ..Limits::default()
        };
        let packed = match pack_dir(&self.spec_dir, &cfg.locustfile, &limits) {
            Ok(p) => p,
            Err(e) => {
                let line = format!("spec not published: {e}");
                log!("{line}; the agents keep the current version");
                self.publisher.set_error(Some(line));
                return;
            }
        };
        self.publisher.set_error(None);
        // The master runs its own verified copy, never the directory being edited.
        let dir = self.master_specs.join(&packed.sha256);
        if !dir.exists() {
            if let Err(e) = bundle::unpack(&packed.bytes, &dir, &limits) {
                log!("cannot unpack the spec for the master: {e}");
                return;
            }
        }
        let epoch = match self.master.ensure(dir).await {
            Ok(e) => e,
            Err(e) => {
                let line = format!("Locust master: {e:#}");
                log!("{line}");
                self.publisher.set_error(Some(line));
                return;
            }
        };
        let before = self.publisher.current().map(|p| p.manifest.sequence);
        match self.publisher.publish(&packed, &self.target(epoch)) {
            Ok(p) if Some(p.manifest.sequence) != before => log!(
                "published sequence {} (bundle {}, {} bytes, master epoch {epoch})",
                p.manifest.sequence,
                &packed.sha256[..12],
                packed.bytes.len()
            ),
            Ok(_) => {}
            Err(e) => log!("cannot publish: {e:#}"),
        }
    }
}
