//! `fleet scale` on EC2 and Auto Scaling, end to end: the real aws-sdk-ec2 and
//! aws-sdk-autoscaling wire protocol against moto, through the throttling emulator, with an
//! agent booted for every instance (IMDSv2 emulator serving its id and user-data).

use std::time::{Duration, Instant};

use fleet_tests::aws::Ec2Fleet;
use fleet_tests::wait_for;
use serde_json::json;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// The agents of these instances report to the controller, each under its instance id.
async fn assert_connected(f: &Ec2Fleet, ids: &[String], backend: &str) {
    let want: std::collections::BTreeSet<&str> = ids.iter().map(|s| s.as_str()).collect();
    wait_for(
        "agents of every instance connected",
        Duration::from_secs(60),
        || async {
            let nodes = f.fleet.nodes().await;
            let got: std::collections::BTreeSet<&str> = nodes
                .iter()
                .filter(|n| n.heartbeat.running.is_some() && n.heartbeat_age_s < 15.0)
                .map(|n| n.heartbeat.node_id.as_str())
                .collect::<Vec<_>>()
                .into_iter()
                .collect();
            let ok = want.iter().all(|id| got.contains(id));
            ok.then_some(())
        },
    )
    .await;
    let nodes = f.fleet.nodes().await;
    assert!(nodes
        .iter()
        .filter(|n| want.contains(n.heartbeat.node_id.as_str()))
        .all(|n| n.heartbeat.backend == backend));
}

#[tokio::test(flavor = "multi_thread")]
async fn scale_up_down_to_zero_with_exact_counts() {
    let f = Ec2Fleet::new(20.0, true);
    for (n, up) in [(200usize, true), (50, false), (0, false)] {
        let r = f.scale("ec2", n, if up { 120 } else { 0 });
        assert_eq!(r["live"], n, "{r}");
        let live = f.moto.live_instances("e2e");
        assert_eq!(live.len(), n, "moto's count after scaling to {n}");
        if up {
            assert_eq!(r["launched"].as_array().unwrap().len(), n);
            assert_eq!(r["connected"], n);
            assert_connected(&f, &live, "ec2").await;
        } else {
            assert_eq!(
                r["launched"].as_array().unwrap().len(),
                0,
                "scaling down launches nothing"
            );
        }
        // Re-running the same scale changes nothing.
        let again = f.scale("ec2", n, 0);
        assert_eq!(again["launched"].as_array().unwrap().len(), 0, "{again}");
        assert_eq!(again["terminated"].as_array().unwrap().len(), 0, "{again}");
    }
    let stats = f.emulator.stats();
    // Every throttle the emulator answered was handled by the launcher (the scales succeeded);
    // with full buckets there should be none at all.
    assert_eq!(
        stats["throttled"].as_object().map(|m| m.len()).unwrap_or(0),
        0,
        "{}",
        stats["throttled"]
    );
    // Batches, not one call per instance.
    assert!(
        stats["calls"]["RunInstances"].as_u64().unwrap() <= 4,
        "{}",
        stats["calls"]
    );
    // The instances carry the user-data the agents need: this controller and its CA.
    let any = f.moto.instances("e2e")[0].0.clone();
    let ud = f.moto.boto(&format!(
        "import base64\na = ec2.describe_instance_attribute(InstanceId={any:?}, Attribute='userData')\nprint(base64.b64decode(a['UserData']['Value']).decode())"
    ));
    assert!(
        ud.contains(&format!("controller = \"{}\"", f.fleet.url)),
        "{ud}"
    );
    assert!(ud.contains("BEGIN CERTIFICATE"), "{ud}");
}

