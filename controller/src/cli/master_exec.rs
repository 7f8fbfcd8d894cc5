//! `fleet master-exec` (hidden): how the supervisor starts a confined Locust master, and the
//! validation gate its confined `locust --list`. It applies the plan (user, Landlock rules) to
//! itself and executes Locust in its place (`master::confine`).

use std::ffi::OsString;

use anyhow::{Context, Result};

use crate::master::confine::{exec, Plan};

#[derive(clap::Args)]
pub struct MasterExecArgs {
    /// The plan, as JSON.
    #[arg(long)]
    plan: String,
    /// The program and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    command: Vec<OsString>,
}

impl MasterExecArgs {
    pub fn run(self) -> Result<()> {
        let plan: Plan = serde_json::from_str(&self.plan).context("fleet master-exec: --plan")?;
        Err(exec(&plan, &self.command))
    }
}
