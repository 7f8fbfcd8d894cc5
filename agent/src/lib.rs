//! `fleet-agent`: the small service baked into the AMI. See `DESIGN.md`, "The two programs".
#![forbid(unsafe_code)]

pub mod agent;
pub mod config;
pub mod imds;
pub mod supervisor;