#[tokio::test(flavor = "multi_thread")]
async fn converges_through_a_throttling_storm_and_a_capacity_outage() {
    let f = Ec2Fleet::new(10.0, false);
    let dead = f.subnets[0].clone();
    // Buckets nearly empty, and no capacity at all in the first subnet.
    f.emulator.config(json!({
        "request_buckets": {"RunInstances": {"tokens": 0}, "NonMutating": {"tokens": 2}},
        "resource_buckets": {"RunInstances": {"tokens": 5}},
        "insufficient": [[dead, "*"]],
    }));
    let t = Instant::now();
    let r = f.scale("ec2", 120, 0);
    let took = t.elapsed().as_secs_f64();
    assert_eq!(r["live"], 120, "{r}");
    let placed = f.moto.boto(
        "r = {}\nfor p in ec2.get_paginator('describe_instances').paginate(Filters=[{'Name': 'tag:fleet', 'Values': ['e2e']}, {'Name': 'instance-state-name', 'Values': ['pending', 'running']}]):\n    for res in p['Reservations']:\n        for i in res['Instances']:\n            r[i['SubnetId']] = r.get(i['SubnetId'], 0) + 1\nprint(json.dumps(r))",
    );
    let placed: serde_json::Value = serde_json::from_str(placed.trim()).unwrap();
    assert!(
        placed.get(&dead).is_none(),
        "nothing in the failed subnet: {placed}"
    );
    assert_eq!(
        placed
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>(),
        120
    );
    let stats = f.emulator.stats();
    assert!(stats["capacity_errors"].as_u64().unwrap() >= 1, "{stats}");
    // 115 instances beyond the 5 in the bucket at 2/s × 10: at least 5.75 s.
    assert!(took >= 5.0, "faster than the buckets allow: {took:.1} s");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_scale_converges_on_rerun_without_duplicates() {
    let f = Ec2Fleet::new(5.0, false);
    // A slow launch (10 instances/s after the first 10), and one lost response: the launcher
    // must retry that call with its token and not launch twice.
    f.emulator
        .config(json!({"resource_buckets": {"RunInstances": {"tokens": 10}}, "lose_responses": 1}));
    let mut child = std::process::Command::new(fleet_tests::bin("fleet"))
        .arg("--dir")
        .arg(f.fleet.path())
        .args(["scale", "--backend", "ec2", "--nodes", "80", "--wait", "0"])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        "some instances launched",
        Duration::from_secs(30),
        || async { (f.moto.live_instances("e2e").len() >= 15).then_some(()) },
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let midway = f.moto.live_instances("e2e").len();
    assert!(
        midway < 80,
        "the kill came too late to test anything ({midway})"
    );
    let r = f.scale("ec2", 80, 0);
    assert_eq!(r["live"], 80, "{r}");
    assert_eq!(
        f.moto.live_instances("e2e").len(),
        80,
        "exactly 80 after the rerun"
    );
    let stats = f.emulator.stats();
    assert_eq!(stats["lost_responses"], 1, "{stats}");
    assert!(
        stats["idempotent_replays"].as_u64().unwrap() >= 1,
        "the lost call was replayed by token: {stats}"
    );
    assert_eq!(
        stats["instances_launched"], 80,
        "no launch happened twice: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_scaling_group_create_scale_and_delete() {
    let f = Ec2Fleet::new(20.0, true);
    let r = f.scale("asg", 4, 120);
    assert_eq!(r["live"], 4, "{r}");
    assert_eq!(r["connected"], 4, "{r}");
    let groups = f.moto.boto(
        "g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=['fleet-e2e'])['AutoScalingGroups']\nprint(json.dumps([[x['DesiredCapacity'], len(x['Instances'])] for x in g]))",
    );
    assert_eq!(groups.trim(), "[[4, 4]]");
    let tagged = f.moto.live_instances("e2e");
    assert_eq!(tagged.len(), 4, "instances visible and tagged");
    assert_connected(&f, &tagged, "asg").await;
    let r = f.scale("asg", 1, 0);
    assert_eq!(r["live"], 1, "{r}");
    let out = f.cli(&["down", "--backend", "asg"]);
    assert!(out.status.success(), "down: {}", stderr(&out));
    let groups = f.moto.boto("print(len(asg.describe_auto_scaling_groups(AutoScalingGroupNames=['fleet-e2e'])['AutoScalingGroups']))");
    assert_eq!(groups.trim(), "0", "the group is deleted");
    wait_for("no live instance left", Duration::from_secs(30), || async {
        f.moto.live_instances("e2e").is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_one_clear_line_and_launches_nothing() {
    let f = Ec2Fleet::new(20.0, false);
    let one_line = |out: &std::process::Output, needle: &str| {
        assert!(!out.status.success());
        let e = stderr(out);
        assert!(e.contains(needle), "expected {needle:?} in {e:?}");
        assert_eq!(e.trim_end().lines().count(), 1, "one line: {e:?}");
    };
    one_line(
        &f.cli_env(
            &["scale", "--backend", "ec2", "--nodes", "2", "--wait", "0"],
            &[],
        ),
        "credentials",
    );
    one_line(
        &f.cli(&["scale", "--backend", "ec2", "--nodes", "-1"]),
        "--nodes must be 0 or more",
    );
    one_line(
        &f.cli(&["scale", "--backend", "ec2", "--nodes", "1001"]),
        "safety cap",
    );
    let cfg = f.fleet.path().join("fleet.toml");
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, good.replace(&f.ami, "ami-0000000000deadbee")).unwrap();
    one_line(
        &f.cli(&["scale", "--backend", "ec2", "--nodes", "2", "--wait", "0"]),
        "AMI ami-0000000000deadbee does not exist",
    );
    std::fs::write(
        &cfg,
        good.replace("region = \"us-east-1\"", "region = \"xx-nowhere-1\""),
    )
    .unwrap();
    one_line(
        &f.cli(&["scale", "--backend", "ec2", "--nodes", "2", "--wait", "0"]),
        "unknown AWS region",
    );
    std::fs::write(
        &cfg,
        good.replace(&f.subnets[1], "subnet-0000000000000dead"),
    )
    .unwrap();
    one_line(
        &f.cli(&["scale", "--backend", "ec2", "--nodes", "2", "--wait", "0"]),
        "subnet",
    );
    std::fs::write(&cfg, &good).unwrap();
    assert!(f.moto.instances("e2e").is_empty(), "nothing was launched");
    assert_eq!(f.emulator.stats()["calls"].get("RunInstances"), None);
    // And the good config still works.
    let r = f.scale("ec2", 2, 0);
    assert_eq!(r["live"], 2);
}
