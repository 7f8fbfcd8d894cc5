//! The spec author's reach (docs/security.md): a spec that tries, at import time, to read the
//! fleet's secrets and the controller's environment finds neither, in the validation gate and
//! the managed master (run by a `fleet serve` whose environment holds AWS credentials) and in a
//! worker (run by an agent whose token was given by env). The spec prints what it found into
//! the master's log and the agent's log, and appends it to a report file in `/dev/shm` (the gate
//! keeps Locust's output to itself when a spec passes), which the test reads.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fleet_tests::{bin, wait_for, Fleet, Options};

const AWS: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "AKIAREACHTEST"),
    ("AWS_SECRET_ACCESS_KEY", "reach-test-secret"),
    ("FLEET_REACH_PROBE", "set-by-the-test"),
];

/// A locustfile that prints, per process, what it could read and which variables it saw, and
/// appends the same line to `report` (without creating it: a confined process may write there
/// only because the test made it writable by all).
fn probe(secrets: &[&Path], serve_pid: u32, report: &Path) -> String {
    let paths: Vec<String> = secrets
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect();
    format!(
        r#"import json, os, sys
from locust import User, task, constant

role = "master" if "--master" in sys.argv else "gate" if "--list" in sys.argv else "worker"
found = {{}}
for p in [{paths}, "/proc/{serve_pid}/environ"]:
    try:
        with open(p, "rb") as f:
            found[p] = "READ %d bytes" % len(f.read())
    except OSError as e:
        found[p] = type(e).__name__
env = {{k: v for k, v in os.environ.items() if k.startswith(("AWS_", "FLEET_"))}}
report = {{"role": role, "uid": os.getuid(), "files": found, "env": env,
          "home": os.environ.get("HOME", ""), "cwd": os.getcwd()}}
print("FLEET-REACH " + json.dumps(report), flush=True)
try:
    fd = os.open({report:?}, os.O_WRONLY | os.O_APPEND)
    os.write(fd, (json.dumps(report) + "\n").encode())
    os.close(fd)
except OSError:
    pass

class Probe(User):
    wait_time = constant(1)
    @task
    def idle(self):
        pass
"#,
        paths = paths.join(", "),
        report = report.display().to_string(),
    )
}

/// The reports of `role` appended to `file`.
fn filed(file: &Path, role: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|j| serde_json::from_str::<serde_json::Value>(j).unwrap())
        .filter(|r| r["role"] == role)
        .collect()
}

/// A file anyone may append to, in `/dev/shm` (which the confined gate and master may write),
/// removed when dropped.
struct ReportFile(std::path::PathBuf);

impl ReportFile {
    fn new() -> ReportFile {
        use std::os::unix::fs::PermissionsExt;
        let p = Path::new("/dev/shm").join(format!("fleet-reach-{}.jsonl", std::process::id()));
        std::fs::write(&p, "").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        ReportFile(p)
    }
}

impl Drop for ReportFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The reports of `role` printed into the logs under `dir`.
fn reports(dir: &Path, role: &str) -> Vec<serde_json::Value> {
    let mut logs = vec![dir.join("state/master.log")];
    if let Ok(rd) = std::fs::read_dir(dir.join("local")) {
        logs.extend(rd.flatten().map(|e| e.path().join("agent.log")));
    }
    logs.iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| l.split_once("FLEET-REACH ").map(|(_, j)| j.to_string()))
                .collect::<Vec<_>>()
        })
        .map(|j| serde_json::from_str::<serde_json::Value>(&j).unwrap())
        .filter(|r| r["role"] == role)
        .collect()
}

fn assert_read_nothing(r: &serde_json::Value) {
    for (path, what) in r["files"].as_object().unwrap() {
        assert!(
            !what.as_str().unwrap().starts_with("READ"),
            "the {} read {path}: {r}",
            r["role"]
        );
    }
}

