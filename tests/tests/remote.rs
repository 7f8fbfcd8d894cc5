//! The CLI from a second directory that holds only the fleet CA and the operator token (an
//! operator's laptop): `status`, `swarm`, `stop` and `run` through `FLEET_*` variables and
//! through a remote named by `fleet remote add`, against a controller with real Locust agents;
//! `--output json` for `passwd`, `swarm` and `stop`; `status` with the controller down; the
//! completion scripts.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use fleet_tests::{bin, locustfile, start_target, wait_for, Fleet, Options};

/// `fleet` run in `laptop` (no fleet.toml there, no `--dir`), with its own config directory
/// and only the given `FLEET_*` variables.
fn laptop_cli(laptop: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("fleet"));
    cmd.current_dir(laptop).args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("FLEET_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("XDG_CONFIG_HOME", laptop.join("config"))
        .env("HOME", laptop);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("fleet")
}

fn ok(out: &Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One line on stderr, exit 1.
fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success(), "succeeded: {}", text(out));
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "{err}");
    err
}

#[tokio::test(flavor = "multi_thread")]
async fn a_laptop_with_the_ca_and_the_token_steers_the_fleet() {
    let (target, mut target_proc) = start_target();
    let mut f = Fleet::new(Options::default());
    f.write_spec(&locustfile(&target, "Web", &[("a", "/a")]));
    f.start_serve();
    let sha = wait_for("first publication", Duration::from_secs(20), || async {
        f.current_sha().await
    })
    .await;
    ok(
        &f.cli(&["--output", "json", "scale", "--nodes", "2"]),
        "scale",
    );
    let nodes = f.wait_all_running(2, &sha, Duration::from_secs(60)).await;
    wait_for(
        "2 workers at the master",
        Duration::from_secs(30),
        || async { f.locust_stats().await.filter(|s| s["worker_count"] == 2) },
    )
    .await;
    let mut ids: Vec<String> = nodes.iter().map(|v| v.heartbeat.node_id.clone()).collect();
    ids.sort();

    // The laptop: a copy of the CA and of the operator token, nothing else.
    let laptop = tempfile::tempdir().unwrap();
    let lap = laptop.path();
    std::fs::copy(f.path().join("certs/ca.pem"), lap.join("ca.pem")).unwrap();
    std::fs::copy(
        f.path().join("secrets/operator.token"),
        lap.join("operator.token"),
    )
    .unwrap();

    // Nothing names a controller yet: one line that says how to name one.
    let err = one_line_error(&laptop_cli(lap, &[], &["status"]));
    assert!(err.contains("fleet remote add"), "{err}");

    // Through the environment.
    let env = [
        ("FLEET_CONTROLLER", f.url.as_str()),
        ("FLEET_CA", "ca.pem"),
        ("FLEET_TOKEN_FILE", "operator.token"),
        ("FLEET_OUTPUT", "json"),
    ];
    let rows = ok(&laptop_cli(lap, &env, &["status"]), "status via env");
    let mut seen: Vec<String> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    seen.sort();
    assert_eq!(seen, ids, "{rows}");
    for r in rows.as_array().unwrap() {
        assert_eq!(r["running"], sha.as_str(), "{r}");
        assert_eq!(r["kind"], "local", "{r}");
        assert_eq!(r["unknown"], false, "{r}");
    }

    let started = ok(
        &laptop_cli(lap, &env, &["swarm", "--users", "2", "--spawn-rate", "2"]),
        "swarm via env",
    );
    assert_eq!(started, serde_json::json!({"users": 2, "spawn_rate": 2.0}));
    let swarm = f.get_json("/api/master").await.unwrap()["swarm"].clone();
    assert_eq!(swarm["users"], 2, "the controller recorded the test");
    wait_for("Locust running", Duration::from_secs(20), || async {
        f.locust_stats().await.filter(|s| s["state"] == "running")
    })
    .await;
    let stopped = ok(&laptop_cli(lap, &env, &["stop"]), "stop via env");
    assert_eq!(stopped, serde_json::json!({"stopped": true}));
    assert!(f.get_json("/api/master").await.unwrap()["swarm"].is_null());

    // Through a remote: the CA and the token are copied into remotes.toml, so the laptop's
    // files can go.
    let added = laptop_cli(
        lap,
        &[],
        &[
            "remote",
            "add",
            "lab",
            &f.url,
            "--ca",
            "ca.pem",
            "--token-file",
            "operator.token",
        ],
    );
    ok(&added, "remote add");
    assert!(text(&added).contains("the default"), "{}", text(&added));
    let remotes = std::fs::read_to_string(lap.join("config/fleet/remotes.toml")).unwrap();
    assert!(remotes.contains(&f.secret("operator.token")));
    std::fs::remove_file(lap.join("ca.pem")).unwrap();
    std::fs::remove_file(lap.join("operator.token")).unwrap();
    let listed = ok(
        &laptop_cli(lap, &[], &["--output", "json", "remote", "list"]),
        "remote list",
    );
    assert_eq!(listed["default"], "lab");
    assert_eq!(listed["remotes"][0]["url"], f.url.as_str());
    assert!(!listed.to_string().contains(&f.secret("operator.token")));

    let status = laptop_cli(lap, &[], &["status"]);
    ok(&status, "status via the default remote");
    for id in &ids {
        assert!(text(&status).contains(id.as_str()), "{}", text(&status));
    }

    // `fleet run` from the laptop: its reports are written there.
    let run = laptop_cli(
        lap,
        &[],
        &[
            "--remote",
            "lab",
            "--output",
            "json",
            "run",
            "--users",
            "2",
            "--spawn-rate",
            "2",
            "--duration",
            "4s",
        ],
    );
    let summary = ok(&run, "run via the remote");
    assert_eq!(summary["workers"], 2, "{summary}");
    assert_eq!(summary["spec_sha256"], sha.as_str());
    let results: Vec<_> = std::fs::read_dir(lap.join("results"))
        .expect("results/ in the laptop's directory")
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(results.len(), 1, "{results:?}");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(results[0].join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(written, summary);
    assert!(results[0].join("report.html").exists());
    // Its numbers are the controller's merged view (`GET /api/stats`, which Locust's own
    // `/stats/requests` is not: it has no `masters`).
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(results[0].join("stats.json")).unwrap())
            .unwrap();
    assert_eq!(
        (&stats["masters"], &summary["masters"]),
        (&1.into(), &1.into())
    );
    assert!(f.get_json("/api/master").await.unwrap()["swarm"].is_null());

    // The spec from the laptop: pull, edit, push (the agents run it), log, diff, rollback.
    let work = lap.join("spec");
    let pulled = ok(
        &laptop_cli(lap, &[], &["--output", "json", "spec", "pull", "spec"]),
        "spec pull via the remote",
    );
    assert_eq!(pulled["sha256"], sha.as_str(), "{pulled}");
    let edited = locustfile(&target, "Web", &[("b", "/from-laptop")]);
    std::fs::write(work.join("locustfile.py"), &edited).unwrap();
    let pushed = ok(
        &laptop_cli(lap, &[], &["--output", "json", "spec", "push", "spec"]),
        "spec push via the remote",
    );
    let new_sha = pushed["published"]["sha256"].as_str().unwrap().to_string();
    let new_seq = pushed["published"]["sequence"].as_u64().unwrap();
    assert_ne!(new_sha, sha);
    f.wait_all_running(2, &new_sha, Duration::from_secs(60))
        .await;
    assert_eq!(std::fs::read_to_string(f.spec_file()).unwrap(), edited);
    let log = ok(
        &laptop_cli(lap, &[], &["--output", "json", "spec", "log"]),
        "spec log via the remote",
    );
    assert_eq!(log["current"]["sha256"], new_sha.as_str(), "{log}");
    let old_seq = new_seq - 1;
    let diff = laptop_cli(
        lap,
        &[],
        &["spec", "diff", &old_seq.to_string(), &new_seq.to_string()],
    );
    ok(&diff, "spec diff via the remote");
    assert!(
        text(&diff).contains("+") && text(&diff).contains("/from-laptop"),
        "{}",
        text(&diff)
    );
    let back = ok(
        &laptop_cli(
            lap,
            &[],
            &["--output", "json", "spec", "rollback", &old_seq.to_string()],
        ),
        "spec rollback via the remote",
    );
    assert_eq!(back["published"]["sha256"], sha.as_str(), "{back}");
    assert!(back["published"]["sequence"].as_u64().unwrap() > new_seq);
    f.wait_all_running(2, &sha, Duration::from_secs(60)).await;

    // The environment beats the remote, and a refused token names where it came from.
    let err = one_line_error(&laptop_cli(
        lap,
        &[("FLEET_TOKEN", "wrong")],
        &["swarm", "--users", "1"],
    ));
    assert!(
        err.contains("HTTP 401") && err.ends_with("check FLEET_TOKEN"),
        "{err}"
    );
    // What needs the fleet directory says where to run it.
    let err = one_line_error(&laptop_cli(lap, &[], &["status", "--backend", "local"]));
    assert!(err.contains("run it on the controller host"), "{err}");
    let err = one_line_error(&laptop_cli(
        lap,
        &[],
        &["--remote", "lab", "scale", "--nodes", "1"],
    ));
    assert!(err.contains("works only in the fleet directory"), "{err}");

    // `passwd` as JSON, in the fleet directory.
    let pw = ok(&f.cli(&["--output", "json", "passwd"]), "passwd");
    assert_eq!(pw["user"], "fleet", "{pw}");
    assert!(pw["password"].as_str().unwrap().len() >= 12, "{pw}");

    // The completion scripts.
    let bash = laptop_cli(lap, &[], &["completions", "bash"]);
    ok(&bash, "completions bash");
    let script = lap.join("fleet.bash");
    std::fs::write(&script, &bash.stdout).unwrap();
    let check = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(text(&bash).contains("complete -F"), "not a bash completion");
    for shell in ["zsh", "fish"] {
        let out = laptop_cli(lap, &[], &["completions", shell]);
        ok(&out, shell);
        assert!(text(&out).contains("remote"), "{shell}");
    }

    // The controller down: the host's status still lists the backend's nodes, as unknown; the
    // laptop, which has no backend, says the controller is unreachable.
    f.stop_serve();
    let down = f.cli(&["--output", "json", "status"]);
    let rows = ok(&down, "status with the controller down");
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows
        .iter()
        .all(|r| r["unknown"] == true && r["status"].is_null()));
    let down = f.cli(&["status"]);
    assert!(text(&down).contains("is unreachable"), "{}", text(&down));
    assert_eq!(
        text(&down).matches(" unknown ").count(),
        2,
        "{}",
        text(&down)
    );
    let err = one_line_error(&laptop_cli(lap, &[], &["status"]));
    assert!(err.contains("unreachable"), "{err}");

    let _ = target_proc.kill();
    let _ = target_proc.wait();
}
