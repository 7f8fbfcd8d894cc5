//! `fleet swarm` and `fleet stop`: start (or resize) and stop the test through the controller,
//! which records it (`/api/swarm`, `/api/stop`: docs/protocol.md).

use std::fmt;

use anyhow::Result;
use fleet_common::wire::{routes, SwarmRequest};
use serde::Serialize;

use super::api::Api;

/// Start (or resize) the test through the controller.
#[derive(clap::Args)]
pub struct SwarmArgs {
    #[arg(long)]
    users: u64,
    #[arg(long, default_value_t = 10.0)]
    spawn_rate: f64,
}

/// The test the controller started.
#[derive(Debug, Serialize)]
pub struct Started(pub SwarmRequest);

impl fmt::Display for Started {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "test started: {} users at {}/s",
            self.0.users, self.0.spawn_rate
        )
    }
}

impl SwarmArgs {
    pub async fn run(self, api: &Api) -> Result<Started> {
        let want = SwarmRequest {
            users: self.users,
            spawn_rate: self.spawn_rate,
        };
        api.act(routes::API_SWARM, serde_json::to_value(want)?)
            .await?;
        Ok(Started(want))
    }
}

/// The test was stopped.
#[derive(Debug, Serialize)]
pub struct Stopped {
    pub stopped: bool,
}

impl fmt::Display for Stopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("test stopped")
    }
}

/// `fleet stop`.
pub async fn stop(api: &Api) -> Result<Stopped> {
    api.act(routes::API_STOP, serde_json::json!({})).await?;
    Ok(Stopped { stopped: true })
}
