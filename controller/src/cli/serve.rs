//! `fleet serve`: a thin call into the daemon (`serve::start`), then wait for Ctrl-C or
//! SIGTERM and stop it.

use anyhow::Result;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Fleet;

pub async fn run(fleet: &Fleet) -> Result<()> {
    let c = crate::serve::start(fleet).await?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    crate::log(format_args!("stopping"));
    c.stop().await;
    Ok(())
}
