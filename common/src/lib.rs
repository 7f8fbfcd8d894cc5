//! Types and formats shared by `fleet` (the controller) and `fleet-agent`.
//!
//! Its core is the fixed contracts (docs/architecture.md, "Fixed contracts"): the bundle format, the signed
//! manifest, and the JSON bodies that cross the wire. Both programs depend on this crate, so it
//! must stay small and free of any server framework or AWS SDK. Beside the contracts sit the
//! helpers both programs (and the tests) share so that each fact is written once: the HTTPS
//! client and the address parser (`client`, `url`), process groups and `/proc` (`process`),
//! each behind a cargo feature, and what a spec's processes may inherit (`child_env`).
#![forbid(unsafe_code)]

pub mod bundle;
pub mod child_env;
#[cfg(feature = "client")]
pub mod client;
pub mod manifest;
#[cfg(feature = "process")]
pub mod process;
pub mod secret;
pub mod shard;
#[cfg(feature = "client")]
pub mod url;
pub mod wire;
