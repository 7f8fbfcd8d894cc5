//! `fleet`: the operator's CLI (`cli/`) and the controller daemon (`daemon/`), with the Locust
//! master's supervision (`master/`) and the node backends (`backend/`). See docs/architecture.md.
#![forbid(unsafe_code)]

/// One timestamped line on stderr, formatted like `format!`: the controller's log ([`log()`]).
/// Defined before the modules so that every one of them can use it.
macro_rules! log {
    ($($arg:tt)*) => { $crate::log(format_args!($($arg)*)) };
}

pub mod aws;
pub mod backend;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod master;
pub mod secrets;

/// One timestamped line on stderr: the controller's log.
pub fn log(args: std::fmt::Arguments<'_>) {
    eprintln!(
        "{} fleet: {args}",
        humantime::format_rfc3339_millis(std::time::SystemTime::now())
    );
}
