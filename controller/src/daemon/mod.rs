//! The controller daemon, `fleet serve`: load and check everything, bind, then run the API,
//! the spec watcher and the Locust master until told to stop (docs/architecture-daemon.md).
//!
//! Its rooms: `router` builds the one axum router and checks credentials (`auth`, `client_ip`,
//! `limiter`); `agent_routes` and `operator_routes` answer the requests; `listener` serves it
//! over TLS under a connection cap; `steward` turns spec edits into publications, which
//! `publish` signs and keeps and `fanout` counts as they go out; `nodes` is the node table;
//! `events` streams the dashboard's feed and `proxy` forwards to the Locust web UI; `headers`
//! sets the security headers on every answer; `spec` is the spec editor's API and the validation
//! gate; `ui` serves the dashboard's scripts, styles and vendored libraries.

mod agent_routes;
pub(crate) mod auth;
pub(crate) mod client_ip;
mod events;
mod fanout;
#[doc(hidden)]
pub mod fuzz;
pub(crate) mod headers;
mod limiter;
mod listener;
pub(crate) mod nodes;
mod nofile;
mod operator_routes;
mod proxy;
mod publish;
pub(crate) mod reload;
mod router;
pub(crate) mod spec;
mod steward;
mod tasks;
mod ui;

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
/// The task that reads the test's stats once a second for the event stream.
const STATS_VIEW: &str = "stats view";
/// With `master.shards = "auto"`: the task that starts masters as the expected workers grow.
const SHARD_GROWER: &str = "shard grower";
/// How often the shard grower looks at the expected workers.
const GROW_EVERY: Duration = Duration::from_secs(1);
/// How long `stop` waits for open connections to close gracefully.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// `fleet serve`: starts the controller and runs it until SIGINT or SIGTERM (then `Ok`), or
/// until one of its long-running tasks ends (then the error that names it); the Locust master
/// is stopped either way.
///
/// SIGHUP reloads the server certificate and the credentials (`reload`); a reload that fails
/// is logged and changes nothing.
pub async fn serve(fleet: &Fleet) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let controller = start(fleet).await?;
    let reload = controller.state.reload.clone();
    controller
        .run_until(async move {
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = term.recv() => break,
                    _ = hup.recv() => log_reload("SIGHUP", reload()),
                }
            }
            log!("stopping");
        })
        .await
}

