//! The checked-in seeds are where every fuzz run starts: each must pass its target, and the
//! valid ones must get past the parser to the checks behind it, or the fuzzer starts shallow.

use std::path::{Path, PathBuf};

use fleet_common::bundle::{unpack, Limits};
use fleet_common::wire::Heartbeat;

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no seeds in {}", dir.display());
    v.into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

#[test]
fn every_seed_and_regression_passes_its_target() {
    for t in fleet_fuzz::TARGETS {
        for sub in ["seeds", "regressions"] {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(sub).join(t.name);
            for e in std::fs::read_dir(dir).into_iter().flatten() {
                (t.run)(&std::fs::read(e.unwrap().path()).unwrap());
            }
        }
    }
    fleet_fuzz::remove_scratch();
}

#[test]
fn bundle_seeds_unpack() {
    for (name, data) in seeds("bundle") {
        let (mode, rest) = data.split_first().unwrap();
        let gz = if mode & 1 != 0 {
            rest.to_vec()
        } else {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(rest).unwrap();
            e.finish().unwrap()
        };
        let out = tempfile::tempdir().unwrap();
        let stats = unpack(&gz, &out.path().join("b"), &Limits::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(stats.files > 0, "{name}");
    }
}

#[test]
fn heartbeat_seeds_parse() {
    for (name, data) in seeds("heartbeat") {
        serde_json::from_slice::<Heartbeat>(&data).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn manifest_seeds_are_manifests() {
    for (name, data) in seeds("manifest") {
        let body = match data[0] & 1 {
            1 => &data[1..],
            _ => fleet_fuzz::split_at_byte(&data[1..], b'\n').1,
        };
        serde_json::from_slice::<fleet_common::manifest::Manifest>(body)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn config_seeds_are_accepted() {
    use fleet_agent::config::{parse_source, resolve, Layers, UserData};
    for (name, data) in seeds("agent_config") {
        let (ud, flags) = fleet_fuzz::split_at_byte(&data, 0);
        let flags: Vec<String> = std::str::from_utf8(flags)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        let layers = Layers {
            file: parse_source("ami", include_str!("../../ami/agent.toml")).unwrap(),
            flags: fleet_agent::config::flag_source(&flags).unwrap(),
            ..Layers::default()
        };
        let ud = UserData::Imds {
            endpoint: "http://169.254.169.254".into(),
            instance_id: "i-0".into(),
            raw: Some(ud.to_vec()),
        };
        resolve(layers, ud).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, data) in seeds("fleet_toml") {
        toml::from_str::<fleet::config::FleetConfig>(std::str::from_utf8(&data).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
