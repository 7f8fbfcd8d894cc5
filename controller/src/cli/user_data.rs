//! `fleet user-data`: print the document a node's agent reads over IMDSv2 (docs/user-data.md;
//! `backend::user_data` renders it, the same text the `ec2` and `asg` backends launch with).

use std::fmt;

use anyhow::Result;
use serde::Serialize;

use super::backends::BackendArg;
use crate::config::Fleet;

/// Print the EC2 user-data a node needs (the agent reads it over IMDSv2).
#[derive(clap::Args)]
pub struct UserDataArgs {
    #[arg(long, value_enum, default_value = "ec2")]
    backend: BackendArg,
}

/// The user-data, printed as it is.
#[derive(Debug, Serialize)]
pub struct UserData {
    pub backend: &'static str,
    pub user_data: String,
}

impl fmt::Display for UserData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.user_data)
    }
}

impl UserDataArgs {
    pub fn run(self, fleet: &Fleet) -> Result<UserData> {
        let backend = self.backend.name();
        Ok(UserData {
            backend,
            user_data: crate::backend::user_data::render(fleet, backend)?,
        })
    }
}
