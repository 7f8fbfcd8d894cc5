#!/usr/bin/env python3
"""Checks the simulated worker pool against real Locust workers, as the master sees them.

    pool_validation.py [--locust .venv/bin/locust] [--workers 5] [--users-per-worker 5]
        [--seconds 12] [--endpoints 1]

Two masters run side by side with pool_probe.py (it counts every message a master receives
and sends, by type, second and size): master A gets K real `locust --worker` processes, master
B a worker_pool.py of K simulated workers, both with pool_locustfile.py's traffic. Both get the
same swarm, run for `--seconds`, and get the same stop. The check, printed as a table, exits 1
if any line fails:
- both masters see the same message types, in and out;
- per worker and second over the steady window, each message type's rate agrees within 15 %
  (or one message per worker over the window, whichever is larger);
- mean message sizes agree within 20 % (stats: the requests behind them are random) and 10 %
  (the rest);
- one-off messages (connect, spawn, stop) come in the same numbers over the whole run;
- both masters' CPU over the window is printed for information (a loaded machine makes it noisy).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TICK = os.sysconf("SC_CLK_TCK")
# Sent on a timer rather than in answer to something: compared as rates, not counts.
PERIODIC = {"heartbeat", "stats", "logs"}


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def cpu_s(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


class Master:
    def __init__(self, locust, env, log):
        self.port, self.web = free_port(), free_port()
        self.proc = subprocess.Popen(
            [locust, "-f", "pool_locustfile.py,pool_probe.py", "--master", "--master-bind-host", "127.0.0.1",
             "--master-bind-port", str(self.port), "--web-host", "127.0.0.1", "--web-port", str(self.web)],
            cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT)

    def get(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.web}{path}", timeout=10) as r:
            return json.loads(r.read())

    def post(self, path, form=None):
        body = urllib.parse.urlencode(form or {}).encode()
        with urllib.request.urlopen(f"http://127.0.0.1:{self.web}{path}", data=body, timeout=10) as r:
            return r.read()

    def stats(self):
        try:
            return self.get("/stats/requests")
        except OSError:
            return None


def wait(what, fn, timeout):
    t = time.time()
    while time.time() - t < timeout:
        v = fn()
        if v:
            return v
        time.sleep(0.1)
    raise SystemExit(f"pool_validation: timed out after {timeout} s waiting for {what}")


def rates(probe, k, a, b):
    """{(direction, type): (messages per worker per second, mean bytes)} over seconds [a, b)."""
    out = {}
    for d, types in probe.items():
        for t, per in types.items():
            inside = [v for s, v in per.items() if a <= int(s) < b] or list(per.values())
            n = sum(v[0] for s, v in per.items() if a <= int(s) < b)
            size = sum(v[1] for v in inside) / max(1, sum(v[0] for v in inside))
            out[(d, t)] = (n / k / (b - a), size)
    return out


def compare(real, sim, k, seconds):
    rows, ok = [], True
    for key in sorted(set(real) | set(sim)):
        r, s = real.get(key), sim.get(key)
        if r is None or s is None:
            rows.append((key, r, s, "type seen on one side only"))
            ok = False
            continue
        rate_tol = max(0.15 * r[0], 1 / seconds)
        size_tol = (0.2 if key[1] == "stats" else 0.1) * r[1]
        bad = []
        if abs(r[0] - s[0]) > rate_tol:
            bad.append("rate")
        if abs(r[1] - s[1]) > size_tol:
            bad.append("size")
        ok &= not bad
        rows.append((key, r, s, ", ".join(bad) or "ok"))
    return ok, rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--locust", default=os.environ.get("FLEET_TEST_LOCUST", os.path.join(ROOT, ".venv", "bin", "locust")))
    ap.add_argument("--workers", type=int, default=5)
    ap.add_argument("--users-per-worker", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=12)
    ap.add_argument("--endpoints", type=int, default=1)
    ap.add_argument("--log-dir", default=None, help="keep the processes' logs here")
    a = ap.parse_args()
    python = os.path.join(os.path.dirname(a.locust), "python")
    env = dict(os.environ, POOL_ENDPOINTS=str(a.endpoints), POOL_SPREAD="20", POOL_SEED="1", POOL_RPS_PER_USER="1",
               POOL_FAIL_RATIO="0.01", PYTHONDONTWRITEBYTECODE="1")
    logdir = a.log_dir or "/dev/null"
    if a.log_dir:
        os.makedirs(a.log_dir, exist_ok=True)

    def log(name):
        return open(os.path.join(logdir, name) if a.log_dir else os.devnull, "w")

    procs = []
    try:
        real, sim = Master(a.locust, env, log("master-real.log")), Master(a.locust, env, log("master-sim.log"))
        procs += [real.proc, sim.proc]
        for m in (real, sim):
            wait("the masters' web UI", m.stats, 30)
        for _ in range(a.workers):
            procs.append(subprocess.Popen([a.locust, "-f", "pool_locustfile.py", "--worker", "--master-host", "127.0.0.1",
                                           "--master-port", str(real.port)], cwd=HERE, env=env,
                                          stdout=log("workers-real.log"), stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen([python, "worker_pool.py", "--workers", str(a.workers), "--master", f"127.0.0.1:{sim.port}",
                                       "--endpoints", str(a.endpoints), "--seed", "1"], cwd=HERE, env=env,
                                      stdout=log("pool.out"), stderr=subprocess.STDOUT))
        for m in (real, sim):
            wait(f"{a.workers} workers at a master", lambda: (m.stats() or {}).get("worker_count") == a.workers, 60)
        users = a.workers * a.users_per_worker
        for m in (real, sim):
            m.post("/swarm", {"user_count": users, "spawn_rate": users})
        for m in (real, sim):
            wait(f"{users} users", lambda: (m.stats() or {}).get("user_count") == users, 20)
        time.sleep(3)
        t0 = int(time.time()) + 1
        time.sleep(t0 - time.time())
        c0 = [cpu_s(m.proc.pid) for m in (real, sim)]
        time.sleep(a.seconds)
        cpu = [(cpu_s(m.proc.pid) - c) / a.seconds * 100 for m, c in zip((real, sim), c0)]
        for m in (real, sim):
            m.post("/stop")
        for m in (real, sim):
            wait("the workers ready again after the stop",
                 lambda: (s := m.stats() or {}).get("state") == "stopped" and s.get("worker_count") == a.workers, 20)
        time.sleep(1.5)
        probes = [m.get("/pool-probe") for m in (real, sim)]
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    steady = [rates(p, a.workers, t0, t0 + a.seconds) for p in probes]
    whole = [rates(p, a.workers, 0, 2**40) for p in probes]
    ok, rows = compare(steady[0], steady[1], a.workers, a.seconds)
    print(f"{a.workers} real vs {a.workers} simulated workers, {users} users, {a.endpoints} endpoint(s), {a.seconds} s window")
    print(f"{'message':28} {'real /w/s':>10} {'sim /w/s':>10} {'real B':>8} {'sim B':>8}  check")
    for (d, t), r, s, verdict in rows:
        cells = [f"{x[0]:10.3f}" if x else f"{'-':>10}" for x in (r, s)] + [f"{x[1]:8.0f}" if x else f"{'-':>8}" for x in (r, s)]
        print(f"{d + ' ' + t:28} {' '.join(cells)}  {verdict}")
    types = [sorted(w) for w in whole]
    if types[0] != types[1]:
        ok = False
        print(f"message types over the whole run differ: real {types[0]} simulated {types[1]}")
    else:
        print(f"same message types over the whole run: {', '.join(d + ' ' + t for d, t in types[0])}")
    # One-off messages (connect, spawn, stop) over the whole run: the same count on both sides.
    for key in sorted(set(whole[0]) & set(whole[1])):
        if key[1] in PERIODIC:
            continue
        n = [round(w[key][0] * a.workers * 2**40) for w in whole]
        verdict = "ok" if abs(n[0] - n[1]) <= max(1, n[0] // 10) else "count"
        ok &= verdict == "ok"
        print(f"{key[0] + ' ' + key[1]:28} whole run: real {n[0]}, simulated {n[1]}  {verdict}")
    print(f"master CPU over the window: real {cpu[0]:.1f} %, simulated {cpu[1]:.1f} % of a core")
    print("pool_validation: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
