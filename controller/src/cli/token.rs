//! `fleet token rotate` and `fleet token finish`: a new agent token on a running fleet, without
//! a moment where agents are refused (docs/security.md, "Rotation").
//!
//! `rotate` keeps the current token as `secrets/agent.token.previous`, writes a new one, and has
//! the controller accept both. Agents then get the new token (nodes with a `token_file` read it
//! again on SIGHUP, or on their first 401); the controller notes when the previous token was
//! last used. `finish` deletes the previous token once nothing has used it for a while, and the
//! controller refuses it from then on.

use std::fmt;
use std::time::Duration;

use anyhow::{bail, Result};
use fleet_common::secret::random_token;
use serde::Serialize;

use super::api::Api;
use crate::config::Fleet;
use crate::daemon::reload::{previous_agent_token, Reloaded};
use crate::secrets::write_secret;

#[derive(clap::Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    cmd: TokenCmd,
}

#[derive(clap::Subcommand)]
enum TokenCmd {
    /// Start a rotation: a new agent token; the current one is still accepted until `finish`.
    Rotate,
    /// End the rotation: the previous agent token is refused from now on.
    Finish {
        /// How long the previous token must have gone unused (agents heartbeat every 5 s).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
        quiet_for: Duration,
        /// Finish even if agents used the previous token recently (they are refused, and
        /// those with a token_file read it again).
        #[arg(long)]
        force: bool,
    },
}

/// What the running controller made of a change on disk.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Told {
    /// It reloaded.
    Reloaded(Reloaded),
    /// No controller answered: one started later reads the files.
    NotRunning { url: String },
    /// It answered but did not reload.
    Failed { error: String },
}

impl fmt::Display for Told {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Told::Reloaded(r) => write!(f, "the running controller {r}"),
            Told::NotRunning { url } => write!(
                f,
                "no controller answered at {url}: `fleet serve` reads it when it starts (or \
                 send SIGHUP to the running one)"
            ),
            Told::Failed { error } => write!(
                f,
                "the controller did not reload ({error}); fix that and send SIGHUP to `fleet \
                 serve` (systemctl reload fleet-controller)"
            ),
        }
    }
}

/// Asks the running controller to reload, and says how that went.
pub async fn tell_controller(fleet: &Fleet) -> Told {
    let r = match Api::new(fleet) {
        Ok(api) => api.reload().await,
        Err(e) => Err(e),
    };
    match r {
        Ok(Some(r)) => Told::Reloaded(r),
        Ok(None) => Told::NotRunning {
            url: fleet.config.controller.url.clone(),
        },
        Err(e) => Told::Failed {
            error: format!("{e:#}"),
        },
    }
}

/// Whether `finish` may go ahead: a pure decision on what the controller reported.
pub fn may_finish(status: &Told, quiet_for: Duration, force: bool) -> Result<()> {
    let Told::Reloaded(r) = status else {
        return Ok(());
    };
    match r.previous_token_used_s_ago {
        Some(ago) if !force && Duration::from_secs(ago) < quiet_for => bail!(
            "the previous agent token was used {ago} s ago: some agents still have it; give \
             them secrets/agent.token (agents with a token_file read it again on SIGHUP) and \
             retry, or pass --force to refuse them now"
        ),
        _ => Ok(()),
    }
}

/// The result of `fleet token rotate` or `finish`.
#[derive(Debug, Serialize)]
pub struct TokenDone {
    pub action: &'static str,
    pub token_file: String,
    pub controller: Told,
}

impl fmt::Display for TokenDone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.action {
            "rotate" => writeln!(
                f,
                "new agent token in {}; the previous one is accepted until `fleet token \
                 finish`\ngive it to the agents: nodes with a token_file read it again on \
                 SIGHUP; nodes with the token in their user-data must be replaced",
                self.token_file
            )?,
            _ => writeln!(
                f,
                "rotation finished: only the agent token in {} is accepted",
                self.token_file
            )?,
        }
        write!(f, "{}", self.controller)
    }
}

impl TokenArgs {
    pub async fn run(self, fleet: &Fleet) -> Result<TokenDone> {
        let current = fleet.agent_token();
        let previous = previous_agent_token(fleet);
        let action = match self.cmd {
            TokenCmd::Rotate => {
                if previous.exists() {
                    bail!(
                        "an agent-token rotation is in progress ({} exists); end it with `fleet \
                         token finish` first",
                        previous.display()
                    );
                }
                let old = fleet.read(&current)?;
                write_secret(&previous, old.as_bytes(), false)?;
                write_secret(&current, format!("{}\n", random_token(32)).as_bytes(), true)?;
                "rotate"
            }
            TokenCmd::Finish { quiet_for, force } => {
                if !previous.exists() {
                    bail!("no agent-token rotation is in progress; start one with `fleet token rotate`");
                }
                may_finish(&tell_controller(fleet).await, quiet_for, force)?;
                std::fs::remove_file(&previous)?;
                "finish"
            }
        };
        Ok(TokenDone {
            action,
            token_file: current.display().to_string(),
            controller: tell_controller(fleet).await,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn used(ago: Option<u64>) -> Told {
        Told::Reloaded(Reloaded {
            rotating: true,
            previous_token_used_s_ago: ago,
            ..Reloaded::default()
        })
    }

    #[test]
    fn finish_waits_until_the_previous_token_went_quiet_unless_forced() {
        let q = Duration::from_secs(30);
        let e = may_finish(&used(Some(3)), q, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("used 3 s ago") && e.contains("--force"), "{e}");
        may_finish(&used(Some(3)), q, true).unwrap();
        may_finish(&used(Some(30)), q, false).unwrap();
        may_finish(&used(None), q, false).unwrap();
        let down = Told::NotRunning {
            url: "https://x:1".into(),
        };
        may_finish(&down, q, false).unwrap();
    }
}
