#!/usr/bin/env python3
"""Spec edit -> every agent running the new hash, with N local agents and a stub worker.

Usage: .venv/bin/python bench/propagation.py [--agents 100] [--rounds 5]

For each round the locustfile is rewritten (atomically, as editors do) and the clock starts
at the rename; an agent's latency is its heartbeat's `running.since_ms` (when it started the
new bundle's workers) minus that instant. Budget (docs/benchmarks.md): p99 <= 1 s for 1000 agents;
the issue asks for 100 agents here. Baseline for the ratio: the budget (the old setup's
Puppet run took minutes and cannot be run here).
"""
import argparse
import time

from common import Fleet, build_release, machine, pct

ap = argparse.ArgumentParser()
ap.add_argument("--agents", type=int, default=100)
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--no-build", action="store_true")
a = ap.parse_args()
if not a.no_build:
    build_release()

SPEC = "from locust import User, task\n\n\nclass Stub(User):\n    @task\n    def t(self):\n        pass\n# round {}\n"
f = Fleet(
    managed_master=False,
    worker_command=["sleep", "3600"],
    agent_settings={"heartbeat_ms": 5000, "join_grace_ms": 200, "stable_ms": 2000},
)
try:
    f.write_spec(SPEC.format(0))
    f.start()
    f.wait("first publication", f.current_sha)
    t = time.time()
    f.cli("scale", "--nodes", str(a.agents), "--wait", "300")
    print(f"scale to {a.agents} local agents: {time.time() - t:.1f} s")
    lat = []
    worst = []
    for r in range(1, a.rounds + 1):
        old = f.current_sha()
        time.sleep(1.0)
        t0 = f.write_spec(SPEC.format(r))
        new = f.wait("new publication", lambda: (lambda s: s if s and s != old else None)(f.current_sha()))

        def done():
            nodes = f.api("/api/nodes")
            ok = [n for n in nodes if (n.get("running") or {}).get("sha256") == new]
            return nodes if len(ok) == a.agents else None

        nodes = f.wait("all agents on the new hash", done, timeout=60)
        this = [n["running"]["since_ms"] / 1000 - t0 for n in nodes]
        lat += this
        worst.append(max(this))
        print(f"round {r}: p50 {pct(this, 50)*1000:.0f} ms  p99 {pct(this, 99)*1000:.0f} ms  max {max(this)*1000:.0f} ms")
    p50, p99, mx = pct(lat, 50), pct(lat, 99), max(lat)
    print(f"\n{a.agents} agents x {a.rounds} rounds on {machine()}")
    print(f"spec write -> agent running new hash: p50 {p50*1000:.0f} ms, p99 {p99*1000:.0f} ms, max {mx*1000:.0f} ms")
    print(f"p99 / budget (1000 ms): {p99/1.0:.2f}")
finally:
    f.close()
