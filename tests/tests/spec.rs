//! Editing the spec through the controller, end to end with the real `fleet` CLI and the real
//! Locust behind the validation gate:
//! - `fleet spec pull`, `push`, `log`, `diff`, `rollback` round trip from a second directory,
//!   the controller's spec directory following every change, an edit on disk showing up as a
//!   version, and a push based on a version someone published over refused;
//! - the gate refuses an import error, a syntax error, a spec with no User class and one that
//!   hangs at import, through the CLI, the watcher and the editor's `PUT`, each with its
//!   reason, while a running agent keeps its bundle; `--no-validate` skips it.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use fleet_tests::{locustfile, wait_for, Fleet, Options};

const TARGET: &str = "http://127.0.0.1:9";

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok_json(f: &Fleet, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let o = f.cli(&all);
    assert!(o.status.success(), "fleet {args:?}: {}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)))
}

/// `fleet spec ARGS` that must fail; its stderr.
fn refused(f: &Fleet, args: &[&str]) -> String {
    let o = f.cli(args);
    assert!(
        !o.status.success(),
        "fleet {args:?} succeeded: {}",
        text(&o)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

async fn start(f: &mut Fleet) -> String {
    f.write_spec(&locustfile(TARGET, "Web", &[("alpha", "/alpha")]));
    f.start_serve();
    wait_for("first publication", Duration::from_secs(30), || async {
        f.current_sha().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn push_log_diff_rollback_and_pull_round_trip_and_a_stale_push_is_refused() {
    let mut f = Fleet::new(Options::default());
    let sha1 = start(&mut f).await;
    let laptop = tempfile::tempdir().unwrap();
    let work = laptop.path().join("spec");
    let w = work.to_str().unwrap();

    let pulled = ok_json(&f, &["spec", "pull", w]);
    assert_eq!(pulled["sequence"], 1, "{pulled}");
    assert_eq!(read(&work.join("locustfile.py")), read(&f.spec_file()));

    // Push a changed task path and a new module.
    std::fs::write(
        work.join("locustfile.py"),
        locustfile(TARGET, "Web", &[("alpha", "/beta")]),
    )
    .unwrap();
    std::fs::create_dir_all(work.join("lib")).unwrap();
    std::fs::write(work.join("lib/helper.py"), "X = 1\n").unwrap();
    let pushed = ok_json(&f, &["spec", "push", w]);
    assert_eq!(pushed["changed"], true, "{pushed}");
    assert_eq!(pushed["published"]["sequence"], 2, "{pushed}");
    assert_eq!(pushed["published"]["origin"], "push");
    // The controller's spec directory is the source of truth: the push wrote it.
    assert!(read(&f.spec_file()).contains("/beta"));
    assert_eq!(read(&f.path().join("spec/lib/helper.py")), "X = 1\n");

    let log = ok_json(&f, &["spec", "log"]);
    let origins: Vec<(u64, &str)> = log["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["sequence"].as_u64().unwrap(),
                v["origin"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(origins, vec![(2, "push"), (1, "directory")], "{log}");
    let log_text = String::from_utf8_lossy(&f.cli(&["spec", "log"]).stdout).into_owned();
    assert!(log_text.contains("*      2"), "{log_text}");

    let diff = ok_json(&f, &["spec", "diff", "1", "2"]);
    let files: Vec<(&str, &str)> = diff["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["path"].as_str().unwrap(), d["change"].as_str().unwrap()))
        .collect();
    assert_eq!(
        files,
        vec![("lib/helper.py", "added"), ("locustfile.py", "modified")],
        "{diff}"
    );
    let lf = diff["files"][1]["diff"].as_str().unwrap();
    assert!(
        lf.contains("-        self.client.get(\"/alpha\")\n")
            && lf.contains("+        self.client.get(\"/beta\")\n"),
        "{lf}"
    );

    // An edit on the controller's disk shows up as a version of its own...
    let sha2 = pushed["published"]["sha256"].as_str().unwrap().to_string();
    f.write_spec(&locustfile(TARGET, "Web", &[("alpha", "/gamma")]));
    f.wait_new_sha(&sha2, Duration::from_secs(20)).await;
    let view = f.spec().await.unwrap();
    assert_eq!(view.current.as_ref().unwrap().origin, "directory");
    assert_eq!(view.current.as_ref().unwrap().sequence, 3);

    // ...so a push still based on 2 is refused, and changes nothing.
    std::fs::write(work.join("lib/helper.py"), "X = 2\n").unwrap();
    let err = refused(&f, &["spec", "push", w]);
    assert!(
        err.contains("the spec changed since version 2 (version 3: directory)"),
        "{err}"
    );
    assert!(read(&f.spec_file()).contains("/gamma"));
    assert_eq!(f.spec().await.unwrap().current.unwrap().sequence, 3);

    // Roll back to 1: its content again, as a new sequence.
    let rolled = ok_json(&f, &["spec", "rollback", "1"]);
    assert_eq!(rolled["published"]["sequence"], 4, "{rolled}");
    assert_eq!(rolled["published"]["sha256"], sha1.as_str());
    assert_eq!(rolled["published"]["origin"], "rollback to 1");
    assert!(read(&f.spec_file()).contains("/alpha"));
    assert!(
        !f.path().join("spec/lib").exists(),
        "rollback removes files 1 did not have"
    );

    // Pull brings the laptop's copy to 4, removing what 4 does not have.
    let pulled = ok_json(&f, &["spec", "pull", w]);
    assert_eq!(pulled["sequence"], 4);
    assert!(!work.join("lib/helper.py").exists());
    assert_eq!(read(&work.join("locustfile.py")), read(&f.spec_file()));

    // The editor's routes: one file saved with its base, read back at its version.
    let op = f.operator();
    let body = locustfile(TARGET, "Web", &[("alpha", "/delta")]).into_bytes();
    let r = op
        .request(
            hyper::Method::PUT,
            "/api/spec/file?path=locustfile.py&base=4",
            Some(("text/plain", body.clone())),
            Duration::from_secs(60),
            1 << 20,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let saved: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(saved["published"]["origin"], "edit locustfile.py");
    let r = op
        .get(
            "/api/spec/file?path=locustfile.py&version=5",
            Duration::from_secs(10),
            1 << 20,
        )
        .await
        .unwrap();
    assert_eq!(r.body.as_ref(), body.as_slice());
    assert_eq!(r.header("x-fleet-sequence"), Some("5"));
    // A save based on 3 is refused: the content changed since.
    let r = op
        .request(
            hyper::Method::PUT,
            "/api/spec/file?path=locustfile.py&base=3",
            Some(("text/plain", body)),
            Duration::from_secs(60),
            1 << 20,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 409, "based on 3, content changed since");
    let tree = f.get_json("/api/spec/files?version=5").await.unwrap();
    assert_eq!(tree["files"][0]["path"], "locustfile.py", "{tree}");
}

/// One broken spec: how it is written, and what the refusal must say.
struct Broken {
    name: &'static str,
    source: String,
    says: &'static str,
}

fn broken() -> Vec<Broken> {
    let good = locustfile(TARGET, "Web", &[("alpha", "/alpha")]);
    vec![
        Broken {
            name: "import error",
            source: format!("import no_such_module_here\n{good}"),
            says: "ModuleNotFoundError: No module named 'no_such_module_here' (at locustfile.py:1)",
        },
        Broken {
            name: "syntax error",
            source: format!("{good}\ndef broken(:\n    pass\n"),
            says: "SyntaxError",
        },
        Broken {
            name: "no User class",
            source: "from locust import task\n\n\nclass Web:\n    pass\n".into(),
            says: "the spec defines no User class",
        },
        Broken {
            name: "hang at import",
            source: format!("import time\ntime.sleep(3600)\n{good}"),
            says: "did not finish within 4 s",
        },
    ]
}

/// Nothing new is published and the agent still runs `sha1`.
async fn still_current(f: &Fleet, sha1: &str) {
    let view = f.spec().await.unwrap();
    let cur = view.current.as_ref().unwrap();
    assert_eq!(
        (cur.sequence, cur.sha256.as_str()),
        (1, sha1),
        "published: {view:?}"
    );
    let nodes = f.nodes().await;
    assert_eq!(
        nodes[0].heartbeat.running.as_ref().unwrap().sha256,
        sha1,
        "the agent moved"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gate_refuses_broken_specs_with_their_reason_and_a_running_agent_keeps_its_bundle() {
    let mut f = Fleet::new(Options {
        worker_command: Some(vec!["sh".into(), "-c".into(), "exec sleep 3600".into()]),
        spec_settings: vec![("validate_timeout_s".into(), 4.into())],
        ..Options::default()
    });
    let sha1 = start(&mut f).await;
    let o = f.cli(&["scale", "--nodes", "1"]);
    assert!(o.status.success(), "scale: {}", text(&o));
    f.wait_all_running(1, &sha1, Duration::from_secs(30)).await;
    let laptop = tempfile::tempdir().unwrap();
    let work = laptop.path().join("spec");
    let w = work.to_str().unwrap();
    ok_json(&f, &["spec", "pull", w]);
    let good = read(&f.spec_file());

    for (i, b) in broken().into_iter().enumerate() {
        match i % 3 {
            // Through the CLI: the reason, Locust's last lines, a non-zero exit.
            0 => {
                std::fs::write(work.join("locustfile.py"), &b.source).unwrap();
                let err = refused(&f, &["spec", "push", w]);
                assert!(err.contains(b.says), "{}: {err}", b.name);
                assert_eq!(
                    read(&f.spec_file()),
                    good,
                    "{}: the directory was written",
                    b.name
                );
            }
            // An edit on the controller's disk: the reason in /api/spec.
            1 => {
                f.write_spec(&b.source);
                let view = wait_for(b.name, Duration::from_secs(20), || async {
                    f.spec().await.filter(|v| {
                        v.refused
                            .as_ref()
                            .is_some_and(|r| r.reason.contains(b.says))
                    })
                })
                .await;
                let r = view.refused.unwrap();
                assert!(r.reason.contains(b.says), "{}: {r:?}", b.name);
                assert_eq!(r.origin, "directory");
                assert!(!r.output.is_empty(), "{}: no traceback lines", b.name);
                assert!(
                    view.last_error.unwrap().contains(b.says),
                    "{}: last_error",
                    b.name
                );
                f.write_spec(&good);
                wait_for("the refusal cleared", Duration::from_secs(20), || async {
                    f.spec().await.filter(|v| v.refused.is_none())
                })
                .await;
            }
            // The editor's save: 422 with the refusal.
            _ => {
                let r = f
                    .operator()
                    .request(
                        hyper::Method::PUT,
                        "/api/spec/file?path=locustfile.py&base=1",
                        Some(("text/plain", b.source.clone().into_bytes())),
                        Duration::from_secs(60),
                        1 << 20,
                    )
                    .await
                    .unwrap();
                assert_eq!(
                    r.status,
                    422,
                    "{}: {}",
                    b.name,
                    String::from_utf8_lossy(&r.body)
                );
                let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                assert!(
                    v["refused"]["reason"].as_str().unwrap().contains(b.says),
                    "{}: {v}",
                    b.name
                );
                assert_eq!(
                    read(&f.spec_file()),
                    good,
                    "{}: the directory was written",
                    b.name
                );
            }
        }
        still_current(&f, &sha1).await;
    }
    assert!(
        f.serve_log().contains("the validation gate refused it"),
        "the controller log names the refusals"
    );

    // A spec that needs what only the nodes have: pushed past the gate on request.
    std::fs::write(work.join("locustfile.py"), &broken()[0].source).unwrap();
    let pushed = ok_json(&f, &["spec", "push", w, "--no-validate"]);
    assert_eq!(pushed["published"]["sequence"], 2, "{pushed}");
    let sha2 = pushed["published"]["sha256"].as_str().unwrap().to_string();
    f.wait_all_running(1, &sha2, Duration::from_secs(30)).await;
}
