//! `fleet serve`: load and check everything, bind, then run the API, the spec watcher and the
//! Locust master until told to stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use fleet_common::bundle::{self, pack_dir, Limits};
use fleet_common::manifest::{MasterAddr, SigningKey};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::auth::Auth;
use crate::config::Fleet;
use crate::master::Master;
use crate::nodes::Nodes;
use crate::publish::{Publisher, Target};
use crate::secrets::PasswordHash;
use crate::server::{app, serve_tls, tls_config, AppState, Shared};

macro_rules! log {
    ($($arg:tt)*) => { crate::log(format_args!($($arg)*)) };
}

/// A running controller.
pub struct Controller {
    pub addr: SocketAddr,
    pub state: Shared,
    shutdown: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    _watcher: notify::RecommendedWatcher,
}

impl Controller {
    /// Stops serving and stops the managed Locust master.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
        self.state.master.stop().await;
    }
}

/// Everything is read and checked before the port is bound, so a bad setting fails at once
/// with one line and no half-started controller.
pub async fn start(fleet: &Fleet) -> Result<Controller> {
    let cfg = &fleet.config;
    let key_der = std::fs::read(fleet.signing_key()).with_context(|| {
        format!(
            "cannot read {}; run `fleet init`",
            fleet.signing_key().display()
        )
    })?;
    let key = SigningKey::from_pkcs8(&key_der)
        .map_err(|e| anyhow::anyhow!("{}: {e}", fleet.signing_key().display()))?;
    let tls = tls_config(
        &fleet.read(&fleet.server_pem())?,
        &fleet.read(&fleet.server_key())?,
    )?;
    let ui = PasswordHash::parse(&fleet.read(&fleet.ui_hash())?)?;
    let auth = Auth::with_settings(
        &fleet.read(&fleet.agent_token())?,
        &fleet.read(&fleet.operator_token())?,
        ui,
        crate::auth::Settings {
            fail_burst: cfg.controller.auth_fail_burst,
            fail_refill_per_s: cfg.controller.auth_fail_refill_per_s,
            trusted_proxies: cfg.controller.trusted_proxies.clone(),
        },
    );
    let spec_dir = fleet.spec_dir();
    anyhow::ensure!(
        spec_dir.is_dir(),
        "spec directory {} does not exist; create it with a {}",
        spec_dir.display(),
        cfg.controller.locustfile
    );
    let state_dir = fleet.state_dir();
    std::fs::create_dir_all(&state_dir)?;
    let publisher = Arc::new(Publisher::open(
        &cfg.name,
        &cfg.controller.locustfile,
        key,
        &state_dir.join("published"),
        cfg.controller.history,
    )?);

    // Before anything opens files: every agent holds one connection, and 1024 (a login
    // shell's usual soft limit) is too few for a thousand of them.
    let nofile = crate::listener::raise_nofile();
    let max_conns = crate::listener::connection_cap(nofile.now, cfg.controller.max_connections);
    log!("{nofile}; serving at most {max_conns} connections at once");

    let listener = TcpListener::bind(cfg.controller.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; is another `fleet serve` running?",
                cfg.controller.listen
            )
        })?;
    let addr = listener.local_addr()?;

    let master = Master::start(cfg.master.clone(), &cfg.controller.locustfile, &state_dir);
    let state = Arc::new(AppState {
        publisher: publisher.clone(),
        nodes: Arc::new(Nodes::new(cfg.controller.node_limits())),
        master: master.clone(),
        auth: Arc::new(auth),
        name: cfg.name.clone(),
    });

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            // Reads (our own packing among them) are not changes.
            if !matches!(ev.kind, EventKind::Access(_)) {
                let _ = events_tx.send(());
            }
        }
    })
    .context("cannot start the file watcher")?;
    watcher
        .watch(&spec_dir, RecursiveMode::Recursive)
        .with_context(|| format!("cannot watch {}", spec_dir.display()))?;

    let steward = Steward {
        fleet: fleet.clone(),
        publisher,
        master,
        spec_dir,
        master_specs: state_dir.join("master-specs"),
    };
    tokio::spawn(steward.run(events_rx, Duration::from_millis(cfg.controller.debounce_ms)));

    let (shutdown, shutdown_rx) = watch::channel(false);
    let server = tokio::spawn(serve_tls(
        listener,
        tls,
        app(state.clone()),
        max_conns,
        shutdown_rx,
    ));
    log!(
        "controller for fleet {:?} listening on https://{addr} (spec: {})",
        cfg.name,
        fleet.spec_dir().display()
    );
    Ok(Controller {
        addr,
        state,
        shutdown,
        server,
        _watcher: watcher,
    })
}

/// Turns spec changes and master restarts into publications.
struct Steward {
    fleet: Fleet,
    publisher: Arc<Publisher>,
    master: Master,
    spec_dir: PathBuf,
    master_specs: PathBuf,
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

    async fn run(self, mut events: mpsc::UnboundedReceiver<()>, debounce: Duration) {
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
