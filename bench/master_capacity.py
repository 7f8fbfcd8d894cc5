#!/usr/bin/env python3
"""One Locust master's capacity: how many workers one master (one core) carries.

Usage: .venv/bin/python bench/master_capacity.py [--workers 250,500,1000,2000,3000,4000,5000,6000]
           [--endpoints 1,50] [--users-per-worker 10] [--settle 10] [--seconds 30]
           [--master-core 0] [--pool-core 1]

For each endpoint count and each N: a real `locust --master` (tests/support/pool_locustfile.py,
no Rust build needed) pinned to one core, and tests/support/worker_pool.py holding N simulated
workers pinned to another (pool_validation.py checks it against real workers). Measured:
- ready: pool start -> every worker has the master's `ack` (all N connected);
- dispatch: POST /swarm (N x users-per-worker users, all at once) -> the master's
  `spawning_complete` has reached every worker (Locust's own "all users spawned");
- master CPU (% of its core) and RSS (max) over `--seconds` with the swarm running;
- heartbeat round trip: a worker's heartbeat -> the master's reply, p50 (mean of the
  per-second medians) and p95 (worst per-second p95) over the same window;
- lost: workers the master no longer counts at the end, plus workers the pool saw give up;
  missing: times the master logged a worker as missing (no heartbeat for 3 s);
- API: how long the master's web API takes to answer GET /stats/requests at the end;
- the pool's own CPU, to show it is not the bottleneck.
The table gives CPU and heartbeat ratios against the smallest N of the same endpoint count.
"""
import argparse
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request

from common import LOCUST, ROOT, cpu_s, free_port, machine, pinned, rss

SUPPORT = os.path.join(ROOT, "tests", "support")
PYTHON = os.path.join(os.path.dirname(LOCUST), "python")
MiB = 1024 * 1024
LOGS = tempfile.mkdtemp(prefix="fleet-bench-master-")  # the masters' logs, kept

ap = argparse.ArgumentParser()
ap.add_argument("--workers", default="250,500,1000,2000,3000,4000,5000,6000")
ap.add_argument("--endpoints", default="1,50")
ap.add_argument("--users-per-worker", type=int, default=10)
ap.add_argument("--spread", type=int, default=20, help="distinct response times per endpoint")
ap.add_argument("--settle", type=float, default=10, help="seconds between all connected and the swarm")
ap.add_argument("--seconds", type=float, default=30, help="measurement window with the swarm running")
ap.add_argument("--master-core", type=int, default=0)
ap.add_argument("--pool-core", type=int, default=1)
a = ap.parse_args()


