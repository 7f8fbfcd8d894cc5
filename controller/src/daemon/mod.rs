//! The controller daemon, `fleet serve`: load and check everything, bind, then run the API,
//! the spec watcher and the Locust master until told to stop (docs/architecture-daemon.md).
//!
//! Its rooms: `router` builds the one axum router and checks credentials (`auth`, `client_ip`,
//! `limiter`); `agent_routes` and `operator_routes` answer the requests; `listener` serves it
//! over TLS under a connection cap; `steward` turns spec edits into publications, which
//! `publish` signs and keeps and `fanout` counts as they go out; `nodes` is the node table;
//! `events` streams the dashboard's feed and `proxy` forwards to the Locust web UI.

/// One timestamped line on the controller's log (stderr).
macro_rules! log {
    ($($arg:tt)*) => { crate::log(format_args!($($arg)*)) };
}

mod agent_routes;
pub(crate) mod auth;
pub(crate) mod client_ip;
mod events;
mod fanout;
mod limiter;
mod listener;
pub(crate) mod nodes;
mod nofile;
mod operator_routes;
mod proxy;
mod publish;
mod router;
mod steward;

pub use auth::UI_USER;
pub(crate) use auth::{FAIL_BURST, FAIL_REFILL_PER_S};
pub(crate) use client_ip::Cidr;
pub(crate) use nodes::{
    Limits as NodeLimits, Listing, DEFAULT_FORGET_SILENT_AFTER, DEFAULT_MAX_NODES, SILENT_AFTER_S,
};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use fleet_common::manifest::SigningKey;
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::config::Fleet;
use crate::master::Master;
use crate::secrets::PasswordHash;
use auth::Auth;
use listener::{serve_tls, tls_config};
use nodes::Nodes;
use publish::Publisher;
use router::{app, AppState, Shared};
use steward::Steward;

/// A running controller.
pub struct Controller {
    pub addr: SocketAddr,
    pub(crate) state: Shared,
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
        crate::daemon::auth::Settings {
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
    let nofile = nofile::raise_nofile();
    let max_conns = nofile::connection_cap(nofile.now, cfg.controller.max_connections);
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
