//! `GET /api/fanout`: the controller counts, per publication, the manifest and bundle answers
//! it served and when the last went out, with real agents (stub workers) on loopback.

use std::time::Duration;

use fleet_tests::{wait_for, Fleet, Options};

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn fanout_counts_each_agents_manifest_and_bundle_for_an_edit() {
    let mut f = Fleet::new(Options {
        managed_master: false,
        worker_command: Some(vec!["sleep".into(), "3600".into()]),
        agent_settings: vec![("join_grace_ms".into(), 100.into())],
        ..Options::default()
    });
    f.start_serve();
    let sha1 = wait_for("first publication", T, || async { f.current_sha().await }).await;
    let out = f.cli(&["scale", "--nodes", "3"]);
    assert!(
        out.status.success(),
        "scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    f.wait_all_running(3, &sha1, T).await;

    let base = std::fs::read_to_string(f.spec_file()).unwrap();
    f.write_spec(&format!("{base}\n# fan-out\n"));
    let sha2 = f.wait_new_sha(&sha1, T).await;
    f.wait_all_running(3, &sha2, T).await;

    let log = f.get_json("/api/fanout").await.expect("GET /api/fanout");
    let log = log.as_array().expect("an array");
    assert_eq!(log.len(), 2, "both publications of this run: {log:?}");
    let (new, old) = (&log[0], &log[1]);
    assert_eq!(new["sequence"], 2, "newest first: {log:?}");
    assert_eq!(new["sha256"], sha2.as_str());
    assert_eq!(old["sha256"], sha1.as_str());
    for (what, r) in [("first", old), ("edit", new)] {
        assert_eq!(r["manifests"], 3, "{what}: one manifest per agent: {r}");
        assert_eq!(r["bundles"], 3, "{what}: one bundle per agent: {r}");
        let m = r["last_manifest_ms"].as_f64().expect("last_manifest_ms");
        let b = r["last_bundle_ms"].as_f64().expect("last_bundle_ms");
        assert!(m >= 0.0 && b >= m, "{what}: bundle after manifest: {r}");
    }
    let edit_ms = new["last_bundle_ms"].as_f64().unwrap();
    assert!(edit_ms < 10_000.0, "the edit fanned out in {edit_ms} ms");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64;
    let published = new["published_unix_ms"].as_f64().unwrap();
    assert!(published > now_ms - 60_000.0 && published <= now_ms);

    // The log is an operator's view: the agent token does not open it.
    let r = f
        .agent()
        .get("/api/fanout", Duration::from_secs(10), 1 << 20)
        .await
        .unwrap();
    assert_eq!(r.status, 401);
}
