//! Sharded masters (`master.shards = 3`) with the simulated worker pool
//! (tests/support/worker_pool.py), one pool of 400 workers per shard: a swarm of 12,000 users
//! is split in proportion to the workers, each shard's own UI answers under `/locust/<k>/`, and
//! when one shard's master is killed only its workers reconnect, the others keep running, and
//! the test returns to 12,000 users.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_tests::{locust, wait_for, workspace_root, Fleet, Options};

const SHARDS: u16 = 3;
const WORKERS: u64 = 400;
const USERS: u64 = 12_000;

/// One simulated pool; its last status line (one a second) is kept.
struct Pool {
    child: Child,
    last: Arc<Mutex<serde_json::Value>>,
}

impl Pool {
    fn start(port: u16) -> Pool {
        let python = locust().with_file_name("python");
        let mut child = Command::new(python)
            .arg("worker_pool.py")
            .args(["--workers", &WORKERS.to_string()])
            .args(["--master", &format!("127.0.0.1:{port}")])
            .args(["--connect-rate", "400"])
            .current_dir(workspace_root().join("tests/support"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("worker_pool.py");
        let last = Arc::new(Mutex::new(serde_json::Value::Null));
        let out = child.stdout.take().unwrap();
        let keep = last.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    *keep.lock().unwrap() = v;
                }
            }
        });
        Pool { child, last }
    }

    fn get(&self, key: &str) -> u64 {
        self.last.lock().unwrap()[key].as_u64().unwrap_or(0)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every shard's (state, users, workers) as its own web API answers.
async fn all_shards(f: &Fleet) -> Option<Vec<(String, u64, u64)>> {
    let mut out = vec![];
    for k in 0..SHARDS {
        let s = f.shard_stats(k.into()).await?;
        out.push((
            s["state"].as_str()?.to_string(),
            s["user_count"].as_u64()?,
            s["worker_count"].as_u64()?,
        ));
    }
    Some(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn three_shards_share_a_test_and_one_shards_crash_moves_nobody_else() {
    let mut f = Fleet::new(Options::default());
    // The pool's user class and traffic as the spec, so the masters know `PoolUser`.
    let support = workspace_root().join("tests/support");
    let traffic = "pool_traffic.py";
    std::fs::copy(support.join(traffic), f.path().join("spec").join(traffic)).unwrap();
    f.write_spec(&std::fs::read_to_string(support.join("pool_locustfile.py")).unwrap());
    let zmq = f.use_shards(SHARDS);
    f.start_serve();

    let master = wait_for("three masters running", Duration::from_secs(60), || async {
        let m = f.get_json("/api/master").await?;
        let shards = m["shards"].as_array()?;
        (shards.len() == SHARDS as usize && shards.iter().all(|s| s["pid"].is_u64())).then_some(m)
    })
    .await;
    let spec = f.spec().await.unwrap();
    let manifest = spec.current.unwrap();
    assert!(manifest.master_epoch >= 1);

    let pools: Vec<Pool> = (0..SHARDS).map(|k| Pool::start(zmq + k)).collect();
    wait_for(
        "400 workers at each master",
        Duration::from_secs(90),
        || async {
            let s = all_shards(&f).await?;
            s.iter().all(|(_, _, w)| *w == WORKERS).then_some(())
        },
    )
    .await;

    let out = f.cli(&[
        "swarm",
        "--users",
        &USERS.to_string(),
        "--spawn-rate",
        "3000",
    ]);
    assert!(
        out.status.success(),
        "swarm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Split in proportion to the workers: 400 each, so 4000 users each.
    let split = wait_for(
        "4000 users on each shard",
        Duration::from_secs(90),
        || async {
            let s = all_shards(&f).await?;
            s.iter()
                .all(|(st, u, _)| st == "running" && *u == USERS / 3)
                .then_some(s)
        },
    )
    .await;
    assert_eq!(split.iter().map(|s| s.1).sum::<u64>(), USERS);
    let view = f.get_json("/api/master").await.unwrap();
    assert_eq!(view["swarm"]["users"], USERS, "{view}");
    let shares: Vec<u64> = view["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["swarm"]["users"].as_u64().unwrap())
        .collect();
    assert_eq!(shares, [4000, 4000, 4000]);

    // One merged view of the test (`GET /api/stats`): every shard's workers and users (its
    // requests are compared with the shards' own once the test is stopped, at the end).
    wait_for(
        "the merged view of 3 shards",
        Duration::from_secs(30),
        || async {
            let v = f.get_json("/api/stats").await?;
            (v["masters"] == SHARDS && v["worker_count"] == 3 * WORKERS && v["user_count"] == USERS)
                .then_some(v)
        },
    )
    .await;

    // Kill shard 1's master: it is restarted in place (same ports) with a new epoch. Workers
    // never rejoin a new master (docs/locust.md); the agents on shard 1 (and only they, see
    // the agent's machine tests) restart theirs when the manifest shows its new epoch: here,
    // pool 1 is restarted when the manifest does, pools 0 and 2 are left alone.
    let before: Vec<u64> = pools.iter().map(|p| p.get("reconnects")).collect();
    let shard1 = &master["shards"][1];
    let (pid, epoch) = (
        shard1["pid"].as_i64().unwrap(),
        shard1["epoch"].as_u64().unwrap(),
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let m = wait_for(
        "a manifest for shard 1's new epoch",
        Duration::from_secs(30),
        || async {
            let m = f.manifest().await?;
            (m["masters"][1]["epoch"].as_u64()? == epoch + 1).then_some(m)
        },
    )
    .await;
    let masters = m["masters"].as_array().expect("masters listed");
    assert_eq!(masters.len(), 3);
    assert_eq!(masters[1]["port"], zmq + 1);
    assert_eq!(
        masters[0]["epoch"], master["shards"][0]["epoch"],
        "shard 0 unchanged"
    );
    assert_eq!(
        masters[2]["epoch"], master["shards"][2]["epoch"],
        "shard 2 unchanged"
    );
    assert_eq!(
        m["master"]["port"], zmq,
        "shard 0 for agents without shards"
    );
    let mut pools = pools;
    pools[1] = Pool::start(zmq + 1);
    // The first time shard 0 or 2 was seen not running its users, if ever.
    let others_ran: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    let after = wait_for(
        "shard 1 back with its workers and 12,000 users in all",
        Duration::from_secs(150),
        || {
            let f = &f;
            let others_ran = &others_ran;
            async move {
                let s = all_shards_lenient(f).await;
                // While shard 1 is away the other two keep running their users.
                if let (Some(a), Some(c)) = (&s[0], &s[2]) {
                    // Spawning counts: the balancer hands shard 1's users to them meanwhile.
                    let busy = |st: &str| st == "running" || st == "spawning";
                    let ran = busy(&a.0) && busy(&c.0) && a.1 > 0 && c.1 > 0;
                    let mut first = others_ran.lock().unwrap();
                    if !ran && first.is_none() {
                        *first = Some(format!("shard 0 {a:?}, shard 2 {c:?}"));
                    }
                }
                let all: Option<Vec<_>> = s.into_iter().collect();
                let all = all?;
                let users: u64 = all.iter().map(|x| x.1).sum();
                (users == USERS
                    && all
                        .iter()
                        .all(|x| x.0 == "running" && x.2 == WORKERS && x.1 == USERS / 3))
                .then_some(all)
            }
        },
    )
    .await;
    assert_eq!(
        others_ran.into_inner().unwrap(),
        None,
        "shards 0 and 2 kept running while shard 1 was away"
    );
    assert_eq!(after.iter().map(|s| s.1).sum::<u64>(), USERS);
    let view = f.get_json("/api/master").await.unwrap();
    assert_eq!(
        view["shards"][1]["epoch"].as_u64().unwrap(),
        epoch + 1,
        "{view}"
    );
    assert_eq!(view["shards"][0]["restarts"], 0);
    assert_eq!(view["shards"][2]["restarts"], 0);
    let reconnects: Vec<u64> = pools.iter().map(|p| p.get("reconnects")).collect();
    assert_eq!(
        (reconnects[0], reconnects[2]),
        (before[0], before[2]),
        "shards 0 and 2 kept their workers"
    );
    assert_eq!(
        (pools[0].get("acked"), pools[2].get("acked")),
        (WORKERS, WORKERS)
    );

    // Stopped, the numbers hold still: the merged total is exactly the sum of the shards' own
    // `/stats/requests` (Locust caches that answer for a few seconds, so wait for it).
    let out = f.cli(&["stop"]);
    assert!(
        out.status.success(),
        "stop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let total = |s: &serde_json::Value| -> Option<u64> {
        s["stats"]
            .as_array()?
            .iter()
            .find(|r| r["name"] == "Aggregated")?["num_requests"]
            .as_u64()
    };
    let (sum, merged) = wait_for(
        "the merged total equal to the shards' sum",
        Duration::from_secs(30),
        || async {
            let mut sum = 0;
            for k in 0..SHARDS {
                let s = f.shard_stats(k.into()).await?;
                (s["state"] == "stopped").then_some(())?;
                sum += total(&s)?;
            }
            let merged = total(&f.get_json("/api/stats").await?)?;
            (sum > 0 && merged == sum).then_some((sum, merged))
        },
    )
    .await;
    assert_eq!(merged, sum);
    drop(pools);
}

/// Like [`all_shards`], each shard on its own: `None` for one that does not answer.
async fn all_shards_lenient(f: &Fleet) -> Vec<Option<(String, u64, u64)>> {
    let mut out = vec![];
    for k in 0..SHARDS {
        out.push(f.shard_stats(k.into()).await.and_then(|s| {
            Some((
                s["state"].as_str()?.to_string(),
                s["user_count"].as_u64()?,
                s["worker_count"].as_u64()?,
            ))
        }));
    }
    out
}
