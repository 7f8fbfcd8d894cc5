//! Types and formats shared by `fleet` (the controller) and `fleet-agent`.
//!
//! Everything here is a fixed contract (docs/architecture.md, "Fixed contracts"): the bundle format, the signed
//! manifest, and the JSON bodies that cross the wire. Both programs depend on this crate, so it
//! must stay small and free of any server framework or AWS SDK.
#![forbid(unsafe_code)]

pub mod bundle;
#[cfg(feature = "client")]
pub mod client;
pub mod manifest;
#[cfg(feature = "process")]
pub mod process;
pub mod secret;
pub mod wire;
