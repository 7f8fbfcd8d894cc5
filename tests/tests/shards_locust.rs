//! Sharded masters with real Locust (`master.shards = 2`, 4 local agents of 1 worker each,
//! against the sample target): every agent's worker joins the shard rendezvous hashing gives
//! its node id; a test started over both shards is split in proportion to their workers; an
//! edit that renames a task's URL path reaches both shards' workers without restarting a
//! master while the test keeps running (its merged view never stopped nor empty, every 200 ms)
//! and back at its user count; a user-class change restarts every master and the test resumes split over both;
//! and `fleet run` writes the merged reports (`stats.json`, `stats.csv`, `failures.csv` and
//! fleet's own `report.html`). The same over many simulated workers is tests/tests/shards.rs.
//!
//! Every worker also requests `/node/<its node id>` and fails on `/fail/<its node id>`, so
//! each shard's own stats say which nodes' workers it has, and the merged reports say that
//! both shards' numbers are in them.

use std::time::Duration;

use fleet_common::shard;
use fleet_tests::{procfs, start_target, wait_for, wait_for_why, Fleet, Options};

const SHARDS: u16 = 2;
const NODES: usize = 4;
const USERS: u64 = 8;
const T: Duration = Duration::from_secs(10);

/// The spec: user class `class`, one task on `path`, one on this node's own path and one
/// failing under this node's own name.
fn spec(target: &str, class: &str, path: &str) -> String {
    format!(
        r#"import os

from locust import FastHttpUser, constant, task

NODE = os.environ.get("FLEET_NODE_ID", "none")


class {class}(FastHttpUser):
    host = "{target}"
    wait_time = constant(0.2)

    @task
    def path(self):
        self.client.get("{path}")

    @task
    def node(self):
        self.client.get("/node/" + NODE)

    @task
    def bad(self):
        self.client.get("/status/500", name="/fail/" + NODE)
"#
    )
}

