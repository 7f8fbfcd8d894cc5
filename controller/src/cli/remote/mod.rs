//! Working from a laptop: `fleet remote` names controllers (`profiles.rs`: `remotes.toml`),
//! `endpoint.rs` decides which controller a command talks to, and [`Operator`] is what the
//! commands that need only the controller (`status`, `swarm`, `stop`, `run`) work with.
//! docs/remote.md is the operator's page.

mod endpoint;
mod profiles;

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

pub use self::endpoint::Endpoint;
use self::endpoint::{choose, Inputs};
use self::profiles::{Remote, Remotes};
use super::api::Api;
use super::render::{print, Output};
use crate::config::{Fleet, CONFIG_FILE};

/// The environment of this process.
fn env(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

/// What a command that talks only to the controller works with: the controller, and the fleet
/// directory when that controller is the directory's own (the backend needs it).
pub struct Operator {
    pub endpoint: Endpoint,
    fleet: Option<Fleet>,
}

impl Operator {
    /// Finds the controller from `--remote` (or `FLEET_REMOTE`), the environment, the user's
    /// remotes and the fleet directory `dir`.
    pub fn find(dir: &Path, remote: Option<&str>) -> Result<Operator> {
        let fleet = match dir.join(CONFIG_FILE).exists() {
            true => Some(Fleet::load(dir)?),
            false => None,
        };
        // remotes.toml is read only when it can matter, so a broken one on a controller host
        // does not get in the way of the commands run in its fleet directory.
        let remotes = match (remote, &fleet, profiles::path(&env)) {
            (Some(_), _, Err(e)) => return Err(e),
            (None, Some(_), _) | (None, None, Err(_)) => Remotes::default(),
            (_, _, Ok(p)) => Remotes::load(&p)?,
        };
        let endpoint = Endpoint::load(choose(&Inputs {
            remote,
            env: &env,
            remotes: &remotes,
            fleet: fleet.as_ref(),
        })?)?;
        let fleet = fleet.filter(|f| endpoint.is_of(f));
        Ok(Operator { endpoint, fleet })
    }

    pub fn api(&self) -> Result<Api> {
        Api::connect(&self.endpoint)
    }

    /// The fleet directory, when the controller is its own.
    pub fn fleet(&self) -> Option<&Fleet> {
        self.fleet.as_ref()
    }

    /// The fleet directory, for `what` (a flag that needs the backend); an error that says
    /// where to run it when there is none.
    pub fn need_fleet(&self, what: &str) -> Result<&Fleet> {
        self.fleet.as_ref().ok_or_else(|| {
            anyhow!(
                "{what} needs the fleet directory of controller {} (its fleet.toml, and AWS credentials for ec2 and asg): run it on the controller host with --dir, or leave {what} out",
                self.endpoint.url
            )
        })
    }
}

/// Name the controllers this machine talks to (`remotes.toml` in the user's config directory).
#[derive(clap::Args)]
pub struct RemoteArgs {
    #[command(subcommand)]
    cmd: RemoteCmd,
}

#[derive(clap::Subcommand)]
enum RemoteCmd {
    /// Name a controller: copies its URL, the fleet CA and the operator token into
    /// remotes.toml (0600). The first one added is the default.
    Add {
        name: String,
        /// `https://host[:port]`, a name the controller's certificate holds.
        url: String,
        /// A copy of the fleet's certs/ca.pem.
        #[arg(long)]
        ca: PathBuf,
        /// A copy of the fleet's secrets/operator.token.
        #[arg(long)]
        token_file: PathBuf,
        /// Replace a remote of that name.
        #[arg(long)]
        force: bool,
    },
    /// The named controllers (never their tokens).
    List,
    /// Forget a controller.
    Remove { name: String },
    /// The controller that commands run outside a fleet directory talk to.
    Use { name: String },
}

/// `fleet remote list`, and what every other `fleet remote` command prints: the remotes after it.
#[derive(Debug, Serialize)]
pub struct RemoteList {
    pub file: PathBuf,
    pub default: Option<String>,
    pub remotes: Vec<RemoteRow>,
    /// What the command did (`added prod`), for the text output.
    #[serde(skip)]
    pub did: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RemoteRow {
    pub name: String,
    pub url: String,
    pub default: bool,
}

impl fmt::Display for RemoteList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(did) = &self.did {
            return write!(f, "{did} ({})", self.file.display());
        }
        if self.remotes.is_empty() {
            return write!(
                f,
                "no remotes in {}; add one with `fleet remote add NAME URL --ca FILE --token-file FILE`",
                self.file.display()
            );
        }
        writeln!(f, "  {:<20} URL", "NAME")?;
        for r in &self.remotes {
            let mark = if r.default { '*' } else { ' ' };
            writeln!(f, "{mark} {:<20} {}", r.name, r.url)?;
        }
        Ok(())
    }
}

impl RemoteArgs {
    pub fn run(self, output: Output) -> Result<()> {
        let file = profiles::path(&env)?;
        let mut remotes = Remotes::load(&file)?;
        let did = match self.cmd {
            RemoteCmd::List => None,
            RemoteCmd::Add {
                name,
                url,
                ca,
                token_file,
                force,
            } => {
                let read = |p: &Path| {
                    std::fs::read_to_string(p)
                        .with_context(|| format!("cannot read {}", p.display()))
                };
                let remote = Remote {
                    url: url.trim_end_matches('/').to_string(),
                    ca: read(&ca)?,
                    token: read(&token_file)?.trim().to_string(),
                };
                let url = remote.url.clone();
                let default = remotes.add(&name, remote, force)?;
                let tail = if default { ", the default" } else { "" };
                Some(format!("added remote {name}: {url}{tail}"))
            }
            RemoteCmd::Remove { name } => {
                remotes.remove(&name)?;
                Some(format!("removed remote {name}"))
            }
            RemoteCmd::Use { name } => {
                remotes.make_default(&name)?;
                Some(format!("remote {name} is the default"))
            }
        };
        if did.is_some() {
            remotes.save(&file)?;
        }
        print(output, &list(&remotes, file, did))
    }
}

fn list(r: &Remotes, file: PathBuf, did: Option<String>) -> RemoteList {
    RemoteList {
        file,
        default: r.default.clone(),
        remotes: r
            .remotes
            .iter()
            .map(|(name, rem)| RemoteRow {
                name: name.clone(),
                url: rem.url.clone(),
                default: r.default.as_ref() == Some(name),
            })
            .collect(),
        did,
    }
}
