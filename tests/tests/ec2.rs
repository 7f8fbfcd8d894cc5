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

/// The one line a failed command printed, asserting it failed with it.
fn fails_with(out: &std::process::Output, needle: &str) -> String {
    assert!(!out.status.success(), "expected a failure with {needle:?}");
    let e = stderr(out);
    assert!(e.contains(needle), "expected {needle:?} in {e:?}");
    assert_eq!(e.trim_end().lines().count(), 1, "one line: {e:?}");
    e
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_that_are_not_exactly_ours_are_never_counted_or_terminated() {
    let f = Ec2Fleet::new(20.0, false);
    let id = f.fleet_id();
    let (subnet, ami) = (f.subnets[0].as_str(), f.ami.as_str());
    let twin = [("fleet", "e2e"), ("fleet-id", "0000000000000001")];
    // A second fleet directory with the same name (another id), running and stopped; an
    // instance carrying only our name (made before ids, or by hand), stopped; our id under
    // another name; and a fleet a wildcard `e2*` would match.
    let foreign = vec![
        f.moto.run_tagged(subnet, ami, &twin, false),
        f.moto.run_tagged(subnet, ami, &twin, false),
        f.moto.run_tagged(subnet, ami, &twin, true),
        f.moto.run_tagged(subnet, ami, &[("fleet", "e2e")], true),
        f.moto
            .run_tagged(subnet, ami, &[("fleet", "e2e2"), ("fleet-id", &id)], false),
        f.moto.run_tagged(
            subnet,
            ami,
            &[("fleet", "e2x"), ("fleet-id", "0000000000000002")],
            false,
        ),
    ];
    let before = f.moto.states(&foreign);
    assert_eq!(
        before,
        ["running", "running", "stopped", "stopped", "running", "running"]
    );
    // One of our own, stopped by someone: left alone by scale, ended by down.
    let ours = [("fleet", "e2e"), ("fleet-id", id.as_str())];
    let our_stopped = f.moto.run_tagged(subnet, ami, &ours, true);

    let r = f.scale("ec2", 3, 0);
    assert_eq!(r["live"], 3, "{r}");
    assert_eq!(
        r["launched"].as_array().unwrap().len(),
        3,
        "the other fleet's running instances are not ours to count: {r}"
    );
    assert_eq!(r["terminated"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["plan"]["cleanup"], json!([]), "{r}");
    assert_eq!(r["plan"]["stopped"], json!([our_stopped]), "{r}");
    assert_eq!(
        f.moto.states(&foreign),
        before,
        "scale up touched nothing foreign"
    );
    assert_eq!(
        f.moto.states(std::slice::from_ref(&our_stopped)),
        ["stopped"]
    );

    let r = f.scale("ec2", 1, 0);
    assert_eq!(r["live"], 1, "{r}");
    assert_eq!(r["terminated"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(
        f.moto.states(&foreign),
        before,
        "scale down touched nothing foreign"
    );

    // A name EC2 would read as a pattern is refused before any AWS call.
    let cfg = f.fleet.path().join("fleet.toml");
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, good.replace("name = \"e2e\"", "name = \"e2*\"")).unwrap();
    for args in [
        &["scale", "--backend", "ec2", "--nodes", "0", "--wait", "0"][..],
        &["down", "--backend", "ec2"][..],
    ] {
        fails_with(&f.cli(args), "fleet name \"e2*\" is not allowed");
    }
    std::fs::write(&cfg, &good).unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let init = std::process::Command::new(fleet_tests::bin("fleet"))
        .arg("--dir")
        .arg(fresh.path())
        .args(["init", "--name", "e2?"])
        .output()
        .unwrap();
    fails_with(&init, "fleet name \"e2?\" is not allowed");
    assert_eq!(f.moto.states(&foreign), before);

    let out = f.cli(&["--output", "json", "down", "--backend", "ec2"]);
    assert!(out.status.success(), "down: {}", stderr(&out));
    let down: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        down["terminated"].as_array().unwrap().len(),
        2,
        "our last live one and our stopped one: {down}"
    );
    assert_eq!(
        f.moto.states(&foreign),
        before,
        "down touched nothing foreign"
    );
    assert_ne!(f.moto.states(&[our_stopped])[0], "stopped");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_or_template_of_another_fleet_is_never_adopted_or_deleted() {
    let f = Ec2Fleet::new(20.0, false);
    let id = f.fleet_id();
    // Another fleet directory with the same name made the group and template first.
    f.moto.boto(&format!(
        "tags = [{{'Key': 'fleet', 'Value': 'e2e'}}, {{'Key': 'fleet-id', 'Value': '0000000000000001'}}]\nec2.create_launch_template(LaunchTemplateName='fleet-e2e', LaunchTemplateData={{'ImageId': {ami:?}, 'InstanceType': 'c6i.large'}}, TagSpecifications=[{{'ResourceType': 'launch-template', 'Tags': tags}}])\nasg.create_auto_scaling_group(AutoScalingGroupName='fleet-e2e', LaunchTemplate={{'LaunchTemplateName': 'fleet-e2e', 'Version': '$Latest'}}, MinSize=0, MaxSize=5, DesiredCapacity=1, VPCZoneIdentifier={subnet:?}, Tags=[dict(t, PropagateAtLaunch=True, ResourceId='fleet-e2e', ResourceType='auto-scaling-group') for t in tags])",
        ami = f.ami,
        subnet = f.subnets[0],
    ));
    let group = || {
        f.moto.boto("print(json.dumps([[g['DesiredCapacity'], len(g['Instances'])] for g in asg.describe_auto_scaling_groups(AutoScalingGroupNames=['fleet-e2e'])['AutoScalingGroups']]))").trim().to_string()
    };
    let template = || {
        f.moto.boto("print(json.dumps([t['LaunchTemplateName'] for t in ec2.describe_launch_templates()['LaunchTemplates']]))").trim().to_string()
    };
    assert_eq!(group(), "[[1, 1]]");
    for args in [
        &["scale", "--backend", "asg", "--nodes", "2", "--wait", "0"][..],
        &["scale", "--backend", "asg", "--nodes", "0", "--wait", "0"][..],
        &["down", "--backend", "asg"][..],
    ] {
        let e = fails_with(&f.cli(args), "is not this fleet's");
        assert!(e.contains(&format!("fleet-id={id}")), "{e}");
    }
    assert_eq!(group(), "[[1, 1]]", "the other fleet's group is as it was");
    assert_eq!(template(), "[\"fleet-e2e\"]");

    // The group gone, the template still someone else's: neither used nor deleted.
    f.moto
        .boto("asg.delete_auto_scaling_group(AutoScalingGroupName='fleet-e2e', ForceDelete=True)");
    for args in [
        &["scale", "--backend", "asg", "--nodes", "1", "--wait", "0"][..],
        &["down", "--backend", "asg"][..],
    ] {
        fails_with(
            &f.cli(args),
            "launch template fleet-e2e exists but is not this fleet's",
        );
    }
    assert_eq!(template(), "[\"fleet-e2e\"]");
    assert_eq!(
        group(),
        "[]",
        "no group was made on someone else's template"
    );

    // With the name free, ours carry our id, and the template pins IMDSv2 with hop limit 1.
    f.moto
        .boto("ec2.delete_launch_template(LaunchTemplateName='fleet-e2e')");
    let r = f.scale("asg", 1, 0);
    assert_eq!(r["live"], 1, "{r}");
    let tags = f.moto.boto("g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=['fleet-e2e'])['AutoScalingGroups'][0]\nt = ec2.describe_launch_templates(LaunchTemplateNames=['fleet-e2e'])['LaunchTemplates'][0]\nd = ec2.describe_launch_template_versions(LaunchTemplateName='fleet-e2e')['LaunchTemplateVersions'][0]['LaunchTemplateData']\nprint(json.dumps({'group': sorted([t['Key'], t['Value'], t['PropagateAtLaunch']] for t in g['Tags']), 'template': sorted([x['Key'], x['Value']] for x in t['Tags']), 'meta': d['MetadataOptions']}))");
    let tags: serde_json::Value = serde_json::from_str(tags.trim()).unwrap();
    assert_eq!(
        tags["group"],
        json!([["fleet", "e2e", true], ["fleet-id", id, true]])
    );
    assert_eq!(
        tags["template"],
        json!([["fleet", "e2e"], ["fleet-id", id]])
    );
    assert_eq!(tags["meta"]["HttpTokens"], "required");
    assert_eq!(tags["meta"]["HttpPutResponseHopLimit"], 1);
    let out = f.cli(&["down", "--backend", "asg"]);
    assert!(out.status.success(), "down: {}", stderr(&out));
    assert_eq!(group(), "[]");
    assert_eq!(template(), "[]");
}
