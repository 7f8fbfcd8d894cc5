#!/usr/bin/env python3
"""The validation gate's added latency: spec write -> new publication, with the gate and without.

Usage: .venv/bin/python bench/spec_gate.py [--rounds 10]

One controller with a managed master each way (no agents: publication is where the gate sits);
`[spec] validate = false` turns the gate off for the second run. For each round the locustfile
is rewritten (atomically, as editors do) and the clock runs from the rename until `/api/spec`
names the new bundle (polled every 20 ms). Figures in docs/benchmarks.md.
"""
import argparse

from common import Fleet, build_release, machine, pct

ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=10)
ap.add_argument("--no-build", action="store_true")
a = ap.parse_args()
if not a.no_build:
    build_release()

SPEC = "from locust import HttpUser, task\n\n\nclass Web(HttpUser):\n    host = 'http://127.0.0.1:9'\n\n    @task\n    def t(self):\n        self.client.get('/{}')\n"


def run(validate):
    f = Fleet(managed_master=True)
    try:
        with open(f"{f.dir}/fleet.toml", "a") as cfg:
            cfg.write(f"\n[spec]\nvalidate = {'true' if validate else 'false'}\n")
        f.write_spec(SPEC.format(0))
        f.start()
        f.wait("first publication", f.current_sha)
        import time
        lat = []
        for r in range(1, a.rounds + 1):
            old = f.current_sha()
            time.sleep(0.5)
            t0 = f.write_spec(SPEC.format(r))
            f.wait("new publication", lambda: (lambda s: s if s and s != old else None)(f.current_sha()))
            lat.append(time.time() - t0)
        return lat
    finally:
        f.close()


on, off = run(True), run(False)
print(f"{a.rounds} rounds each on {machine()}")
for name, lat in (("gate on ", on), ("gate off", off)):
    print(f"{name}: spec write -> publication p50 {pct(lat, 50)*1000:.0f} ms, max {max(lat)*1000:.0f} ms")
print(f"added by the gate: p50 {(pct(on, 50) - pct(off, 50))*1000:.0f} ms")
