//! `fleet`: the operator's CLI and the controller. See `DESIGN.md`, "The two programs".
#![forbid(unsafe_code)]

pub mod auth;
pub mod aws;
pub mod backend;
pub mod cli;
pub mod client_ip;
pub mod config;
pub mod events;
pub mod fanout;
pub mod limiter;
pub mod listener;
pub mod master;
pub mod nodes;
pub mod overview;
pub mod procfs;
pub mod proxy;
pub mod publish;
pub mod secrets;
pub mod serve;
pub mod server;
pub mod standing;
pub mod validate;

/// One timestamped line on stderr: the controller's log.
pub fn log(args: std::fmt::Arguments<'_>) {
    eprintln!(
        "{} fleet: {args}",
        humantime::format_rfc3339_millis(std::time::SystemTime::now())
    );
}
