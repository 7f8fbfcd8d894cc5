//! `fleet down`: terminate every node the fleet owns, and what the backend made besides them.

use std::fmt;

use anyhow::Result;
use serde::Serialize;

use super::api::Api;
use super::backends::BackendArg;
use super::render::Output;
use super::scale::terminate;
use crate::backend::Backend;
use crate::config::Fleet;

/// Terminate every node the fleet owns.
#[derive(clap::Args)]
pub struct DownArgs {
    /// Default: `scale.backend` in fleet.toml, else local.
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
}

/// The nodes `fleet down` terminated.
#[derive(Debug, Serialize)]
pub struct Down {
    pub terminated: Vec<String>,
}

impl fmt::Display for Down {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "terminated {} nodes", self.terminated.len())
    }
}

impl DownArgs {
    pub async fn run(self, fleet: &Fleet, output: Output) -> Result<Down> {
        let backend = BackendArg::pick(self.backend, fleet).build(fleet).await?;
        let ids: Vec<String> = backend.observe().await?.into_iter().map(|n| n.id).collect();
        let api = Api::new(fleet)?;
        if backend.set_desired(0).await? {
            api.forget(&ids).await;
        } else {
            terminate(&api, &backend, &ids, output).await?;
        }
        backend.teardown().await?;
        Ok(Down { terminated: ids })
    }
}
