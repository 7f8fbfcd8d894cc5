#!/usr/bin/env python3
"""`fleet scale --backend ec2 --nodes N` through the throttling emulator, against the minimum
EC2's buckets allow, with the naive launch of the old setup (one RunInstances per instance, in
parallel, botocore's own retries) as the baseline in the same run.

Usage: .venv/bin/python bench/scale.py [--nodes 1000] [--time-scale 8] [--start-tokens 200]
       [--no-agents] [--no-build]

Both runs start from the same state: moto reset, the emulator's buckets at their documented
bursts except the instance bucket, which holds --start-tokens (a partly drained account, so
the buckets, not moto, set the pace). The minimum is max(0, N - start) / (2/s x time scale):
the RunInstances instance bucket's refill. With agents (the default), every instance moto
reports is booted by the boot harness (a real fleet-agent, IMDSv2 emulator, stub worker) and
`fleet scale` returns once all agents have checked in with the controller.
"""
import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from common import REL, ROOT, Fleet, build_release, free_port, machine

VENV = os.path.join(ROOT, ".venv", "bin")
SUPPORT = os.path.join(ROOT, "tests", "support")

ap = argparse.ArgumentParser()
ap.add_argument("--nodes", type=int, default=1000)
ap.add_argument("--time-scale", type=float, default=8.0)
ap.add_argument("--start-tokens", type=int, default=200)
ap.add_argument("--no-agents", action="store_true")
ap.add_argument("--no-build", action="store_true")
ap.add_argument("--skip-naive", action="store_true")
a = ap.parse_args()
if not a.no_build:
    build_release()


def http(method, url, body=None):
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read() or b"null")


def first_line(proc):
    return proc.stdout.readline().decode().strip().split(" ", 2)[-1]


