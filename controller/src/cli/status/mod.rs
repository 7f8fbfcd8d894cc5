//! `fleet status`: the fleet's nodes, what the backend says joined with what each agent
//! reports to the controller. Everything a node reports is escaped before it is shown.
//!
//! On the controller host the backend lists the nodes; when the controller cannot be reached
//! they are still listed, their agent columns unknown. From elsewhere (a remote) there is no
//! backend, and the rows are the nodes the controller hears from.

mod rows;

use std::fmt;

use anyhow::Result;
use serde::Serialize;

pub use self::rows::{controller_rows, join_status, status_table, unknown_rows, StatusRow};
use super::backends::BackendArg;
use super::remote::Operator;
use crate::backend::Backend;

/// The fleet's nodes: what the backend says joined with what each agent reports.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// Default: `scale.backend` in fleet.toml, else local.
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
}

impl StatusArgs {
    pub async fn run(self, op: &Operator) -> Result<Status> {
        let api = op.api()?;
        let fleet = match self.backend {
            Some(_) => Some(op.need_fleet("--backend")?),
            None => op.fleet(),
        };
        let Some(fleet) = fleet else {
            return Ok(Status::new(controller_rows(&api.nodes().await?)));
        };
        let backend = BackendArg::pick(self.backend, fleet).build(fleet).await?;
        let observed = backend.observe().await?;
        api.report_listed(&observed).await;
        Ok(match api.nodes_if_up().await? {
            Some(views) => Status::new(join_status(&observed, &views)),
            None => Status {
                rows: unknown_rows(&observed),
                unreachable: Some(api.url().to_string()),
            },
        })
    }
}

/// The rows of `fleet status`: a JSON array, or the text table.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct Status {
    pub rows: Vec<StatusRow>,
    /// The controller that could not be reached, if it could not (a note under the table;
    /// in JSON every row says `unknown`).
    #[serde(skip)]
    pub unreachable: Option<String>,
}

impl Status {
    pub fn new(rows: Vec<StatusRow>) -> Status {
        Status {
            rows,
            unreachable: None,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        f.write_str(&status_table(&self.rows, now))?;
        if let Some(url) = &self.unreachable {
            write!(f, "the controller at {url} is unreachable, so what the agents run is unknown; is `fleet serve` running?")?;
        }
        Ok(())
    }
}