fn requests_to(stats: &serde_json::Value, name: &str) -> u64 {
    stats["stats"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .and_then(|s| s["num_requests"].as_u64())
        .unwrap_or(0)
}

/// The endpoint names of `/node/<id>` rows with requests, sorted.
fn nodes_seen(stats: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = stats["stats"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["num_requests"].as_u64() > Some(0))
        .filter_map(|s| {
            s["name"]
                .as_str()?
                .strip_prefix("/node/")
                .map(str::to_string)
        })
        .collect();
    v.sort();
    v
}

/// Every shard's own stats once each runs its share of the test with its workers, requests to
/// `path` and to its own nodes' paths only (a fresh master's numbers); else what differs.
async fn shards_running(
    f: &Fleet,
    on: &[Vec<String>],
    shares: &[u64],
    path: &str,
) -> Result<Vec<serde_json::Value>, String> {
    let mut out = vec![];
    for k in 0..SHARDS as usize {
        let s = f
            .shard_stats(k)
            .await
            .ok_or(format!("shard {k} does not answer"))?;
        let seen = (
            s["state"].as_str().unwrap_or("?"),
            s["user_count"].as_u64(),
            s["worker_count"].as_u64(),
            nodes_seen(&s),
        );
        let want = (
            "running",
            Some(shares[k]),
            Some(on[k].len() as u64),
            on[k].clone(),
        );
        if seen != want || requests_to(&s, path) == 0 {
            return Err(format!(
                "shard {k}: (state, users, workers, nodes) {seen:?}, want {want:?}; {} requests to {path}",
                requests_to(&s, path)
            ));
        }
        out.push(s);
    }
    Ok(out)
}

/// Each node's shard by rendezvous hashing on its id, once every node runs the current
/// publication with its worker against that shard's ZMQ port on the shard's epoch in
/// `epochs`; else the first node that does not.
async fn placed(f: &Fleet, zmq: u16, epochs: &[u64]) -> Result<Vec<Vec<String>>, String> {
    let current = f
        .spec()
        .await
        .and_then(|s| s.current)
        .ok_or("no publication")?;
    let nodes = f.nodes().await;
    if nodes.len() != NODES {
        return Err(format!("{} nodes", nodes.len()));
    }
    let mut on = vec![vec![]; SHARDS as usize];
    for n in &nodes {
        let hb = &n.heartbeat;
        let k = shard::pick(&hb.node_id, SHARDS as usize);
        let port = format!("--master-port {}", zmq + k as u16);
        let ok = hb
            .running
            .as_ref()
            .is_some_and(|r| (r.sequence, r.master_epoch) == (current.sequence, epochs[k]))
            && matches!(hb.workers.as_slice(), [w] if w.state == fleet_common::wire::WorkerState::Running
            && w.pid.is_some_and(|p| procfs::cmdline(p).ends_with(&port)));
        if !ok {
            return Err(format!(
                "{} (shard {k}, sequence {}, epoch {}): running {:?}, workers {:?}",
                hb.node_id, current.sequence, epochs[k], hb.running, hb.workers
            ));
        }
        on[k].push(hb.node_id.clone());
    }
    on.iter_mut().for_each(|v| v.sort());
    Ok(on)
}

/// The merged view's (state, users), read every 200 ms until stopped.
struct Watch {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<(String, u64)>>,
}

impl Watch {
    fn start(f: &Fleet) -> Watch {
        let op = f.operator();
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut seen = vec![];
            while stopped.try_recv().is_err() {
                if let Ok(r) = op.get("/api/stats", T, 16 << 20).await {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.body) {
                        let st = v["state"].as_str().unwrap_or("?").to_string();
                        seen.push((st, v["user_count"].as_u64().unwrap_or(0)));
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            seen
        });
        Watch { stop, task }
    }

    async fn stop(self) -> Vec<(String, u64)> {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}

/// `got` if it is the assignment `want` (nodes never move between shards here).
fn unmoved(got: Vec<Vec<String>>, want: &[Vec<String>]) -> Result<Vec<Vec<String>>, String> {
    if got == want {
        Ok(got)
    } else {
        Err(format!("nodes moved: {got:?}, were {want:?}"))
    }
}

/// Each shard's (pid, epoch) from `/api/master`.
fn incarnations(m: &serde_json::Value) -> Vec<(u64, u64)> {
    m["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["pid"].as_u64().unwrap_or(0), s["epoch"].as_u64().unwrap()))
        .collect()
}

fn total(s: &serde_json::Value) -> Option<u64> {
    s["stats"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == "Aggregated")?["num_requests"]
        .as_u64()
}

/// A CSV's records, fields split on commas (no name here holds one).
fn records(csv: &str) -> Vec<Vec<String>> {
    csv.lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_shards_of_real_locust_workers_run_one_test_through_edits_and_fleet_run() {
    let (target, mut target_proc) = start_target();
    let mut f = Fleet::new(Options::default());
    f.write_spec(&spec(&target, "Web", "/a"));
    let zmq = f.use_shards(SHARDS);
    f.start_serve();
    let master = wait_for("two masters running", Duration::from_secs(60), || async {
        let m = f.get_json("/api/master").await?;
        let shards = m["shards"].as_array()?;
        (shards.len() == SHARDS as usize && shards.iter().all(|s| s["pid"].is_u64())).then_some(m)
    })
    .await;
    let epochs: Vec<u64> = incarnations(&master).iter().map(|i| i.1).collect();
    let m = wait_for("a manifest listing both masters", T, || async {
        let m = f.manifest().await?;
        (m["masters"].as_array()?.len() == SHARDS as usize).then_some(m)
    })
    .await;
    for k in 0..SHARDS {
        assert_eq!(m["masters"][k as usize]["port"], zmq + k, "{m}");
    }

    // 1. Four agents; each worker joins the shard its node id hashes to. The local backend
    //    names nodes local-0001 up, so the assignment is fixed; it is computed, not assumed.
    let out = f.cli(&["--output", "json", "scale", "--nodes", &NODES.to_string()]);
    assert!(
        out.status.success(),
        "scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let on = wait_for_why(
        "every node's worker on its shard's port and epoch",
        Duration::from_secs(60),
        || async { placed(&f, zmq, &epochs).await },
    )
    .await;
    assert!(
        on.iter().all(|v| !v.is_empty()),
        "both shards get nodes: {on:?}"
    );
    wait_for(
        "each shard to count its nodes' workers",
        Duration::from_secs(30),
        || async {
            for (k, nodes) in on.iter().enumerate() {
                (f.shard_stats(k).await?["worker_count"] == nodes.len()).then_some(())?;
            }
            Some(())
        },
    )
    .await;

    // 2. One test over both shards, split in proportion to their workers.
    let r = f
        .operator()
        .post_json(
            "/api/swarm",
            serde_json::to_vec(&serde_json::json!({"users": USERS, "spawn_rate": 8.0})).unwrap(),
            T,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let shares: Vec<u64> = on
        .iter()
        .map(|v| USERS * v.len() as u64 / NODES as u64)
        .collect();
    assert_eq!(shares.iter().sum::<u64>(), USERS);
    wait_for_why(
        "both shards running their share on /a",
        Duration::from_secs(30),
        || async { shards_running(&f, &on, &shares, "/a").await },
    )
    .await;
    let view = f.get_json("/api/master").await.unwrap();
    assert_eq!(view["swarm"]["users"], USERS, "{view}");
    let recorded: Vec<u64> = (0..SHARDS as usize)
        .map(|k| view["shards"][k]["swarm"]["users"].as_u64().unwrap())
        .collect();
    assert_eq!(recorded, shares, "{view}");

    // Rename the task's path: same user class, so no master restarts; every agent
    // hot-restarts its worker on the same shard and both shards request /renamed.
    let sha1 = f.current_sha().await.unwrap();
    let watch = Watch::start(&f);
    f.write_spec(&spec(&target, "Web", "/renamed"));
    f.wait_new_sha(&sha1, T).await;
    wait_for_why(
        "every node's worker on the new spec, same shard",
        Duration::from_secs(40),
        || async { placed(&f, zmq, &epochs).await.and_then(|o| unmoved(o, &on)) },
    )
    .await;
    wait_for_why(
        "both shards requesting /renamed at their share",
        Duration::from_secs(40),
        || async { shards_running(&f, &on, &shares, "/renamed").await },
    )
    .await;
    wait_for(
        "the merged view of /renamed at 8 users",
        Duration::from_secs(15),
        || async {
            let v = f.get_json("/api/stats").await?;
            (v["masters"] == SHARDS
                && v["state"] == "running"
                && v["user_count"] == USERS
                && v["worker_count"] == NODES
                && nodes_seen(&v).len() == NODES
                && requests_to(&v, "/renamed") > 0)
                .then_some(())
        },
    )
    .await;
    let seen = watch.stop().await;
    assert!(seen.len() >= 10, "{} views of the test seen", seen.len());
    assert!(
        seen.iter()
            .all(|(st, users)| (st == "running" || st == "spawning") && *users > 0),
        "the test kept running through the hot restart: {seen:?}"
    );
    let same = f.get_json("/api/master").await.unwrap();
    assert_eq!(
        incarnations(&same),
        incarnations(&master),
        "a renamed path restarts no master: {same}"
    );

    // 3. A new user class: every shard's master restarts (new pid, new epoch), every agent's
    //    worker follows its shard's new epoch, and the test resumes split over both.
    let sha2 = f.current_sha().await.unwrap();
    f.write_spec(&spec(&target, "Api", "/renamed"));
    f.wait_new_sha(&sha2, T).await;
    let restarted = wait_for(
        "every master restarted for the new class",
        Duration::from_secs(60),
        || async {
            let m = f.get_json("/api/master").await?;
            let now = incarnations(&m);
            let all = now
                .iter()
                .zip(incarnations(&master))
                .all(|(n, o)| n.0 != 0 && n.0 != o.0 && n.1 > o.1);
            (all && m["user_classes"] == serde_json::json!(["Api"])).then_some(m)
        },
    )
    .await;
    let epochs: Vec<u64> = incarnations(&restarted).iter().map(|i| i.1).collect();
    wait_for_why(
        "every node's worker on its shard's new epoch",
        Duration::from_secs(60),
        || async { placed(&f, zmq, &epochs).await.and_then(|o| unmoved(o, &on)) },
    )
    .await;
    wait_for_why(
        "the test resumed on both new masters at their share",
        Duration::from_secs(60),
        || async { shards_running(&f, &on, &shares, "/renamed").await },
    )
    .await;
    let v = f.get_json("/api/stats").await.unwrap();
    assert_eq!(
        (&v["state"], &v["user_count"], &v["worker_count"]),
        (&"running".into(), &USERS.into(), &NODES.into()),
        "the merged view after the restart"
    );
    let m = f.get_json("/api/master").await.unwrap();
    assert_eq!(incarnations(&m), incarnations(&restarted), "restarted once");
    assert_eq!(m["swarm"]["users"], USERS, "{m}");

    // 4. `fleet run` over both shards writes the merged reports.
    let out = f.cli(&["stop"]);
    assert!(
        out.status.success(),
        "stop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let out = f.cli(&[
        "--output",
        "json",
        "run",
        "--users",
        &USERS.to_string(),
        "--spawn-rate",
        "8",
        "--duration",
        "6s",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
    let stats: serde_json::Value = serde_json::from_str(&read("stats.json")).unwrap();
    let requests = total(&stats).unwrap();
    assert_eq!(stats["masters"], SHARDS, "{stats}");
    assert_eq!(nodes_seen(&stats).len(), NODES, "both shards' endpoints");
    assert_eq!(
        (
            &summary["masters"],
            &summary["workers"],
            &summary["requests"]
        ),
        (&SHARDS.into(), &NODES.into(), &requests.into()),
        "{summary}"
    );

    // Stopped, the shards' numbers hold still: the merged view is exactly their sum, endpoint
    // by endpoint, and the run's numbers (taken before and after its stop) are within it.
    let (own, settled) = wait_for_why(
        "the merged total equal to the shards' sum",
        Duration::from_secs(30),
        || async {
            let mut own = vec![];
            for k in 0..SHARDS as usize {
                let s = f
                    .shard_stats(k)
                    .await
                    .ok_or(format!("shard {k} does not answer"))?;
                if s["state"] != "stopped" || total(&s).unwrap_or(0) == 0 {
                    return Err(format!(
                        "shard {k}: {} with {:?} requests",
                        s["state"],
                        total(&s)
                    ));
                }
                own.push(s);
            }
            let merged = f.get_json("/api/stats").await.ok_or("no /api/stats")?;
            let sum: u64 = own.iter().filter_map(total).sum();
            if total(&merged) != Some(sum) {
                return Err(format!("merged {:?}, shards {sum}", total(&merged)));
            }
            Ok((own, merged))
        },
    )
    .await;
    let sum = total(&settled).unwrap();
    for row in settled["stats"].as_array().unwrap() {
        let name = row["name"].as_str().unwrap();
        let of_shards: u64 = own.iter().map(|s| requests_to(s, name)).sum();
        assert_eq!(
            row["num_requests"], of_shards,
            "{name}: merged against shards"
        );
    }
    assert!(requests > 0 && requests <= sum, "{requests} of {sum}");
    let csv = read("stats.csv");
    let rows = records(&csv);
    let shard0_csv = wait_for("shard 0's own CSV", T, || async {
        let r = f
            .operator()
            .get("/locust/stats/requests/csv", T, 1 << 20)
            .await
            .ok()?;
        (r.status == 200).then(|| String::from_utf8_lossy(&r.body).to_string())
    })
    .await;
    assert_eq!(
        csv.lines().next(),
        shard0_csv.lines().next(),
        "Locust's columns"
    );
    let names: Vec<String> = rows
        .iter()
        .skip(1)
        .map(|r| format!("{} {}", r[0], r[1]))
        .collect();
    let agg: u64 = rows.last().unwrap()[2].parse().unwrap();
    assert!(
        requests <= agg && agg <= sum,
        "stats.csv {agg}, {requests}..{sum}"
    );
    for n in on.concat() {
        assert!(
            names.contains(&format!("GET /node/{n}")),
            "{n} in {names:?}"
        );
    }
    assert!(names.contains(&"GET /renamed".to_string()), "{names:?}");
    assert_eq!(nodes_seen(&settled).len(), NODES);
    let failures = read("failures.csv");
    for n in on.concat() {
        assert!(
            failures.contains(&format!("GET,/fail/{n},")),
            "{n} in {failures}"
        );
    }
    let html = read("report.html");
    assert!(html.contains("over 2 Locust masters"), "fleet's own report");
    for n in on.concat() {
        assert!(html.contains(&format!("/node/{n}<")), "{n} in report.html");
    }
    for external in ["<script", "<link", " src="] {
        assert!(!html.contains(external), "self-contained: {external}");
    }

    let _ = target_proc.kill();
    let _ = target_proc.wait();
}