mport = free_port()
moto = subprocess.Popen([os.path.join(VENV, "moto_server"), "-H", "127.0.0.1", "-p", str(mport)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
moto_url = f"http://127.0.0.1:{mport}"
procs = [moto]
try:
    for _ in range(100):
        try:
            urllib.request.urlopen(moto_url + "/moto-api/", timeout=1)
            break
        except Exception:
            time.sleep(0.2)
    emu = subprocess.Popen([os.path.join(VENV, "python"), os.path.join(SUPPORT, "ec2_emulator.py"), "--listen", "127.0.0.1:0",
                            "--upstream", moto_url, "--time-scale", str(a.time_scale)],
                           stdout=subprocess.PIPE, stderr=open("/tmp/fleet-bench-emulator.log", "w"))
    procs.append(emu)
    emu_url = first_line(emu)
    import boto3
    from botocore.config import Config

    def client(url, retries=None):
        kw = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
        if retries:
            kw["config"] = Config(retries=retries, max_pool_connections=64)
        return boto3.client("ec2", **kw)

    def prepare():
        http("POST", emu_url + "/_emulator/reset", {})
        direct = client(moto_url)
        vpc = direct.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnets = [direct.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i * 16}.0/20", AvailabilityZone=az)["Subnet"]["SubnetId"]
                   for i, az in enumerate(["us-east-1a", "us-east-1b", "us-east-1c"])]
        ami = direct.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        http("POST", emu_url + "/_emulator/config", {"resource_buckets": {"RunInstances": {"tokens": a.start_tokens}}})
        return subnets, ami

    def count_live(name):
        direct = client(moto_url)
        n = 0
        for page in direct.get_paginator("describe_instances").paginate(Filters=[
                {"Name": "tag:fleet", "Values": [name]}, {"Name": "instance-state-name", "Values": ["pending", "running"]}]):
            for r in page["Reservations"]:
                n += len(r["Instances"])
        return n

    def launch_span(stats):
        oks = [e for e in stats["log"] if e[1] == "RunInstances" and e[3]]
        return (oks[-1][0] - oks[0][0]) if oks else 0.0

    minimum = max(0, a.nodes - a.start_tokens) / (2.0 * a.time_scale)
    print(f"{a.nodes} nodes, time scale {a.time_scale}, instance bucket starting at {a.start_tokens}: minimum {minimum:.1f} s")

    # --- fleet ---
    subnets, ami = prepare()
    f = Fleet(managed_master=False, worker_command=["sleep", "3600"])
    cfg = os.path.join(f.dir, "fleet.toml")
    with open(cfg, "a") as c:
        c.write(f"\n[ec2]\nregion = \"us-east-1\"\nendpoint_url = \"{emu_url}\"\nami = \"{ami}\"\n"
                f"instance_types = [\"c6i.large\", \"c5.large\"]\nsubnets = {json.dumps(subnets)}\ntime_scale = {a.time_scale}\n"
                f"\n[scale]\nmax_nodes = {a.nodes}\n")
    f.write_spec("from locust import User\n\n\nclass Stub(User):\n    pass\n")
    f.start()
    harness = None
    if not a.no_agents:
        harness = subprocess.Popen([os.path.join(VENV, "python"), os.path.join(SUPPORT, "boot_harness.py"), "--moto", moto_url,
                                    "--fleet", "bench", "--agent", os.path.join(REL, "fleet-agent"), "--workdir", os.path.join(f.dir, "boot"),
                                    "--imds-listen", "127.0.0.1:0", "--poll", "1",
                                    "--agent-setting", 'worker_command = ["sleep", "3600"]', "--agent-setting", "heartbeat_ms = 10000"],
                                   stdout=subprocess.PIPE, stderr=open("/tmp/fleet-bench-harness.log", "w"))
        procs.append(harness)
        first_line(harness)
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent")
    t0 = time.time()
    r = subprocess.run([os.path.join(REL, "fleet"), "--dir", f.dir, "--output", "json", "scale", "--backend", "ec2",
                        "--nodes", str(a.nodes), "--wait", "0" if a.no_agents else "900"], capture_output=True, text=True, env=env)
    wall = time.time() - t0
    ok = r.returncode == 0
    report = json.loads(r.stdout) if ok else {}
    stats = http("GET", emu_url + "/_emulator/stats")
    live = count_live("bench")
    span = launch_span(stats)
    fleet_result = dict(wall=wall, launch=span, ok=ok, live=live, connected=report.get("connected"),
                        calls=stats["calls"].get("RunInstances", 0), throttled=sum(stats["throttled"].values()),
                        err=r.stderr.strip().splitlines()[-1] if not ok and r.stderr.strip() else "")
    if harness:
        harness.send_signal(signal.SIGTERM)
        harness.wait(60)
        procs.remove(harness)
    f.close()

    # --- naive baseline: one call per instance, 64 in parallel, botocore's standard retries ---
    naive = None
    if not a.skip_naive:
        subnets, ami = prepare()
        c = client(emu_url, retries={"mode": "standard", "max_attempts": 5})
        failures = 0
        lock = threading.Lock()

        def one(i):
            nonlocal_fail = 0
            try:
                c.run_instances(ImageId=ami, InstanceType="c6i.large", MinCount=1, MaxCount=1, SubnetId=subnets[i % 3],
                                TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "fleet", "Value": "naive"}]}])
            except Exception:
                nonlocal_fail = 1
            return nonlocal_fail

        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            failures = sum(pool.map(one, range(a.nodes)))
        nwall = time.time() - t0
        stats = http("GET", emu_url + "/_emulator/stats")
        naive = dict(wall=nwall, failures=failures, live=count_live("naive"), calls=stats["calls"].get("RunInstances", 0),
                     throttled=sum(stats["throttled"].values()))

    print(f"\nmachine: {machine()}")
    fr = fleet_result
    print(f"fleet scale: {'ok' if fr['ok'] else 'FAILED: ' + fr['err']}; {fr['live']} live instances (exactly {a.nodes}: {fr['live'] == a.nodes}); "
          f"{fr['calls']} RunInstances calls, {fr['throttled']} throttled and retried")
    print(f"  launch phase {fr['launch']:.1f} s = {fr['launch'] / minimum if minimum else float('nan'):.3f} x minimum")
    if not a.no_agents:
        print(f"  whole command until {fr['connected']} agents connected: {fr['wall']:.1f} s = {fr['wall'] / minimum if minimum else float('nan'):.3f} x minimum")
    else:
        print(f"  whole command (--wait 0): {fr['wall']:.1f} s = {fr['wall'] / minimum if minimum else float('nan'):.3f} x minimum")
    if naive:
        print(f"naive (1 call per instance, 64 parallel, botocore standard retries x5): {naive['wall']:.1f} s = "
              f"{naive['wall'] / minimum if minimum else float('nan'):.3f} x minimum; {naive['failures']} failed launches, "
              f"{naive['live']} live; {naive['calls']} calls, {naive['throttled']} throttled")
finally:
    for p in reversed(procs):
        p.terminate()
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
