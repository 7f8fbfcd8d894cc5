//! `fleet demo`: the quick start's local swarm in one command. It runs the same pieces an
//! operator runs by hand (`fleet init`, `fleet serve`, `fleet scale --backend local`, a test
//! through `/api/swarm`) plus the sample target, in one process, until Ctrl-C.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use fleet_common::wire::SwarmRequest;

use super::api::Api;
use super::init::{init, set_password, InitOptions};
use super::render::Output;
use super::scale::{scale, terminate};
use crate::backend::local::Local;
use crate::backend::Backend;
use crate::config::Fleet;

/// The quick start: a local swarm (controller, Locust master, agents, sample target) in one command.
#[derive(clap::Args)]
pub struct DemoArgs {
    #[arg(long, default_value_t = 3)]
    agents: usize,
    #[arg(long, default_value_t = 10)]
    users: u64,
    #[arg(long, default_value_t = 5.0)]
    spawn_rate: f64,
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: String,
    #[arg(long, default_value = "127.0.0.1:8080")]
    target_listen: SocketAddr,
    #[arg(long, default_value = "locust")]
    locust: String,
}

impl DemoArgs {
    /// Runs until Ctrl-C or SIGTERM, printing as it goes.
    pub async fn run(self, dir: &Path) -> Result<()> {
        demo(dir, &self).await
    }
}

async fn demo(dir: &Path, o: &DemoArgs) -> Result<()> {
    let (target, _target_task) = super::target::bind(o.target_listen).await?;
    let report = init(
        dir,
        &InitOptions {
            name: "demo".into(),
            listen: o.listen.clone(),
            url: None,
            cert_names: vec![],
            locust: o.locust.clone(),
            target: format!("http://{target}"),
            force: false,
        },
    )?;
    let fleet = Fleet::load(dir)?;
    // The password is stored only as a hash, so a demo that is started again gets a new one.
    let password = match report.password {
        Some(p) => p,
        None => set_password(&fleet)?,
    };
    let controller = crate::daemon::start(&fleet).await?;
    let local = Local::new(&fleet);
    let api = Api::new(&fleet)?;
    println!("sample target on http://{target}");
    let wait = Duration::from_secs(120);
    if let Err(e) = scale(&fleet, &local, o.agents, false, wait, Output::Text).await {
        let _ = stop_agents(&api, &local).await;
        controller.stop().await;
        return Err(e);
    }
    if o.users > 0 && !start_test(&controller, o).await {
        println!("note: the test did not start; start it from the Locust UI");
    }
    print_banner(&fleet, dir, o, &password);
    // SIGTERM too: the agents run in process groups of their own and would outlive us.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot wait for Ctrl-C")?,
        _ = term.recv() => {}
    }
    println!("stopping agents and the controller…");
    stop_agents(&api, &local).await?;
    controller.stop().await;
    Ok(())
}

/// Starts the test once the workers have joined the master (a moment after the agents report
/// them started); false when they did not within 30 s.
async fn start_test(controller: &crate::daemon::Controller, o: &DemoArgs) -> bool {
    let api = &controller.state.master.api;
    let want = SwarmRequest {
        users: o.users,
        spawn_rate: o.spawn_rate,
    };
    for _ in 0..60 {
        if api
            .stats()
            .await
            .map(|s| s.worker_count >= o.agents as u64)
            .unwrap_or(false)
            && api.swarm(&want).await.is_ok()
        {
            controller.state.master.set_swarm(Some(want));
            return true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    false
}

fn print_banner(fleet: &Fleet, dir: &Path, o: &DemoArgs, password: &str) {
    let spec = fleet.spec_dir().join(&fleet.config.controller.locustfile);
    println!();
    println!(
        "fleet demo is running: {} local agents, {} users",
        o.agents, o.users
    );
    println!("  dashboard:   {}/", fleet.config.controller.url);
    println!("  Locust UI:   {}/locust/", fleet.config.controller.url);
    println!("  user:        {}", crate::daemon::UI_USER);
    println!("  password:    {password}   (shown once; `fleet passwd` makes a new one)");
    println!(
        "  CA:          {}  (the certificate is self-signed by the fleet CA)",
        fleet.ca_pem().display()
    );
    println!(
        "  edit {} and watch the agents restart on it",
        spec.display()
    );
    println!("  status:      fleet --dir {} status", dir.display());
    println!("Ctrl-C stops everything.");
}

async fn stop_agents(api: &Api, local: &Local) -> Result<()> {
    let ids: Vec<String> = local.observe().await?.into_iter().map(|n| n.id).collect();
    terminate(api, local, &ids, Output::Text).await
}
