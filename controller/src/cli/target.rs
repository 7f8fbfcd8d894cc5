//! `fleet target`: a small HTTP server to aim a local swarm at (loopback only by default).
//! Every path answers 200 with a short body; `/status/<code>` answers that code, so a spec can
//! exercise failures too.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use serde::Serialize;

use super::render::{print, Output};

fn app() -> Router {
    Router::new()
        .route(
            "/status/{code}",
            get(|Path(code): Path<u16>| async move {
                StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST)
            }),
        )
        .fallback(|| async { "hello from the fleet sample target\n" })
}

/// Run the sample HTTP target.
#[derive(clap::Args)]
pub struct TargetArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
}

/// Where the target listens (printed once, before it serves).
#[derive(Debug, Serialize)]
pub struct Listening {
    pub url: String,
}

impl std::fmt::Display for Listening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sample target on {}", self.url)
    }
}

impl TargetArgs {
    /// Serves until the process is stopped.
    pub async fn run(self, output: Output) -> Result<()> {
        let (addr, task) = bind(self.listen).await?;
        let url = format!("http://{addr}");
        print(output, &Listening { url })?;
        let _ = task.await;
        Ok(())
    }
}

pub async fn bind(addr: SocketAddr) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let l = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} for the sample target; pick another with --target-listen")
    })?;
    let local = l.local_addr()?;
    let h = tokio::spawn(async move {
        let _ = axum::serve(l, app()).await;
    });
    Ok((local, h))
}