/// The log line of a reload, whoever asked for it.
pub(crate) fn log_reload(why: &str, r: Result<reload::Reloaded>) {
    match r {
        Ok(r) => log!("{why}: {r}"),
        Err(e) => log!("{why}: {e:#}"),
    }
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
    let loaded = reload::load(fleet)?;
    let key = load_signing_key(fleet)?;
    let certs = Arc::new(reload::CertResolver::new(loaded.cert));
    let tls = tls_config(certs.clone())?;
    let auth = Arc::new(Auth::with_settings(loaded.creds, auth_settings(fleet)));
    let reloader = reload::Reloader {
        fleet: fleet.clone(),
        certs,
        auth: auth.clone(),
    };
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
    publisher.set_rules(fleet_common::wire::PackRules {
        locustfile: cfg.controller.locustfile.clone(),
        max_bundle_bytes: cfg.controller.max_bundle_bytes,
    });

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

    let shards = crate::master::shards_to_start(&cfg.master, &state_dir);
    let master = Master::start_shards(
        cfg.master.clone(),
        &cfg.controller.locustfile,
        &state_dir,
        shards,
    );
    let backend = cfg.scale.backend.map_or("local", |b| b.name());
    master.set_per_node(crate::master::capacity::workers_per_node(
        &cfg.local, &cfg.ec2, backend,
    ));
    if master.shard_count() > 1 {
        log!(
            "running {} Locust masters (master.shards = {}, {} workers each)",
            master.shard_count(),
            cfg.master.shards,
            cfg.master.capacity
        );
    }
    let limits = fleet_common::bundle::Limits {
        max_packed: cfg.controller.max_bundle_bytes,
        ..Default::default()
    };
    let (spec, requests) =
        spec::Handle::new(spec_dir.clone(), cfg.controller.locustfile.clone(), limits);
    let stats = crate::master::view::StatsView::default();
    let state = Arc::new(AppState {
        publisher: publisher.clone(),
        nodes: Arc::new(Nodes::new(cfg.controller.node_limits())),
        master: master.clone(),
        auth,
        reload: Arc::new(move || reloader.reload()),
        name: cfg.name.clone(),
        spec,
        stats: stats.clone(),
    });
    let (watcher, edits) = watch_spec(&spec_dir)?;
    let steward = Steward {
        fleet: fleet.clone(),
        publisher,
        master,
        spec_dir,
        master_specs: state_dir.join("master-specs"),
        gate: gate(fleet),
        edits: state_dir.join("edits"),
    };

    let mut tasks = Tasks::default();
    let debounce = Duration::from_millis(cfg.controller.debounce_ms);
    tasks.spawn(STEWARD, steward.run(edits, requests, debounce));
    tasks.spawn(STATS_VIEW, stats.run(state.master.clone()));
    if cfg.master.managed && cfg.master.shards == crate::master::capacity::Shards::Auto {
        tasks.spawn(SHARD_GROWER, grow_shards(state.clone()));
    }
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

/// `master.shards = "auto"` while serving: once a second, the masters the expected workers
/// need (the nodes `fleet scale` and `fleet status` last listed) are started
/// ([`Master::grow`] decides and carries it out).
async fn grow_shards(st: Shared) {
    loop {
        tokio::time::sleep(GROW_EVERY).await;
        st.master.grow(st.nodes.listed_count()).await;
    }
}

/// The validation gate as `[spec]` sets it: the `locust` to check with (`spec.locust`, else the
/// managed master's), resolved on the controller's `PATH` now because the gate runs it with a
/// cleared one; off with `spec.validate = false` or with an external master and no
/// `spec.locust`. It is confined as the master is (`master.confine`, `master.user`), in a
/// workspace of its own outside the fleet directory.
fn gate(fleet: &Fleet) -> spec::Gate {
    let cfg = &fleet.config;
    let (locust, off_reason) = match (&cfg.spec.locust, cfg.master.managed) {
        _ if !cfg.spec.validate => (None, "spec.validate = false".to_string()),
        (Some(l), _) => (Some(l.clone()), String::new()),
        (None, true) => (Some(cfg.master.locust.clone()), String::new()),
        (None, false) => (
            None,
            "the master is external and spec.locust is not set".to_string(),
        ),
    };
    spec::Gate {
        locust: locust.map(|l| on_path(&l)),
        off_reason,
        timeout: Duration::from_secs_f64(cfg.spec.validate_timeout_s.max(0.1)),
        workspace: crate::master::confine::Workspace::named("gate", &fleet.dir),
        confine: cfg.master.confine,
        user: cfg.master.user.clone(),
        fleet_dir: fleet.dir.clone(),
    }
}

/// `name` as an absolute path if it is a bare name found on `PATH`; otherwise as given.
fn on_path(name: &str) -> String {
    if name.contains('/') {
        return name.to_string();
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| name.to_string())
}

/// The key manifests are signed with.
fn load_signing_key(fleet: &Fleet) -> Result<SigningKey> {
    let path = fleet.signing_key();
    let der = std::fs::read(&path)
        .with_context(|| format!("cannot read {}; run `fleet init`", path.display()))?;
    SigningKey::from_pkcs8(&der).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The failure budget and the trusted proxies from the config (the credentials themselves
/// come from `reload::load`).
fn auth_settings(fleet: &Fleet) -> auth::Settings {
    let c = &fleet.config.controller;
    auth::Settings {
        fail_burst: c.auth_fail_burst,
        fail_refill_per_s: c.auth_fail_refill_per_s,
        trusted_proxies: c.trusted_proxies.clone(),
    }
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
