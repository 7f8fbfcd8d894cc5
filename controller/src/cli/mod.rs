//! The operator's CLI: one file (or folder) per command, each a `clap::Args` struct whose `run`
//! returns a value that is both `Serialize` and `Display`; [`render`] prints it as text or as
//! JSON. Every command that talks to the controller uses the one client in [`api`]; the
//! commands that drive nodes take their backend from `--backend` ([`backends`]). The commands
//! that need only the controller (`status`, `swarm`, `stop`, `run`) work from any machine that
//! has the fleet CA and the operator token ([`remote`]); the others need the fleet directory.

mod api;
mod backends;
mod completions;
mod demo;
mod down;
mod init;
mod master_exec;
mod nginx;
mod passwd;
mod remote;
mod render;
mod run;
mod scale;
mod serve;
mod spec;
pub(crate) mod status;
mod swarm;
mod target;
mod token;
mod user_data;

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

pub use self::backends::BackendArg;
use self::remote::Operator;
use self::render::{print, Output};
use crate::config::Fleet;

#[derive(Parser)]
#[command(
    name = "fleet",
    version,
    about = "Bootstrap and steer swarms of Locust load generators"
)]
pub struct Cli {
    /// The fleet directory (made by `fleet init`).
    #[arg(long, global = true, env = "FLEET_DIR", default_value = ".")]
    dir: PathBuf,
    /// Output format for scripts.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "FLEET_OUTPUT",
        default_value = "text"
    )]
    output: Output,
    /// The controller to talk to, by the name `fleet remote add` gave it.
    #[arg(long, global = true, env = "FLEET_REMOTE")]
    remote: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Init(init::InitArgs),
    /// Make a new web UI password (printed once; only its hash is stored); the running
    /// controller reloads it.
    Passwd,
    /// Rotate the agents' token on a running fleet.
    Token(token::TokenArgs),
    Nginx(nginx::NginxArgs),
    /// Run the controller: HTTPS API, spec watcher, Locust master.
    Serve,
    Scale(scale::ScaleArgs),
    UserData(user_data::UserDataArgs),
    Down(down::DownArgs),
    Status(status::StatusArgs),
    Swarm(swarm::SwarmArgs),
    /// Stop the running test.
    Stop,
    Run(run::RunArgs),
    Spec(spec::SpecArgs),
    Target(target::TargetArgs),
    Demo(demo::DemoArgs),
    /// Start the Locust master confined (used by `fleet serve`).
    #[command(hide = true)]
    MasterExec(master_exec::MasterExecArgs),
    Remote(remote::RemoteArgs),
    Completions(completions::CompletionsArgs),
}

/// The process's exit code for a command's error: [`run::THRESHOLDS_FAILED`] for a run that
/// broke a threshold, else 1.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    match e.downcast_ref::<run::ThresholdsFailed>() {
        Some(_) => run::THRESHOLDS_FAILED,
        None => 1,
    }
}

/// Runs one command and prints its result.
pub async fn run(cli: Cli) -> Result<()> {
    let out = cli.output;
    let dir = cli.dir;
    // The commands that make the fleet directory, or need none.
    let cmd = match cli.cmd {
        Cmd::Init(a) => return print(out, &a.run(&dir)?),
        Cmd::Target(a) => return a.run(out).await,
        Cmd::Demo(a) => return a.run(&dir).await,
        Cmd::MasterExec(a) => return a.run(),
        Cmd::Remote(a) => return a.run(out),
        Cmd::Completions(a) => return print(out, &a.run()?),
        cmd => cmd,
    };
    // The commands that need only the controller: from anywhere.
    let cmd = match cmd {
        Cmd::Status(a) => return print(out, &a.run(&find(&dir, &cli.remote)?).await?),
        Cmd::Swarm(a) => return print(out, &a.run(&find(&dir, &cli.remote)?.api()?).await?),
        Cmd::Stop => return print(out, &swarm::stop(&find(&dir, &cli.remote)?.api()?).await?),
        Cmd::Run(a) => {
            let report = a.run(&find(&dir, &cli.remote)?, out).await?;
            print(out, &report)?;
            return report.gate();
        }
        Cmd::Spec(a) => return a.run(&find(&dir, &cli.remote)?, out).await,
        cmd => cmd,
    };
    // The commands that need the fleet directory (and, for ec2 and asg, AWS credentials). They
    // act on that directory's own fleet: a remote named here would be a mistake.
    if let Some(name) = &cli.remote {
        bail!("--remote (or FLEET_REMOTE) names {name}, but `fleet {}` works only in the fleet directory on the controller host; run it there without --remote", cmd.name());
    }
    let fleet = Fleet::load(&dir)?;
    match cmd {
        Cmd::Passwd => print(out, &passwd::run(&fleet).await?),
        Cmd::Token(a) => print(out, &a.run(&fleet).await?),
        Cmd::Nginx(a) => print(out, &a.run(&fleet)?),
        Cmd::Serve => serve::run(&fleet).await,
        Cmd::Scale(a) => print(out, &a.run(&fleet, out).await?),
        Cmd::UserData(a) => print(out, &a.run(&fleet)?),
        Cmd::Down(a) => print(out, &a.run(&fleet, out).await?),
        Cmd::Init(_)
        | Cmd::Target(_)
        | Cmd::Demo(_)
        | Cmd::MasterExec(_)
        | Cmd::Remote(_)
        | Cmd::Completions(_)
        | Cmd::Status(_)
        | Cmd::Swarm(_)
        | Cmd::Stop
        | Cmd::Run(_)
        | Cmd::Spec(_) => unreachable!("handled above"),
    }
}

impl Cmd {
    /// The command's name, as typed.
    fn name(&self) -> &'static str {
        match self {
            Cmd::Init(_) => "init",
            Cmd::Passwd => "passwd",
            Cmd::Token(_) => "token",
            Cmd::Nginx(_) => "nginx",
            Cmd::Serve => "serve",
            Cmd::Scale(_) => "scale",
            Cmd::UserData(_) => "user-data",
            Cmd::Down(_) => "down",
            Cmd::Status(_) => "status",
            Cmd::Swarm(_) => "swarm",
            Cmd::Stop => "stop",
            Cmd::Run(_) => "run",
            Cmd::Spec(_) => "spec",
            Cmd::Target(_) => "target",
            Cmd::Demo(_) => "demo",
            Cmd::MasterExec(_) => "master-exec",
            Cmd::Remote(_) => "remote",
            Cmd::Completions(_) => "completions",
        }
    }
}

/// The controller a command talks to ([`remote::Operator::find`]).
fn find(dir: &std::path::Path, remote: &Option<String>) -> Result<Operator> {
    Operator::find(dir, remote.as_deref())
}
