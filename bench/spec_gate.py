#!/usr/bin/env python3
"""The validation gate's added latency: spec write -> new publication, with the gate and without.

Usage: .venv/bin/python bench/spec_gate.py [--rounds 10]

One controller with a managed master each way (no agents: publication is where the gate sits):
the gate as configured by default (confined like the master: as `master.user` when root, under
Landlock), the gate with `[master] confine = false` (what confinement adds), and `[spec] validate
= false` (the gate off). For each round the locustfile
is rewritten (atomically, as editors do) and the clock runs from the rename until `/api/spec`
names the new bundle (polled every 20 ms). Wall time on a shared machine is mostly waiting for a
core, so each round also records the CPU time of the processes `fleet serve` reaped meanwhile
(the gate's Locust, and `fleet master-exec` that became it), which the load does not inflate.
Figures in docs/benchmarks.md.
"""
import argparse
import os

from common import Fleet, build_release, machine, pct

ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=10)
ap.add_argument("--no-build", action="store_true")
a = ap.parse_args()
if not a.no_build:
    build_release()

SPEC = "from locust import HttpUser, task\n\n\nclass Web(HttpUser):\n    host = 'http://127.0.0.1:9'\n\n    @task\n    def t(self):\n        self.client.get('/{}')\n"


def reaped_cpu(pid):
    """User and system CPU seconds of the children `pid` has waited for (/proc/PID/stat)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def run(validate, confine=True):
    f = Fleet(managed_master=True)
    try:
        path = f"{f.dir}/fleet.toml"
        text = open(path).read()
        if not confine:
            text = text.replace("[master]\n", "[master]\nconfine = false\n", 1)
        text += f"\n[spec]\nvalidate = {'true' if validate else 'false'}\n"
        open(path, "w").write(text)
        f.write_spec(SPEC.format(0))
        f.start()
        f.wait("first publication", f.current_sha)
        import time
        lat, cpu = [], []
        for r in range(1, a.rounds + 1):
            old = f.current_sha()
            time.sleep(0.5)
            c0 = reaped_cpu(f.serve.pid)
            t0 = f.write_spec(SPEC.format(r))
            f.wait("new publication", lambda: (lambda s: s if s and s != old else None)(f.current_sha()))
            lat.append(time.time() - t0)
            cpu.append(reaped_cpu(f.serve.pid) - c0)
        return lat, cpu
    finally:
        f.close()


on, unconfined, off = run(True), run(True, confine=False), run(False)
print(f"{a.rounds} rounds each on {machine()}")
for name, (lat, cpu) in (("gate on (confined)", on), ("gate on, unconfined", unconfined), ("gate off", off)):
    print(f"{name:19s}: spec write -> publication p50 {pct(lat, 50)*1000:.0f} ms, max {max(lat)*1000:.0f} ms; "
          f"CPU of the gate's processes p50 {pct(cpu, 50)*1000:.0f} ms")
p50 = lambda run, i=0: pct(run[i], 50) * 1000
print(f"added by the gate: p50 {p50(on) - p50(off):.0f} ms; by confinement: p50 {p50(on) - p50(unconfined):.0f} ms "
      f"wall, {p50(on, 1) - p50(unconfined, 1):.0f} ms CPU")
