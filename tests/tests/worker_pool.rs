//! The simulated worker pool (tests/support/worker_pool.py) speaks Locust's worker protocol
//! as real workers do: tests/support/pool_validation.py runs a master with real `locust
//! --worker` processes next to a master with as many simulated workers, and compares what the
//! two masters receive and send (message types, rates per worker, sizes, one-off counts).
//! The bench's master-capacity numbers rest on this (docs/benchmarks.md).

use std::process::Command;

use fleet_tests::{locust, workspace_root};

fn validate(endpoints: &str) {
    let locust = locust();
    let python = locust.with_file_name("python");
    let out = Command::new(&python)
        .arg("pool_validation.py")
        .args([
            "--locust",
            locust.to_str().unwrap(),
            "--endpoints",
            endpoints,
        ])
        .current_dir(workspace_root().join("tests/support"))
        .output()
        .expect("python");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pool_validation.py --endpoints {endpoints}:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("pool_validation: ok"), "{report}");
}

#[test]
fn simulated_workers_match_real_ones_with_one_endpoint() {
    validate("1");
}

#[test]
fn simulated_workers_match_real_ones_with_fifty_endpoints() {
    validate("50");
}
