//! `fleet demo`: the quick start's local swarm in one command. It runs the same pieces an
//! operator runs by hand (`fleet init`, `fleet serve`, `fleet scale --backend local`, a test
//! through `/api/swarm`) plus the sample target, in one process, until Ctrl-C.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use fleet_common::wire::SwarmRequest;

use crate::backend::local::Local;
use crate::backend::Backend;
use crate::config::Fleet;
use crate::init::{init, set_password, InitOptions};
use crate::ops::{scale, Output};

pub struct DemoOptions {
    pub agents: usize,
    pub users: u64,
    pub spawn_rate: f64,
    pub target_listen: SocketAddr,
    pub locust: String,
    pub listen: String,
}

pub async fn demo(dir: &Path, o: &DemoOptions) -> Result<()> {
    let (target, _target_task) = crate::target::bind(o.target_listen).await?;
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
    println!("sample target on http://{target}");
    let r = scale(
        &fleet,
        &local,
        o.agents,
        false,
        Duration::from_secs(120),
        Output::Text,
    )
    .await;
    if let Err(e) = r {
        let ids: Vec<String> = local.observe().await?.into_iter().map(|n| n.id).collect();
        let _ = crate::ops::terminate(&fleet, &local, &ids, Output::Text).await;
        controller.stop().await;
        return Err(e);
    }
    if o.users > 0 {
        // The workers join the master a moment after the agents report them started.
        let api = &controller.state.master.api;
        let want = SwarmRequest {
            users: o.users,
            spawn_rate: o.spawn_rate,
        };
        let mut started = false;
        for _ in 0..60 {
            if api
                .stats()
                .await
                .map(|s| s.worker_count >= o.agents as u64)
                .unwrap_or(false)
                && api.swarm(&want).await.is_ok()
            {
                controller.state.master.set_swarm(Some(want));
                started = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if !started {
            println!("note: the test did not start; start it from the Locust UI");
        }
    }
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
    // SIGTERM too: the agents run in process groups of their own and would outlive us.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot wait for Ctrl-C")?,
        _ = term.recv() => {}
    }
    println!("stopping agents and the controller…");
    let ids: Vec<String> = local.observe().await?.into_iter().map(|n| n.id).collect();
    crate::ops::terminate(&fleet, &local, &ids, Output::Text).await?;
    controller.stop().await;
    Ok(())
}