fn assert_saw_no_variable(r: &serde_json::Value, allowed_fleet_vars: &[&str]) {
    let env: BTreeMap<String, String> = serde_json::from_value(r["env"].clone()).unwrap();
    let leaked: Vec<&String> = env
        .keys()
        .filter(|k| !allowed_fleet_vars.contains(&k.as_str()))
        .collect();
    assert!(leaked.is_empty(), "the {} saw {leaked:?}: {r}", r["role"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_finds_neither_the_fleets_secrets_nor_the_controllers_environment() {
    let mut f = Fleet::new(Options::default());
    let secrets = [
        f.path().join("secrets/signing.pk8"),
        f.path().join("secrets/agent.token"),
        f.path().join("secrets/operator.token"),
        f.path().join("secrets/ui.hash"),
        f.path().join("certs/ca.key"),
        f.path().join("certs/server.key"),
    ];
    // A harmless spec first, so `fleet serve` runs and its pid is known to the probe; the
    // probe's user class has another name, so the master restarts on it.
    f.write_spec("from locust import User, task\n\nclass Idle(User):\n    @task\n    def idle(self):\n        pass\n");
    f.start_serve_with_env(&AWS);
    let serve_pid = f.serve_pid().unwrap();
    let refs: Vec<&Path> = secrets.iter().map(|p| p.as_path()).collect();
    let file = ReportFile::new();
    f.write_spec(&probe(&refs, serve_pid, &file.0));

    // The validation gate loads the spec before anything publishes it: inside the same
    // boundary as the master, in a workspace outside the fleet directory.
    let gate = wait_for("the gate's report", Duration::from_secs(30), || async {
        filed(&file.0, "gate").pop()
    })
    .await;
    assert_read_nothing(&gate);
    assert_saw_no_variable(&gate, &[]);
    let controller_home = std::env::var("HOME").unwrap();
    let home = gate["home"].as_str().unwrap();
    assert!(
        !home.is_empty() && !home.starts_with(&controller_home),
        "the gate's HOME is the controller's: {gate}"
    );
    let fleet_dir = std::fs::canonicalize(f.path()).unwrap();
    assert!(
        !Path::new(gate["cwd"].as_str().unwrap()).starts_with(&fleet_dir),
        "the gate loads the spec inside the fleet directory: {gate}"
    );
    // `/api/spec` says so.
    let described = f.spec().await.unwrap().gate;
    if nix::unistd::geteuid().is_root() {
        assert_eq!(
            gate["uid"], 65534,
            "as root, the gate runs as nobody: {gate}"
        );
        assert!(described.contains(", as nobody"), "{described}");
    } else {
        assert!(described.ends_with(", under Landlock)"), "{described}");
    }

    let master = wait_for("the master's report", Duration::from_secs(30), || async {
        reports(f.path(), "master").pop()
    })
    .await;
    assert_read_nothing(&master);
    assert_saw_no_variable(&master, &[]);
    let home = master["home"].as_str().unwrap();
    assert!(
        !home.is_empty() && !home.starts_with(&controller_home),
        "the master's HOME is the controller's: {master}"
    );
    if nix::unistd::geteuid().is_root() {
        assert_eq!(
            master["uid"], 65534,
            "as root, the master runs as nobody: {master}"
        );
    }

    // An agent whose token comes from its environment, as do AWS variables.
    let token = f.secret("agent.token");
    let scale = Command::new(bin("fleet"))
        .arg("--dir")
        .arg(f.path())
        .args(["scale", "--nodes", "1"])
        .env("FLEET_AGENT_TOKEN", &token)
        .envs(AWS)
        .output()
        .unwrap();
    assert!(
        scale.status.success(),
        "scale: {}",
        String::from_utf8_lossy(&scale.stderr)
    );
    let worker = wait_for("a worker's report", Duration::from_secs(60), || async {
        reports(f.path(), "worker").pop()
    })
    .await;
    // The variables the agent sets for its workers on purpose (docs/protocol.md).
    let set_by_agent = ["FLEET_NODE_ID", "FLEET_BUNDLE_SHA256", "FLEET_WORKER_INDEX"];
    assert_saw_no_variable(&worker, &set_by_agent);
    // A local agent's workers run as the controller's user on the controller's host, so its
    // files are theirs to read: the local backend is for development (docs/security.md). On a
    // node the fleet directory is not there.
    assert!(
        worker["env"].get("FLEET_WORKER_INDEX").is_some(),
        "the worker has the agent's own variables: {worker}"
    );
}
