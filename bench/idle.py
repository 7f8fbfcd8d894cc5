#!/usr/bin/env python3
"""The controller's idle cost: CPU and RSS of `fleet serve` with N connected agents that
long-poll and heartbeat every 5 s, nothing being published.

Usage: .venv/bin/python bench/idle.py [--agents 1000] [--seconds 30] [--soft-nofile 1024] [--no-build]

N local agents with a stub worker (`sleep 3600`) each, no Locust master. Once every agent has
reported, the script waits 10 s for the fleet to settle, then samples the controller's CPU
time (utime + stime of all its threads, /proc/PID/stat) over `--seconds` and its RSS every
second. Budget (docs/benchmarks.md): idle CPU <= 2 % of one core and RSS <= 64 MiB with 1000 agents.
It also counts the established TCP connections to the controller's port at the end (an
agent holds one over HTTP/2).
"""
import argparse
import os
import time

from common import Fleet, build_release, machine

ap = argparse.ArgumentParser()
ap.add_argument("--agents", type=int, default=1000)
ap.add_argument("--seconds", type=int, default=30)
ap.add_argument("--heartbeat-ms", type=int, default=5000)
ap.add_argument("--soft-nofile", type=int, default=None, help="start fleet serve under this soft open-files limit")
ap.add_argument("--no-build", action="store_true")
a = ap.parse_args()
if not a.no_build:
    build_release()

TICK = os.sysconf("SC_CLK_TCK")
MiB = 1024 * 1024


def cpu_s(pid):
    """(user, system) CPU seconds of all the process's threads."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def established(port):
    """Established connections whose local port is `port` (the server side)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "01":
                n += 1
    return n


f = Fleet(
    managed_master=False,
    worker_command=["sleep", "3600"],
    agent_settings={"heartbeat_ms": a.heartbeat_ms, "join_grace_ms": 200, "stable_ms": 2000},
)
try:
    f.write_spec("from locust import User, task\n\n\nclass Stub(User):\n    @task\n    def t(self):\n        pass\n")
    f.start(soft_nofile=a.soft_nofile)
    f.wait("first publication", f.current_sha)
    t = time.time()
    f.cli("scale", "--nodes", str(a.agents), "--wait", "0")
    f.wait(f"{a.agents} agents reporting", lambda: len(f.api("/api/nodes")) >= a.agents, timeout=900, every=1.0)
    connected = time.time() - t
    time.sleep(10)
    pid = f.serve.pid
    c0, t0 = cpu_s(pid), time.time()
    samples = []
    while time.time() - t0 < a.seconds:
        samples.append(rss(pid))
        time.sleep(1)
    c1, t1 = cpu_s(pid), time.time()
    conns = established(f.port)
    user = (c1[0] - c0[0]) / (t1 - t0) * 100
    system = (c1[1] - c0[1]) / (t1 - t0) * 100
    share = user + system
    peak, mean = max(samples), sum(samples) / len(samples)
    print(f"machine: {machine()}")
    print(f"{a.agents} agents (heartbeat every {a.heartbeat_ms / 1000:g} s), soft open-files limit at start: {a.soft_nofile or 'inherited'}")
    print(f"time from `fleet scale` to all agents reporting: {connected:.1f} s")
    print(f"controller idle CPU over {t1 - t0:.0f} s: {share:.2f} % of one core (user {user:.2f}, system {system:.2f}); budget 2 %; ratio {share / 2:.2f}")
    print(f"controller RSS: peak {peak / MiB:.1f} MiB, mean {mean / MiB:.1f} MiB; budget 64 MiB; ratio {peak / (64 * MiB):.2f}")
    print(f"established connections to the controller: {conns}")
finally:
    f.close()
