//! The operator's CLI: one file (or folder) per command, each a `clap::Args` struct whose `run`
//! returns a value that is both `Serialize` and `Display`; [`render`] prints it as text or as
//! JSON. Every command that talks to the controller uses the one client in [`api`]; the
//! commands that drive nodes take their backend from `--backend` ([`backends`]).

mod api;
mod backends;
mod demo;
mod down;
mod init;
mod nginx;
mod passwd;
mod render;
mod run;
mod scale;
mod serve;
pub(crate) mod status;
mod swarm;
mod target;
mod user_data;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    #[arg(long, global = true, value_enum, default_value = "text")]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Init(init::InitArgs),
    /// Make a new web UI password (printed once; only its hash is stored).
    Passwd,
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
    Target(target::TargetArgs),
    Demo(demo::DemoArgs),
}

/// Runs one command and prints its result.
pub async fn run(cli: Cli) -> Result<()> {
    let out = cli.output;
    let dir = cli.dir;
    // The commands that make the fleet directory, or need none.
    let cmd = match cli.cmd {
        Cmd::Init(a) => return print(out, &a.run(&dir)?),
        Cmd::Target(a) => return a.run().await,
        Cmd::Demo(a) => return a.run(&dir).await,
        cmd => cmd,
    };
    let fleet = Fleet::load(&dir)?;
    match cmd {
        Cmd::Passwd => print(out, &passwd::run(&fleet)?),
        Cmd::Nginx(a) => print(out, &a.run(&fleet)?),
        Cmd::Serve => serve::run(&fleet).await,
        Cmd::Scale(a) => print(out, &a.run(&fleet, out).await?),
        Cmd::UserData(a) => print(out, &a.run(&fleet)?),
        Cmd::Down(a) => print(out, &a.run(&fleet, out).await?),
        Cmd::Status(a) => print(out, &a.run(&fleet).await?),
        Cmd::Swarm(a) => print(out, &a.run(&fleet).await?),
        Cmd::Stop => print(out, &swarm::stop(&fleet).await?),
        Cmd::Run(a) => print(out, &a.run(&fleet, out).await?),
        Cmd::Init(_) | Cmd::Target(_) | Cmd::Demo(_) => unreachable!("handled above"),
    }
}
