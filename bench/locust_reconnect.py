#!/usr/bin/env python3
"""Spec edit -> every real Locust worker reconnected to the master (budget: <= 5 s, 10 agents).

Usage: .venv/bin/python bench/locust_reconnect.py [--agents 10] [--rounds 3]

A supervised master, N local agents with one real Locust worker each, a running test against
the sample target. Each round renames the task's URL path; the clock starts at the spec file's
rename and stops when the master has logged N new workers as ready (its own log, ms
timestamps). The same run also reports the time a plain `locust --worker` process takes to
join an idle master from spawn (the floor any restart pays: Python import and handshake).
"""
import argparse
import datetime
import os
import re
import subprocess
import time

from common import LOCUST, REL, Fleet, build_release, free_port, machine

ap = argparse.ArgumentParser()
ap.add_argument("--agents", type=int, default=10)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--no-build", action="store_true")
a = ap.parse_args()
if not a.no_build:
    build_release()

READY = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\].*reported as ready")


def ready_times(log, after):
    out = []
    for line in open(log, errors="replace"):
        m = READY.match(line)
        if m:
            t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=datetime.timezone.utc).timestamp()
            if t >= after:
                out.append(t)
    return out


def spec(target, path):
    return (
        "from locust import FastHttpUser, constant, task\n\n\nclass Web(FastHttpUser):\n"
        f"    host = \"{target}\"\n    wait_time = constant(0.5)\n\n    @task\n    def t(self):\n        self.client.get(\"{path}\")\n"
    )


os.environ["TZ"] = "UTC"
tport = free_port()
target_proc = subprocess.Popen([os.path.join(REL, "fleet"), "target", "--listen", f"127.0.0.1:{tport}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
target = f"http://127.0.0.1:{tport}"
f = Fleet(managed_master=True, agent_settings={"heartbeat_ms": 2000})
try:
    f.write_spec(spec(target, "/r0"))
    f.start()
    f.wait("first publication", f.current_sha)
    f.cli("scale", "--nodes", str(a.agents), "--wait", "300")
    mlog = os.path.join(f.dir, "state", "master.log")
    f.wait("workers at the master", lambda: len(ready_times(mlog, 0)) >= a.agents, timeout=120, every=0.2)
    f.cli("swarm", "--users", str(2 * a.agents), "--spawn-rate", str(2 * a.agents))
    time.sleep(3)
    results = []
    for r in range(1, a.rounds + 1):
        t0 = f.write_spec(spec(target, f"/r{r}"))
        times = f.wait("new workers ready", lambda: (lambda t: t if len(t) >= a.agents else None)(ready_times(mlog, t0)), timeout=60, every=0.1)
        took = sorted(times)[a.agents - 1] - t0
        results.append(took)
        print(f"round {r}: all {a.agents} workers reconnected {took:.2f} s after the spec write")
        time.sleep(5)
    stats = f.api("/locust/stats/requests")
    print(f"after the rounds: state {stats['state']}, users {stats['user_count']}, workers {stats['worker_count']}")

    # Floor: one plain worker joining an idle master, from spawn.
    mport, wport = free_port(), free_port()
    d = os.path.join(f.dir, "spec")
    master = subprocess.Popen([LOCUST, "-f", "locustfile.py", "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(mport),
                               "--web-host", "127.0.0.1", "--web-port", str(wport)], cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    t = time.time()
    worker = subprocess.Popen([LOCUST, "-f", "locustfile.py", "--worker", "--master-host", "127.0.0.1", "--master-port", str(mport)],
                              cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    floor = None
    for line in master.stderr:
        if "reported as ready" in line:
            floor = time.time() - t
            break
    worker.terminate()
    master.terminate()
    print(f"\n{a.agents} agents on {machine()}")
    print(f"spec write -> all workers reconnected: best {min(results):.2f} s, worst {max(results):.2f} s; budget 5 s; worst/budget {max(results)/5:.2f}")
    print(f"floor in the same run: one `locust --worker` joins an idle master {floor:.2f} s after spawn")
finally:
    f.close()
    target_proc.kill()
