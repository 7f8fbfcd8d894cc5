//! The controller daemon, `fleet serve`: load and check everything, bind, then run the API,
//! the spec watcher and the Locust master until told to stop (docs/architecture-daemon.md).
//!
//! Its rooms: `router` builds the one axum router and checks credentials (`auth`, `client_ip`,
//! `limiter`); `agent_routes` and `operator_routes` answer the requests; `listener` serves it
//! over TLS under a connection cap; `steward` turns spec edits into publications, which
//! `publish` signs and keeps and `fanout` counts as they go out; `nodes` is the node table;
//! `events` streams the dashboard's feed and `proxy` forwards to the Locust web UI.

mod agent_routes;
pub(crate) mod auth;
pub(crate) mod client_ip;
mod events;
mod fanout;
#[doc(hidden)]
pub mod fuzz;
mod limiter;
mod listener;
pub(crate) mod nodes;
mod nofile;
mod operator_routes;
mod proxy;
mod publish;
mod router;
mod steward;
mod tasks;

pub use auth::UI_USER;
pub(crate) use auth::{FAIL_BURST, FAIL_REFILL_PER_S};
pub(crate) use client_ip::Cidr;
pub(crate) use nodes::{
    Limits as NodeLimits, Listing, DEFAULT_FORGET_SILENT_AFTER, DEFAULT_MAX_NODES, SILENT_AFTER_S,
};
pub use tasks::TaskEnded;

use std::net::SocketAddr;
use std::path::Path;
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
use tasks::Tasks;

/// The TLS server loop's task name: the one task that ends by itself on `stop`.
const SERVER: &str = "TLS server loop";
/// The spec Steward's task name.
const STEWARD: &str = "spec steward";
/// How long `stop` waits for open connections to close gracefully.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// `fleet serve`: starts the controller and runs it until SIGINT or SIGTERM (then `Ok`), or
/// until one of its long-running tasks ends (then the error that names it); the Locust master
/// is stopped either way.
pub async fn serve(fleet: &Fleet) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let controller = start(fleet).await?;
    controller
        .run_until(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            log!("stopping");
        })
        .await
}

/// A running controller. It owns its long-running tasks: the TLS server loop and the spec
/// Steward here, the Locust master's supervisor and swarm keeper inside [`Master`].
pub struct Controller {
    pub addr: SocketAddr,
    pub(crate) state: Shared,
    shutdown: watch::Sender<bool>,
    tasks: Tasks,
    _watcher: notify::RecommendedWatcher,
}

impl Controller {
    /// Runs until `stop` resolves (`Ok`) or one of the controller's tasks ends before it (an
    /// error naming the task: nothing restarts it, so the controller cannot go on). Stops the
    /// controller and the Locust master either way.
    pub async fn run_until(mut self, stop: impl std::future::Future<Output = ()>) -> Result<()> {
        let outcome = tokio::select! {
            _ = stop => Ok(()),
            ended = self.tasks.ended() => Err(anyhow::Error::new(ended)),
            // The Locust master's supervisor and swarm keeper: an error when one ends before
            // `Master::stop` (a master without tasks answers `Ok`, which this arm ignores).
            Err(e) = self.state.master.join() => Err(anyhow::Error::new(e)),
        };
        self.stop().await;
        outcome
    }

    /// Stops serving (open connections get [`STOP_GRACE`] to close), stops the spec Steward,
    /// and stops the managed Locust master.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        self.tasks.stop(STOP_GRACE, SERVER).await;
        self.state.master.stop().await;
    }
}

/// Everything is read and checked before the port is bound, so a bad setting fails at once
/// with one line and no half-started controller.
pub async fn start(fleet: &Fleet) -> Result<Controller> {
    let cfg = &fleet.config;
    let key = load_signing_key(fleet)?;
    let tls = tls_config(
        &fleet.read(&fleet.server_pem())?,
        &fleet.read(&fleet.server_key())?,
    )?;
    let auth = load_auth(fleet)?;
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
    let (watcher, edits) = watch_spec(&spec_dir)?;
    let steward = Steward {
        fleet: fleet.clone(),
        publisher,
        master,
        spec_dir,
        master_specs: state_dir.join("master-specs"),
    };

    let mut tasks = Tasks::default();
    let debounce = Duration::from_millis(cfg.controller.debounce_ms);
    tasks.spawn(STEWARD, steward.run(edits, debounce));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let router = app(state.clone());
    tasks.spawn(
        SERVER,
        serve_tls(listener, tls, router, max_conns, shutdown_rx),
    );
    log!(
        "controller for fleet {:?} listening on https://{addr} (spec: {})",
        cfg.name,
        fleet.spec_dir().display()
    );
    Ok(Controller {
        addr,
        state,
        shutdown,
        tasks,
        _watcher: watcher,
    })
}

/// The key manifests are signed with.
fn load_signing_key(fleet: &Fleet) -> Result<SigningKey> {
    let path = fleet.signing_key();
    let der = std::fs::read(&path)
        .with_context(|| format!("cannot read {}; run `fleet init`", path.display()))?;
    SigningKey::from_pkcs8(&der).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The agents' token, the operator's token and the UI password's hash, with the failure
/// budget and the trusted proxies from the config.
fn load_auth(fleet: &Fleet) -> Result<Auth> {
    let c = &fleet.config.controller;
    let ui = PasswordHash::parse(&fleet.read(&fleet.ui_hash())?)?;
    Ok(Auth::with_settings(
        &fleet.read(&fleet.agent_token())?,
        &fleet.read(&fleet.operator_token())?,
        ui,
        auth::Settings {
            fail_burst: c.auth_fail_burst,
            fail_refill_per_s: c.auth_fail_refill_per_s,
            trusted_proxies: c.trusted_proxies.clone(),
        },
    ))
}

/// Watches the spec directory: one message per change (reads are not changes), for the
/// Steward. The watcher stops when it is dropped.
fn watch_spec(dir: &Path) -> Result<(notify::RecommendedWatcher, mpsc::UnboundedReceiver<()>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            // Reads (our own packing among them) are not changes.
            if !matches!(ev.kind, EventKind::Access(_)) {
                let _ = tx.send(());
            }
        }
    })
    .context("cannot start the file watcher")?;
    watcher
        .watch(dir, RecursiveMode::Recursive)
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    Ok((watcher, rx))
}
