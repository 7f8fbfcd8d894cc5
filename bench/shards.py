#!/usr/bin/env python3
"""Sharded masters against one master: 3000 simulated workers over the shards `auto` picks,
and the same 3000 on one master, in the same run.

Usage: .venv/bin/python bench/shards.py [--workers 3000] [--shards 0] [--capacity 2500]
           [--users 0] [--endpoints 1,50] [--settle 10] [--seconds 30]
           [--master-cores 0] [--pool-cores 1] [--serve-core 1] [--no-build]

For each endpoint count, two runs of the release `fleet serve` (a fresh fleet directory each,
managed masters, the spec tests/support/pool_locustfile.py): the baseline with
`[master] shards = 1` and one tests/support/worker_pool.py pool of all --workers simulated
workers, then `shards = K` with K pools, pool k holding its share of the workers and connected
straight to shard k's ZMQ port (`port + k`), as an agent that picked shard k would be.
K is --shards, or with 0 what `shards = "auto"` picks for --workers at --capacity workers per
master (ceil(workers / capacity): 2 for 3000 at the default 2500): that run then configures
`shards = "auto"` and the controller's expected worker count (state/master-expected.json, as a
previous `fleet serve` leaves it), and checks that the controller started K masters. Measured in each run:
- ready: pools started -> every worker of every pool has its master's `ack`;
- dispatch: `POST /api/swarm` of --users users (0: 10 per worker) at a spawn rate of all of
  them (the controller splits both over the shards by connected workers) -> the last worker of
  the last pool has the master's `spawning_complete` (Locust's own "all users spawned");
  per shard, the same for its pool; merged view: the same `POST` -> `GET /api/stats` (read
  every 200 ms, it asks every master) shows --users users, what the operator sees;
- each master's CPU (% of one core: utime + stime of all its threads from /proc) and peak RSS
  over a window of --seconds with the swarm running; the controller's CPU and the pools' CPU
  over the same window;
- heartbeat round trip (a worker's heartbeat -> its master's reply): mean of the per-second
  medians and the worst per-second p95, over all pools;
- lost: workers the masters no longer count at the end plus workers a pool saw give up;
  missing: times a master logged a worker as missing;
- the check that each shard runs the share the controller recorded for it, and that the
  shares add up to --users.
Ratios: the sharded run's highest per-shard CPU, dispatch and heartbeat p95 over the baseline's.

Pinning: every master's threads on --master-cores (shard k on the (k mod n)-th; all on core 0
by default), the pools on --pool-cores, `fleet serve` on --serve-core. On a 2-core machine the
defaults put all masters on core 0 and the pools and the controller on core 1: the shards
then share one core: while their sum stays well under 100 %, each shard's own CPU is what it
would use on a core of its own (the script warns when it does not), and that per-shard figure
is the one that says whether a shard fits one core. Give each shard its own core on a bigger machine
(`--master-cores 0,1 --pool-cores 2,3 --serve-core 3`).
"""
import argparse
import glob
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request

from common import LOCUST, PROFILE, REL, ROOT, Fleet, cpu_s, machine, pinned, rss

SUPPORT = os.path.join(ROOT, "tests", "support")
PYTHON = os.path.join(os.path.dirname(LOCUST), "python")
MiB = 1024 * 1024

ap = argparse.ArgumentParser()
ap.add_argument("--workers", type=int, default=3000)
ap.add_argument("--shards", type=int, default=0, help="shards of the sharded run (0: what \"auto\" picks)")
ap.add_argument("--capacity", type=int, default=2500, help="workers per master for \"auto\" ([master] capacity)")
ap.add_argument("--users", type=int, default=0, help="users of the swarm (0: 10 per worker)")
ap.add_argument("--endpoints", default="1,50")
ap.add_argument("--spread", type=int, default=20, help="distinct response times per endpoint")
ap.add_argument("--connect-rate", type=float, default=0, help="workers each pool connects per second (0: all at once)")
ap.add_argument("--settle", type=float, default=10, help="seconds between all connected and the swarm")
ap.add_argument("--seconds", type=float, default=30, help="measurement window with the swarm running")
ap.add_argument("--master-cores", default="0", help="cores for the masters: shard k on the (k mod n)-th")
ap.add_argument("--pool-cores", default="1", help="cores for the pools: pool k on the (k mod n)-th")
ap.add_argument("--serve-core", type=int, default=1, help="core for `fleet serve`")
ap.add_argument("--no-build", action="store_true")
a = ap.parse_args()

