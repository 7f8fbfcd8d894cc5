//! `fleet`: the operator's CLI and the controller. See `DESIGN.md`, "The two programs".
#![forbid(unsafe_code)]

pub mod aws;
pub mod backend;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod init;
pub mod master;
pub mod nginx;
pub mod ops;
pub mod procfs;
pub mod run;
pub mod secrets;
pub mod target;
pub mod userdata;

/// One timestamped line on stderr: the controller's log.
pub fn log(args: std::fmt::Arguments<'_>) {
    eprintln!(
        "{} fleet: {args}",
        humantime::format_rfc3339_millis(std::time::SystemTime::now())
    );
}
