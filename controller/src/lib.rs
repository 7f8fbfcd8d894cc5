//! `fleet`: the operator's CLI and the controller. See `DESIGN.md`, "The two programs".
#![forbid(unsafe_code)]

pub mod auth;
pub mod aws;
pub mod backend;
pub mod client_ip;
pub mod config;
pub mod demo;
pub mod events;
pub mod fanout;
pub mod init;
pub mod limiter;
pub mod listener;
pub mod master;
pub mod nginx;
pub mod nodes;
pub mod ops;
pub mod overview;
pub mod procfs;
pub mod proxy;
pub mod publish;
pub mod run;
pub mod secrets;
pub mod serve;
pub mod server;
pub mod standing;
pub mod target;
pub mod userdata;
pub mod validate;

/// One timestamped line on stderr: the controller's log.
pub fn log(args: std::fmt::Arguments<'_>) {
    eprintln!(
        "{} fleet: {args}",
        humantime::format_rfc3339_millis(std::time::SystemTime::now())
    );
}
