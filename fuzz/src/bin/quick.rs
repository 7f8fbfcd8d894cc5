//! `fuzz-quick`: the fuzz targets on plain stable, for `./run.sh test` and for replaying inputs.
//!
//! ```text
//! fuzz-quick [--seconds N] [--seed S] [TARGET...]   seeds and regressions, then N s of mutations
//! fuzz-quick --replay TARGET FILE...                run the files once (e.g. a libFuzzer crash)
//! ```
//!
//! Each target first runs every file in `fuzz/seeds/<target>/`, `fuzz/regressions/<target>/`
//! and, when a coverage-guided run left one, `fuzz/corpus/<target>/`; then random mutations of
//! them until its time is up. An input that makes a target panic is saved under
//! `fuzz/artifacts/<target>/` and the run exits 1. The seed is printed so a run can be repeated.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use fleet_fuzz::mutate::{mutate, Rng};
use fleet_fuzz::{target, Target, TARGETS};

/// Longest mutated input: above the largest heartbeat body (32 KiB), far below what a target
/// needs to reach any check.
const MAX_LEN: usize = 64 << 10;

struct Args {
    seconds: f64,
    seed: u64,
    targets: Vec<&'static Target>,
    replay: Vec<PathBuf>,
}

fn usage(why: &str) -> String {
    format!("fuzz-quick: {why}; usage: fuzz-quick [--seconds N] [--seed S] [TARGET...] | --replay TARGET FILE...")
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        seconds: 4.0,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
        targets: vec![],
        replay: vec![],
    };
    let mut it = std::env::args().skip(1);
    let mut replaying = false;
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| usage(&format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--seconds" => {
                a.seconds = value("--seconds")?
                    .parse()
                    .map_err(|_| usage("--seconds takes a number"))?
            }
            "--seed" => {
                a.seed = value("--seed")?
                    .parse()
                    .map_err(|_| usage("--seed takes an integer"))?
            }
            "--replay" => replaying = true,
            t if replaying && !a.targets.is_empty() => a.replay.push(t.into()),
            t => a
                .targets
                .push(target(t).ok_or_else(|| usage(&format!("no target {t:?}")))?),
        }
    }
    if replaying && (a.targets.len() != 1 || a.replay.is_empty()) {
        return Err(usage("--replay takes one target and at least one file"));
    }
    if a.targets.is_empty() {
        a.targets = TARGETS.iter().collect();
    }
    Ok(a)
}

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.is_file());
    v.sort();
    v
}

/// Runs `input`; on a panic saves it and returns where.
fn run_one(t: &Target, input: &[u8]) -> Result<(), PathBuf> {
    if catch_unwind(AssertUnwindSafe(|| (t.run)(input))).is_ok() {
        return Ok(());
    }
    let dir = fuzz_dir().join("artifacts").join(t.name);
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!(
        "crash-{}",
        &fleet_common::bundle::sha256_hex(input)[..16]
    ));
    let _ = std::fs::write(&path, input);
    Err(path)
}

fn fuzz(t: &Target, seconds: f64, seed: u64) -> Result<(), PathBuf> {
    let mut inputs = Vec::new();
    let mut counts = Vec::new();
    for sub in ["seeds", "regressions", "corpus"] {
        let found = files(&fuzz_dir().join(sub).join(t.name));
        counts.push(format!("{} {sub}", found.len()));
        for f in found {
            let input = std::fs::read(&f).unwrap_or_default();
            run_one(t, &input)?;
            inputs.push(input);
        }
    }
    if inputs.is_empty() {
        inputs.push(Vec::new());
    }
    let mut rng = Rng::new(seed);
    let start = Instant::now();
    let budget = Duration::from_secs_f64(seconds);
    let mut runs: u64 = 0;
    while start.elapsed() < budget {
        let a = &inputs[rng.below(inputs.len())];
        let b = &inputs[rng.below(inputs.len())];
        let input = mutate(&mut rng, a, b, MAX_LEN);
        run_one(t, &input)?;
        runs += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "fuzz-quick: {:<12} {}; {runs} mutated runs in {secs:.1} s ({:.0}/s)",
        t.name,
        counts.join(", "),
        runs as f64 / secs.max(1e-9)
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(64);
        }
    };
    let mut failed = 0;
    if !args.replay.is_empty() {
        let t = args.targets[0];
        for f in &args.replay {
            let input = match std::fs::read(f) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("fuzz-quick: cannot read {}: {e}", f.display());
                    return ExitCode::from(66);
                }
            };
            match run_one(t, &input) {
                Ok(()) => println!("fuzz-quick: {} {}: passes", t.name, f.display()),
                Err(_) => {
                    println!("fuzz-quick: {} {}: PANICS", t.name, f.display());
                    failed += 1;
                }
            }
        }
    } else {
        println!(
            "fuzz-quick: seed {} ({} s per target; repeat with --seed)",
            args.seed, args.seconds
        );
        for t in &args.targets {
            if let Err(saved) = fuzz(t, args.seconds, args.seed) {
                println!(
                    "fuzz-quick: {}: an input panics, saved as {}; replay it with `fuzz-quick --replay {} {}` (seed {})",
                    t.name,
                    saved.display(),
                    t.name,
                    saved.display(),
                    args.seed
                );
                failed += 1;
            }
        }
    }
    fleet_fuzz::remove_scratch();
    let total = if args.replay.is_empty() {
        args.targets.len()
    } else {
        args.replay.len()
    };
    println!("fuzz-quick: {} passed, {failed} failed", total - failed);
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
