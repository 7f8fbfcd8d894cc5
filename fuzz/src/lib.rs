//! Fuzz targets for fleet's parsers (docs/reliability.md, "Fuzzing").
//!
//! One module per target, each with a `run(&[u8])` that feeds arbitrary bytes to the code a
//! hostile or careless input reaches and panics when a property fails: a panic inside fleet's
//! code, an error message over one line, an accepted input that breaks a limit, or a value that
//! does not survive the trip to the other side (controller to agent, agent to CLI).
//!
//! The same bodies run in two drivers: `fuzz_targets/*.rs` hand them to libFuzzer for the
//! coverage-guided runs of `tests/fuzz.sh`, and `fuzz-quick` (src/bin/quick.rs) runs them on
//! plain stable over the checked-in seeds plus random mutations, a few seconds per target in
//! `./run.sh test`.
#![forbid(unsafe_code)]

pub mod agent_config;
pub mod bundle;
pub mod fleet_toml;
pub mod heartbeat;
pub mod manifest;
pub mod mutate;

use std::path::PathBuf;
use std::sync::OnceLock;

/// A target: its name (the directory of its seeds, the libFuzzer binary) and its body.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
}

/// Every target, in the order the drivers run them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "bundle",
        run: bundle::run,
    },
    Target {
        name: "manifest",
        run: manifest::run,
    },
    Target {
        name: "agent_config",
        run: agent_config::run,
    },
    Target {
        name: "fleet_toml",
        run: fleet_toml::run,
    },
    Target {
        name: "heartbeat",
        run: heartbeat::run,
    },
];

/// The target named `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// A directory of this process's own for targets that write files: `fleet-fuzz-<pid>` under
/// the temporary directory (tests/fuzz.sh points `TMPDIR` at one it removes afterwards).
pub fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("fleet-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("cannot create the fuzz scratch directory");
        d
    })
}

/// Removes [`scratch`] (the quick driver calls it before exiting).
pub fn remove_scratch() {
    let _ = std::fs::remove_dir_all(scratch());
}

/// Asserts that an error shown to a person is one line, as every fleet error must be.
pub fn assert_one_line(what: &str, msg: &str) {
    assert!(
        !msg.contains(['\n', '\r']),
        "{what}: error is not one line: {msg:?}"
    );
}

/// `data` split at its first `sep`: the part before and the part after (empty if none).
pub fn split_at_byte(data: &[u8], sep: u8) -> (&[u8], &[u8]) {
    match data.iter().position(|b| *b == sep) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}