class Run:
    """One master and one pool of N workers; the pool's status lines read in a thread."""

    def __init__(self, n, endpoints):
        self.n, self.endpoints = n, endpoints
        self.port, self.web = free_port(), free_port()
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        self.master_log = open(os.path.join(self.tmp(), f"master-{endpoints}-{n}.log"), "w")
        self.master = subprocess.Popen(
            [LOCUST, "-f", "pool_locustfile.py", "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port",
             str(self.port), "--web-host", "127.0.0.1", "--web-port", str(self.web)],
            cwd=SUPPORT, env=env, stdout=self.master_log, stderr=subprocess.STDOUT, preexec_fn=pinned(a.master_core))
        self.wait("the master's web UI", lambda: self.api("/stats/requests", timeout=1), 30)
        self.lines = []
        self.t_pool = time.time()
        self.pool = subprocess.Popen(
            [PYTHON, "worker_pool.py", "--workers", str(n), "--master", f"127.0.0.1:{self.port}", "--endpoints", str(endpoints),
             "--spread", str(a.spread), "--seed", str(n)],
            cwd=SUPPORT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, preexec_fn=pinned(a.pool_core))
        threading.Thread(target=self.read, daemon=True).start()

    @staticmethod
    def tmp():
        return LOGS

    def read(self):
        for line in self.pool.stdout:
            self.lines.append(json.loads(line))

    def last(self):
        return self.lines[-1] if self.lines else {}

    def api(self, path, form=None, timeout=120):
        body = None if form is None else urllib.parse.urlencode(form).encode()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web}{path}", data=body, timeout=timeout) as r:
                return json.loads(r.read())
        except OSError:
            return None

    @staticmethod
    def wait(what, fn, timeout):
        t = time.time()
        while time.time() - t < timeout:
            v = fn()
            if v:
                return v
            time.sleep(0.1)
        raise SystemExit(f"master_capacity: timed out after {timeout:.0f} s waiting for {what}")

    def measure(self):
        s = self.wait(f"{self.n} workers connected", lambda: self.last().get("all_ready_s"), 300)
        ready = s
        time.sleep(a.settle)
        users = self.n * a.users_per_worker
        t_post = time.time()
        self.api("/swarm", {"user_count": users, "spawn_rate": users})
        done = self.wait("the swarm dispatched", lambda: (lambda l: l.get("all_master_spawning_complete_at") or 0)(self.last()) > t_post
                         and self.last()["all_master_spawning_complete_at"], 600)
        dispatch = done - t_post
        users_seen = self.last().get("users")
        pid = self.master.pid
        c0, p0, t0, k0 = cpu_s(pid), cpu_s(self.pool.pid), time.time(), len(self.lines)
        peak = 0
        while time.time() - t0 < a.seconds:
            peak = max(peak, rss(pid))
            time.sleep(1)
        wall = time.time() - t0
        cpu = (cpu_s(pid) - c0) / wall * 100
        pool_cpu = (cpu_s(self.pool.pid) - p0) / wall * 100
        window = [l["hb_rtt_ms"] for l in self.lines[k0:] if l["hb_rtt_ms"]["n"]]
        p50 = sum(w["p50"] for w in window) / len(window) if window else float("nan")
        p95 = max((w["p95"] for w in window), default=float("nan"))
        t_api = time.time()
        stats = self.api("/stats/requests") or {}
        api_s = time.time() - t_api
        last = self.last()
        lost = self.n - stats.get("worker_count", 0) + sum(last.get("lost", {}).values())
        self.master_log.flush()
        missing = sum(1 for line in open(self.master_log.name, errors="replace") if "setting state to missing" in line)
        return {"n": self.n, "endpoints": self.endpoints, "ready_s": ready, "dispatch_s": dispatch,
                "users": users_seen, "target_users": users, "cpu": cpu, "rss_mib": peak / MiB, "hb_p50": p50, "hb_p95": p95,
                "lost": lost, "missing": missing, "api_s": api_s, "pool_cpu": pool_cpu}

    def close(self):
        self.master.send_signal(signal.SIGTERM)  # its quit ends every worker, and so the pool
        for p in (self.master, self.pool):
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.master_log.close()


results = []
for e in [int(x) for x in a.endpoints.split(",")]:
    for n in [int(x) for x in a.workers.split(",")]:
        run = Run(n, e)
        try:
            r = run.measure()
        finally:
            run.close()
        results.append(r)
        print(json.dumps(r), flush=True)

print(f"\nmasters' logs in {LOGS}")
print(f"One Locust master pinned to core {a.master_core}, the pool on core {a.pool_core}; {machine()}")
print(f"{a.users_per_worker} users per worker, {a.spread} distinct response times per endpoint, {a.seconds:.0f} s window\n")
print("| endpoints | workers | ready s | dispatch s | master CPU % | RSS MiB | hb p50 ms | hb p95 ms | lost | missing | API s | pool CPU % | CPU/base | hb p95/base |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in results:
    base = next(b for b in results if b["endpoints"] == r["endpoints"])
    print(f"| {r['endpoints']} | {r['n']} | {r['ready_s']:.1f} | {r['dispatch_s']:.1f} | {r['cpu']:.0f} | {r['rss_mib']:.0f} | "
          f"{r['hb_p50']:.1f} | {r['hb_p95']:.1f} | {r['lost']} | {r['missing']} | {r['api_s']:.2f} | {r['pool_cpu']:.0f} | "
          f"{r['cpu'] / base['cpu']:.2f} | {r['hb_p95'] / base['hb_p95']:.2f} |")
busy = [r for r in results if r["pool_cpu"] > 80]
for r in busy:
    print(f"note: the pool used {r['pool_cpu']:.0f} % of its core at {r['n']} workers, {r['endpoints']} endpoint(s): "
          "that row may show the pool's limit rather than the master's")