MASTER_CORES = [int(c) for c in a.master_cores.split(",")]
POOL_CORES = [int(c) for c in a.pool_cores.split(",")]
USERS = a.users or 10 * a.workers


def auto_shards(workers, capacity):
    """What `[master] shards = "auto"` runs for `workers` (controller/src/master/capacity.rs)."""
    return max(1, -(-workers // max(1, capacity)))


def split(total, parts):
    """`total` over `parts`, the first ones taking the remainder."""
    return [total // parts + (1 if k < total % parts else 0) for k in range(parts)]


CORES = os.sched_getaffinity(0)
if not set(MASTER_CORES + POOL_CORES + [a.serve_core]) <= CORES:
    raise SystemExit(f"shards: this process may run on cores {sorted(CORES)} only: choose --master-cores, --pool-cores and --serve-core among them")
NEED = 2 * a.workers + 64  # the pool of the baseline: two descriptors per worker
if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < NEED:
    raise SystemExit(f"shards: {a.workers} workers in one pool need {NEED} open files: raise the hard limit (ulimit -Hn {NEED})")
SHARDS = a.shards or auto_shards(a.workers, a.capacity)
if SHARDS < 2:
    raise SystemExit(f"shards: {a.workers} workers at capacity {a.capacity} need one master: pass --shards 2 or more")


def free_block(n):
    """`n` consecutive ports free now on 127.0.0.1, below the ephemeral range (as tests/tests/shards.rs)."""
    for first in range(20_000 + os.getpid() % 10_000, 32_000 - n, 97):
        socks = []
        try:
            for p in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise SystemExit(f"shards: no {n} consecutive free ports between 20000 and 32000: free some and run again")


def pin_threads(pid, core):
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {core})


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


class Pool:
    """One worker_pool.py process; its status lines (one a second) read in a thread."""

    def __init__(self, workers, port, endpoints, seed, core):
        self.workers = workers
        self.lines = []
        self.proc = subprocess.Popen(
            [PYTHON, "worker_pool.py", "--workers", str(workers), "--master", f"127.0.0.1:{port}", "--endpoints", str(endpoints),
             "--spread", str(a.spread), "--seed", str(seed), "--connect-rate", str(a.connect_rate)],
            cwd=SUPPORT, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, preexec_fn=pinned(core))
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def last(self):
        return self.lines[-1] if self.lines else {}

    def done_after(self, t):
        """When the last of its workers had the master's `spawning_complete`, if after `t`."""
        at = self.last().get("all_master_spawning_complete_at") or 0
        return at if at > t else None


class Run:
    """One `fleet serve` with `shards` masters and one pool per master."""

    def __init__(self, shards, endpoints, auto=False):
        """`auto`: `shards = "auto"`, the controller told to expect --workers, and `shards` is what
        it must pick."""
        self.shards, self.endpoints = shards, endpoints
        self.f = Fleet(managed_master=True)
        spec = os.path.join(self.f.dir, "spec")
        shutil.copy(os.path.join(SUPPORT, "pool_traffic.py"), spec)
        self.f.write_spec(open(os.path.join(SUPPORT, "pool_locustfile.py")).read())
        zmq = free_block(2 * shards)
        self.zmq, web = zmq, zmq + shards
        cfg = os.path.join(self.f.dir, "fleet.toml")
        text = open(cfg).read()
        port, url = f"port = {self.f.master_port}\n", f"http://127.0.0.1:{self.f.web_port}/locust"
        if port not in text or url not in text:
            raise SystemExit(f"shards: {cfg} has no `{port.strip()}` or `{url}` to edit: bench/common.py and this script disagree")
        setting = f'shards = "auto"\ncapacity = {a.capacity}' if auto else f"shards = {shards}"
        text = text.replace(port, f"port = {zmq}\n{setting}\n").replace(url, f"http://127.0.0.1:{web}/locust")
        open(cfg, "w").write(text)
        if auto:  # what a previous `fleet serve` keeps for the next start's "auto"
            os.makedirs(os.path.join(self.f.dir, "state"), exist_ok=True)
            open(os.path.join(self.f.dir, "state", "master-expected.json"), "w").write(f"{a.workers}\n")
        self.pools, self.pids = [], []

    def start(self):
        self.f.start(preexec_fn=pinned(a.serve_core))
        view = self.f.wait("the masters running", self.masters_up, timeout=120, every=0.2)
        if len(view["shards"]) != self.shards:
            raise SystemExit(f"shards: the controller runs {len(view['shards'])} masters, not the {self.shards} expected for "
                             f"{a.workers} workers at capacity {a.capacity}: pass --shards")
        self.pids = [s["pid"] for s in view["shards"]]
        for k, pid in enumerate(self.pids):
            pin_threads(pid, MASTER_CORES[k % len(MASTER_CORES)])
        for k in range(self.shards):
            self.f.wait(f"shard {k}'s web API", lambda: self.shard_stats(k), timeout=60, every=0.2)

    def masters_up(self):
        try:
            m = self.f.api("/api/master")
        except OSError:
            return None
        s = m.get("shards") or []
        return m if s and all(isinstance(x.get("pid"), int) for x in s) else None

    def shard_stats(self, k):
        try:
            return self.f.api("/locust/stats/requests" if k == 0 else f"/locust/{k}/stats/requests")
        except OSError:
            return None

    def all_ready(self):
        for k, p in enumerate(self.pools):
            if p.proc.poll() is not None and not p.last().get("all_ready_s"):
                raise SystemExit(f"shards: pool {k} exited ({p.proc.returncode}) before its workers connected: "
                                 f"run tests/support/worker_pool.py --workers {p.workers} by hand to see why")
        return all(p.last().get("all_ready_s") for p in self.pools)

    def merged_users(self):
        try:
            return self.f.api("/api/stats").get("user_count")
        except OSError:
            return None

    def swarm(self, users, rate):
        req = urllib.request.Request(f"https://127.0.0.1:{self.f.port}/api/swarm", method="POST",
                                     data=json.dumps({"users": users, "spawn_rate": rate}).encode(),
                                     headers={"Authorization": f"Bearer {self.f.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=self.f.ctx, timeout=120) as r:
            r.read()

    def measure(self):
        f, shares = self.f, split(a.workers, self.shards)
        self.pools = [Pool(n, self.zmq + k, self.endpoints, a.workers + k, POOL_CORES[k % len(POOL_CORES)])
                      for k, n in enumerate(shares)]
        f.wait(f"{a.workers} workers connected", self.all_ready, timeout=300, every=0.1)
        ready = max(p.last()["all_ready_s"] for p in self.pools)  # each from its pool's start
        # The controller splits the swarm by the workers it has seen: wait until it has seen all.
        f.wait("the controller counting every worker",
               lambda: (lambda m: m and [s.get("workers") for s in m["shards"]] == shares)(self.masters_up()), timeout=60, every=0.2)
        time.sleep(a.settle)
        t_post = time.time()
        self.swarm(USERS, USERS)
        # The pools are watched every 20 ms (free for the masters); the merged view, which reads
        # every master, every 200 ms.
        merged, next_read = None, t_post
        while not all(p.done_after(t_post) for p in self.pools) or merged is None:
            now = time.time()
            if now - t_post > 600:
                raise SystemExit("shards: timed out after 600 s waiting for the swarm dispatched: see the masters' logs")
            if merged is None and now >= next_read:
                next_read = now + 0.2
                if self.merged_users() == USERS:
                    merged = time.time() - t_post
            time.sleep(0.02)
        per_shard_dispatch = [p.done_after(t_post) - t_post for p in self.pools]
        procs = {"serve": f.serve.pid, **{f"pool{k}": p.proc.pid for k, p in enumerate(self.pools)}}
        c0 = {pid: cpu_s(pid) for pid in self.pids}
        o0 = {name: cpu_s(pid) for name, pid in procs.items()}
        t0, k0 = time.time(), [len(p.lines) for p in self.pools]
        peak = {pid: 0 for pid in self.pids}
        while time.time() - t0 < a.seconds:
            for pid in self.pids:
                peak[pid] = max(peak[pid], rss(pid))
            time.sleep(1)
        wall = time.time() - t0
        cpu = [(cpu_s(pid) - c0[pid]) / wall * 100 for pid in self.pids]
        other = {name: (cpu_s(pid) - o0[name]) / wall * 100 for name, pid in procs.items()}
        window = [line["hb_rtt_ms"] for p, k in zip(self.pools, k0) for line in p.lines[k:] if line["hb_rtt_ms"]["n"]]
        view = self.masters_up() or {"shards": [{}] * self.shards}
        counted = [s.get("workers") or 0 for s in view["shards"]]
        running = [s.get("users") for s in view["shards"]]
        recorded = [(s.get("swarm") or {}).get("users") for s in view["shards"]]
        lost = a.workers - sum(counted) + sum(sum(p.last().get("lost", {}).values()) for p in self.pools)
        missing = 0
        for k in range(self.shards):
            log = os.path.join(f.dir, "state", "master.log" if k == 0 else f"master-{k}.log")
            if os.path.exists(log):
                missing += sum(1 for line in open(log, errors="replace") if "setting state to missing" in line)
        moved = [k for k, pid in enumerate(self.pids) if os.sched_getaffinity(pid) != {MASTER_CORES[k % len(MASTER_CORES)]}]
        restarts = sum(s.get("restarts") or 0 for s in view["shards"])
        return {
            "endpoints": self.endpoints, "shards": self.shards, "workers": shares, "ready_s": ready,
            "dispatch_s": max(per_shard_dispatch), "dispatch_per_shard_s": per_shard_dispatch, "merged_s": merged,
            "users": sum(p.last().get("users", 0) for p in self.pools), "target_users": USERS,
            "shard_users": running, "shard_shares": recorded,
            "cpu": cpu, "rss_mib": [peak[pid] / MiB for pid in self.pids],
            "hb_p50": sum(w["p50"] for w in window) / len(window) if window else float("nan"),
            "hb_p95": max((w["p95"] for w in window), default=float("nan")),
            "lost": lost, "missing": missing, "restarts": restarts, "unpinned": moved,
            "serve_cpu": other["serve"], "pool_cpu": [other[f"pool{k}"] for k in range(self.shards)],
        }

    def close(self):
        keep = os.path.join(LOGS, f"{self.shards}-shards-{self.endpoints}-endpoints")
        os.makedirs(keep, exist_ok=True)
        for log in glob.glob(os.path.join(self.f.dir, "state", "master*.log")) + [os.path.join(self.f.dir, "serve.log")]:
            if os.path.exists(log):
                shutil.copy(log, keep)
        self.f.close()  # stops the masters, whose `quit` ends every worker, and so the pools
        for p in self.pools:
            try:
                p.proc.wait(60)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()
        for pid in self.pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def build():
    profile = [] if PROFILE == "debug" else ["--release"]
    subprocess.run(["cargo", "build", *profile, "-p", "fleet", "--bin", "fleet", "--locked"], cwd=ROOT, check=True)


if not a.no_build:
    build()
if not os.path.exists(os.path.join(REL, "fleet")):
    raise SystemExit(f"shards: no {os.path.join(REL, 'fleet')}: run without --no-build to build it")

LOGS = tempfile.mkdtemp(prefix="fleet-bench-shards-")  # the masters' and controllers' logs, kept
results = []
for e in [int(x) for x in a.endpoints.split(",")]:
    for shards in (1, SHARDS):
        run = Run(shards, e, auto=shards > 1 and not a.shards)
        try:
            run.start()
            r = run.measure()
        finally:
            run.close()
        results.append(r)
        print(json.dumps(r), flush=True)


print(f"\nmasters' and controllers' logs in {LOGS}")


def cells(values, fmt):
    return " / ".join(fmt.format(v) for v in values)


print(f"\n{a.workers} simulated workers, {USERS} users, {a.spread} distinct response times per endpoint, {a.seconds:.0f} s window; "
      f"fleet {PROFILE} build")
print(f"masters on cores {a.master_cores}, pools on {a.pool_cores}, `fleet serve` on {a.serve_core}; {machine()}\n")
print("| endpoints | shards | workers per shard | ready s | dispatch s (per shard) | merged view s | master CPU % per shard | max shard CPU % | "
      "RSS MiB per shard | hb p50 ms | hb p95 ms | lost | missing | controller CPU % | pool CPU % |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in results:
    print(f"| {r['endpoints']} | {r['shards']} | {cells(r['workers'], '{}')} | {r['ready_s']:.1f} | "
          f"{r['dispatch_s']:.2f} ({cells(r['dispatch_per_shard_s'], '{:.2f}')}) | {r['merged_s']:.1f} | {cells(r['cpu'], '{:.0f}')} | {max(r['cpu']):.0f} | "
          f"{cells(r['rss_mib'], '{:.0f}')} | {r['hb_p50']:.1f} | {r['hb_p95']:.1f} | {r['lost']} | {r['missing']} | "
          f"{r['serve_cpu']:.0f} | {cells(r['pool_cpu'], '{:.0f}')} |")
print("\nsharded / one master, same endpoints, same run:\n")
print("| endpoints | shards | max shard CPU | sum of shards' CPU | dispatch | merged view | hb p95 | max shard RSS |")
print("|---|---|---|---|---|---|---|---|")
for e in sorted({r["endpoints"] for r in results}):
    base = next(r for r in results if r["endpoints"] == e and r["shards"] == 1)
    for r in (r for r in results if r["endpoints"] == e and r["shards"] > 1):
        print(f"| {e} | {r['shards']} | {max(r['cpu']) / base['cpu'][0]:.2f} | {sum(r['cpu']) / base['cpu'][0]:.2f} | "
              f"{r['dispatch_s'] / base['dispatch_s']:.2f} | {r['merged_s'] / base['merged_s']:.2f} | {r['hb_p95'] / base['hb_p95']:.2f} | "
              f"{max(r['rss_mib']) / base['rss_mib'][0]:.2f} |")
for r in results:
    name = f"{r['shards']} shard(s), {r['endpoints']} endpoint(s)"
    if r["users"] != USERS or sum(r["shard_shares"] or [0]) != USERS or r["shard_users"] != r["shard_shares"]:
        print(f"warning: {name}: the pools ran {r['users']} users, the shards {r['shard_users']} of shares {r['shard_shares']}, "
              f"not {USERS} in all")
    if r["restarts"] or r["unpinned"]:
        print(f"warning: {name}: {r['restarts']} master restart(s), shards {r['unpinned']} off their core: the row is not valid")
    for core in set(MASTER_CORES):
        on = [c for k, c in enumerate(r["cpu"]) if MASTER_CORES[k % len(MASTER_CORES)] == core]
        if len(on) > 1 and sum(on) > 80:
            print(f"note: {name}: the shards on core {core} used {sum(on):.0f} % of it together; "
                  "each may have had less than it would on a core of its own")
    for k, c in enumerate(r["pool_cpu"]):
        if c > 80:
            print(f"note: {name}: pool {k} used {c:.0f} % of its core; the row may show the pool's limit rather than the master's")
