#!/usr/bin/env python3
"""The control plane at N local agents (stub workers): connect, idle cost, propagation, the herd,
and the controller's own fan-out time.

Usage: .venv/bin/python bench/control_plane.py [--agents 1000] [--edits 10] [--gap 0.5]
       [--idle 30] [--herd-mib 4] [--pinned-rounds 3] [--nofile 1024] [--no-herd] [--no-build]

`fleet serve` starts with a soft open-files limit of --nofile (the hard limit unchanged), as from
a login shell with `ulimit -Sn 1024`; `fleet scale --backend local` then starts the agents (one
`sleep 3600` stub worker each, heartbeats every 5 s). Phases, in order:

1. connect: the wall time of `fleet scale --nodes N --wait`, which returns once every agent
   has checked in.
2. idle: after a settle, the controller's CPU (utime + stime from /proc/PID/stat, in % of one
   core) and its RSS (VmRSS, sampled every second, the highest) over --idle seconds; the
   agents' summed CPU over the same window, for context. Nothing queries the controller then.
3. burst: --edits edits of the locustfile, --gap seconds apart, each renamed into place
   atomically. Every agent must end on the last edit.
4. pinned: the controller's threads on CPU 0, every agent's threads (and their workers) on CPU 1
   (as `taskset -a -p` does), then --pinned-rounds single edits, each waited out. The fan-out
   time of a round is read from the controller (`GET /api/fanout`, docs/protocol.md): from the
   publication to the last manifest answer and the last complete bundle answer of that
   sequence, whichever is later. Affinity is reset afterwards.
5. herd (unless --no-herd): a --herd-mib MiB file of random bytes (incompressible) is added to
   the spec, so every agent downloads that much at once; then the burst again with it in the
   spec, and the pinned rounds again.

Propagation latency, defined: edit k is written at t_k (the instant of the rename). Each bundle
the controller publishes carries the locustfile of some edit j (read from the bundle itself);
it *covers* edit k when j >= k. An agent's latency for edit k is the instant it started
running the first covering bundle (its "starting N worker(s) on bundle ... (sequence S" log
line, millisecond wall clock, written just before the workers are spawned), minus t_k. An agent
that skips a bundle because a newer one arrived first is thus credited with the newer one.
p50/p99/max are over every (agent, edit) pair. The last edit's latencies are cross-checked
against the heartbeats' running.since_ms (taken just after the spawn, so the two differ by the
spawn time).

The fan-out time counts the agents' turnaround too: the controller answers a bundle request
only once an agent has verified the manifest and asked for it. So each pinned round also reports
the controller's CPU time inside the fan-out window (sampled every 20 ms): well under the
window means the controller was waiting for the agents.

Alongside each burst a probe opens a new TLS connection to /healthz every 0.25 s (the health
check latency an operator or a load balancer would see), and the script counts the
controller's `accept failed` log lines (the symptom of too few open files).

Budgets: idle CPU <= 2 % of one core and RSS <= 64 MiB; propagation p99 <= 1 s; fan-out
<= 1 s for 1000 agents with the controller on its own core. Ratios are printed against them and,
for the fan-out, against the propagation measured in the same pinned rounds. On a 2-core
machine the agents (N processes) and the controller share the CPU, so unpinned propagation
measures the machine as much as the controller; the pinned fan-out is the figure that
isolates the controller, and it still shares caches, memory bandwidth and the kernel's
loopback work with the agents.
"""
import argparse
import datetime
import glob
import io
import json
import os
import re
import resource
import ssl
import socket
import statistics
import tarfile
import threading
import time
import urllib.error

from common import PROFILE, Fleet, build_release, machine, pct

ap = argparse.ArgumentParser()
ap.add_argument("--agents", type=int, default=1000)
ap.add_argument("--edits", type=int, default=10)
ap.add_argument("--gap", type=float, default=0.5)
ap.add_argument("--idle", type=float, default=30.0)
ap.add_argument("--settle", type=float, default=10.0, help="seconds between connect and the idle window")
ap.add_argument("--herd-mib", type=float, default=4.0)
ap.add_argument("--pinned-rounds", type=int, default=3)
ap.add_argument("--nofile", type=int, default=1024, help="soft open-files limit for fleet serve")
ap.add_argument("--heartbeat-ms", type=int, default=5000)
ap.add_argument("--no-herd", action="store_true")
ap.add_argument("--no-build", action="store_true")
a = ap.parse_args()
if not a.no_build:
    build_release()

SPEC = "from locust import User, task\n\n\nclass Stub(User):\n    @task\n    def t(self):\n        pass\n"
START = re.compile(r"^(\S+) fleet-agent: starting .*\(sequence (\d+)")
TICK = os.sysconf("SC_CLK_TCK")
CPUS = sorted(os.sched_getaffinity(0))


def ms(x):
    return f"{x * 1000:.0f} ms"


# --- processes ---------------------------------------------------------------------------------

def soft_nofile():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(a.nofile, hard), hard))


def cpu_ticks(pid):
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(f[11]) + int(f[12])  # utime, stime (fields 14 and 15)


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def soft_limit_of(pid):
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith("Max open files"):
            return int(line.split()[3])
    return -1


def agent_pids(f):
    pids = []
    for p in glob.glob(os.path.join(f.dir, "local", "local-*", "agent.pid")):
        try:
            pids.append(int(open(p).read().strip()))
        except (OSError, ValueError):
            pass
    return pids


def tree(pid):
    """`pid`'s threads and its children's (the agents' stub workers)."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        out.append(int(tid))
        try:
            kids = open(f"/proc/{pid}/task/{tid}/children").read().split()
        except OSError:
            kids = []
        for k in kids:
            out += tree(int(k))
    return out


def pin(pids, cpus):
    n = 0
    for p in pids:
        for tid in tree(p):
            try:
                os.sched_setaffinity(tid, cpus)
                n += 1
            except OSError:
                pass
    return n


def accept_failures(f):
    try:
        return open(os.path.join(f.dir, "serve.log"), errors="replace").read().count("accept failed")
    except OSError:
        return 0


class CpuSampler(threading.Thread):
    """(time, utime + stime ticks) of one process every 20 ms, to tell how busy it was in a window."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.samples, self.halt = pid, [], threading.Event()

    def run(self):
        while not self.halt.is_set():
            self.samples.append((time.time(), cpu_ticks(self.pid)))
            self.halt.wait(0.02)

    def busy(self, t0, t1):
        """CPU seconds used between t0 and t1 (to the nearest samples; ticks are 10 ms)."""
        self.halt.set()
        self.join()
        at = lambda t: min(self.samples, key=lambda s: abs(s[0] - t))[1]
        return (at(t1) - at(t0)) / TICK


class HealthProbe(threading.Thread):
    """GET /healthz on a new TLS connection every 0.25 s until stopped."""

    def __init__(self, f):
        super().__init__(daemon=True)
        self.f, self.lat, self.failed, self.halt = f, [], 0, threading.Event()

    def run(self):
        while not self.halt.is_set():
            t = time.time()
            try:
                with socket.create_connection(("127.0.0.1", self.f.port), timeout=10) as s:
                    with self.f.ctx.wrap_socket(s, server_hostname="127.0.0.1") as tls:
                        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                        if not tls.recv(64).startswith(b"HTTP/1.1 200"):
                            raise OSError("not 200")
                self.lat.append(time.time() - t)
            except (OSError, ssl.SSLError):
                self.failed += 1
            self.halt.wait(0.25)

    def stop(self):
        self.halt.set()
        self.join()
        return self.lat, self.failed


# --- edits and what the agents did with them -----------------------------------------------------

def place(f, name, data):
    """Writes `data` beside the spec directory and renames it in: one event for the watcher."""
    tmp = os.path.join(f.dir, ".bench-" + name)
    with open(tmp, "wb") as out:
        out.write(data)
    t = time.time()
    os.rename(tmp, os.path.join(f.dir, "spec", name))
    return t


def edit(f, phase, k):
    return place(f, "locustfile.py", (SPEC + f"# edit {phase} {k}\n").encode())


def covered_edit(f, sha, phase):
    """Which edit of `phase` the bundle `sha` carries (None: another phase's)."""
    found = glob.glob(os.path.join(f.dir, "state", "**", f"{sha}.tar.gz"), recursive=True)
    if not found:
        raise SystemExit(f"bundle {sha[:12]} not found under the controller's state/; did its layout change?")
    with tarfile.open(fileobj=io.BytesIO(open(found[0], "rb").read()), mode="r:gz") as t:
        for m in t.getmembers():
            if os.path.basename(m.name) == "locustfile.py":
                text = t.extractfile(m).read().decode()
                hit = re.search(rf"^# edit {re.escape(phase)} (\d+)$", text, re.M)
                return int(hit.group(1)) if hit else None
    return None


def starts(f):
    """Per agent: [(unix time, sequence)] of every worker generation it started, in order."""
    out = {}
    for log in glob.glob(os.path.join(f.dir, "local", "local-*", "agent.log")):
        node = os.path.basename(os.path.dirname(log))
        seq = []
        for line in open(log, errors="replace"):
            m = START.match(line)
            if m:
                t = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
                seq.append((t, int(m.group(2))))
        out[node] = seq
    return out


API_FAILURES = [0]


def api(f, path):
    """`f.api`, but a timeout or refusal (the controller out of open files) is counted and read as
    "not yet", so that the waits carry on."""
    try:
        return f.api(path)
    except (OSError, urllib.error.URLError):
        API_FAILURES[0] += 1
        return None


def fanout_log(f):
    return {r["sequence"]: r for r in f.wait("GET /api/fanout", lambda: api(f, "/api/fanout"), timeout=300, every=1.0)}


def wait_all_on(f, sha, timeout=600):
    def done():
        nodes = api(f, "/api/nodes") or []
        ok = [n for n in nodes if (n.get("running") or {}).get("sha256") == sha]
        return nodes if len(ok) == a.agents and len(nodes) == a.agents else None
    return f.wait(f"all {a.agents} agents on {sha[:12]}", done, timeout=timeout, every=1.0)


def current_sha(f):
    cur = (api(f, "/api/spec") or {}).get("current")
    return cur and cur["sha256"]


def new_publication(f, old):
    return f.wait("a new publication", lambda: (lambda s: s if s and s != old else None)(current_sha(f)), timeout=120)


def run_edits(f, phase, writes, final_sha):
    """Latencies of every (agent, edit) and the fan-out records of the phase's publications."""
    nodes = wait_all_on(f, final_sha)
    time.sleep(0.5)
    log = fanout_log(f)
    cover = {}
    for seq, r in log.items():
        k = covered_edit(f, r["sha256"], phase)
        if k is not None:
            cover[seq] = k
    per_edit = {k: [] for k in writes}
    missing = 0
    for node, st in starts(f).items():
        for k, tk in writes.items():
            t = next((t for t, s in st if cover.get(s, -1) >= k), None)
            if t is None:
                missing += 1
            else:
                per_edit[k].append(t - tk)
    if missing:
        raise SystemExit(f"{phase}: {missing} (agent, edit) pairs with no covering bundle started; see the agents' logs")
    # Cross-check the log clock against the heartbeats for the last edit.
    last = max(writes)
    hb = sorted(n["running"]["since_ms"] / 1000 - writes[last] for n in nodes)
    lg = sorted(per_edit[last])
    drift = max(abs(x - y) for x, y in zip(hb, lg)) if hb else 0.0
    records = {cover[s]: log[s] for s in cover}
    return per_edit, records, drift


def summarise(name, per_edit, records, writes, drift, probe):
    allv = [x for v in per_edit.values() for x in v]
    p50, p99, mx = pct(allv, 50), pct(allv, 99), max(allv)
    print(f"\n[{name}] {len(writes)} edit(s), {len(allv)} (agent, edit) latencies")
    for k in sorted(per_edit):
        v = per_edit[k]
        r = records.get(k)
        pub = f"published +{ms(r['published_unix_ms'] / 1000 - writes[k])}" if r else "not published alone"
        fo = ""
        if r:
            last = max(x or 0 for x in (r["last_manifest_ms"], r["last_bundle_ms"])) / 1000
            fo = f", fan-out {ms(last)} ({r['manifests']} manifests, {r['bundles']} bundles)"
        print(f"  edit {k}: p50 {ms(pct(v, 50))} p99 {ms(pct(v, 99))} max {ms(max(v))}; {pub}{fo}")
    print(f"  all: p50 {ms(p50)}  p99 {ms(p99)}  max {ms(mx)}   p99 / budget 1 s: {p99:.2f}")
    print(f"  log vs heartbeat clock for the last edit: max difference {ms(drift)}")
    if probe:
        lat, failed = probe
        if lat:
            print(f"  /healthz on a new connection every 0.25 s: p50 {ms(statistics.median(lat))}, max {ms(max(lat))}, "
                  f"{failed} failed of {len(lat) + failed}")
    return dict(p50=p50, p99=p99, max=mx)


def burst(f, phase):
    old = current_sha(f)
    probe = HealthProbe(f)
    probe.start()
    before = accept_failures(f)
    writes = {}
    for k in range(1, a.edits + 1):
        writes[k] = edit(f, phase, k)
        if k < a.edits:
            time.sleep(max(0.0, writes[k] + a.gap - time.time()))
    final = f.wait(f"{phase}: the last edit published", lambda: (lambda s: s if s and s != old and covered_edit(f, s, phase) == a.edits else None)(current_sha(f)), timeout=120, every=0.1)
    per_edit, records, drift = run_edits(f, phase, writes, final)
    res = summarise(phase, per_edit, records, writes, drift, probe.stop())
    res["accept_failures"] = accept_failures(f) - before
    print(f"  controller `accept failed` log lines during the phase: {res['accept_failures']}; "
          f"operator API requests of this script that failed so far: {API_FAILURES[0]}")
    return res


def pinned(f, phase):
    ctl, agents = [f.serve.pid], agent_pids(f)
    if len(CPUS) < 2:
        print(f"\n[{phase}] skipped: one CPU, nothing to pin apart")
        return None
    n_ctl = pin(ctl, {CPUS[0]})
    n_ag = pin(agents, set(CPUS[1:]))
    print(f"\n[{phase}] controller on CPU {CPUS[0]} ({n_ctl} threads), {len(agents)} agents on CPU {CPUS[1:]} ({n_ag} threads and workers)")
    out = []
    try:
        for k in range(1, a.pinned_rounds + 1):
            old = current_sha(f)
            time.sleep(1.0)
            sampler = CpuSampler(f.serve.pid)
            sampler.start()
            writes = {k: edit(f, phase, k)}
            new = new_publication(f, old)
            # Until the fan-out is complete, only the small /api/fanout is asked for, not /api/nodes.
            seq = f.wait("the current sequence", lambda: (api(f, "/api/spec") or {}).get("current"))["sequence"]
            f.wait("the fan-out of the round", lambda: (lambda r: r and r["manifests"] >= a.agents and r["bundles"] >= a.agents)(
                fanout_log(f).get(seq)), timeout=600, every=0.5)
            per_edit, records, drift = run_edits(f, phase, writes, new)
            r = records[k]
            fo = max(r["last_manifest_ms"] or 0, r["last_bundle_ms"] or 0) / 1000
            t_pub = r["published_unix_ms"] / 1000
            busy = sampler.busy(t_pub, t_pub + fo)
            v = per_edit[k]
            out.append(dict(fanout=fo, busy=busy, manifests=r["manifests"], bundles=r["bundles"], p99=pct(v, 99), max=max(v),
                            published=t_pub - writes[k], last_manifest=(r["last_manifest_ms"] or 0) / 1000,
                            last_bundle=(r["last_bundle_ms"] or 0) / 1000))
            o = out[-1]
            print(f"  round {k}: fan-out {ms(fo)} (last manifest +{ms(o['last_manifest'])}, last bundle +{ms(o['last_bundle'])}; "
                  f"{o['manifests']}/{a.agents} manifests, {o['bundles']}/{a.agents} bundles), controller busy {ms(busy)} of it "
                  f"({busy / fo * 100 if fo else 0:.0f} %); agents: p99 {ms(o['p99'])}, max {ms(o['max'])} from the write "
                  f"(publication at +{ms(o['published'])})")
    finally:
        pin([f.serve.pid], set(CPUS))
        pin(agent_pids(f), set(CPUS))
    worst = max(o["fanout"] for o in out)
    p99 = max(o["p99"] for o in out)
    busy = max(o["busy"] for o in out)
    print(f"  fan-out, worst round: {ms(worst)}   / budget 1 s: {worst:.2f}   / agents' p99 in the same rounds: {worst / p99:.2f}")
    print(f"  controller CPU during the fan-out, worst round: {ms(busy)}; where it is well under the fan-out time, the "
          f"controller was waiting for the agents (one core for {a.agents} of them), not the other way round")
    return dict(fanout=worst, p99=p99, busy=busy, rounds=out)


# --- the run -------------------------------------------------------------------------------------

f = Fleet(
    managed_master=False,
    worker_command=["sleep", "3600"],
    agent_settings={"heartbeat_ms": a.heartbeat_ms, "join_grace_ms": 200, "stable_ms": 2000},
)
results = {}
try:
    f.write_spec(SPEC)
    load0 = os.getloadavg()
    f.start(preexec_fn=soft_nofile)
    pid = f.serve.pid
    f.wait("first publication", f.current_sha)
    print(f"{a.agents} local agents, stub workers, heartbeats every {a.heartbeat_ms} ms; {PROFILE} build; "
          f"fleet serve pid {pid} with soft open-files limit {soft_limit_of(pid)}")

    t = time.time()
    before = accept_failures(f)
    f.cli("scale", "--nodes", str(a.agents), "--wait", "900")
    results["connect"] = time.time() - t
    print(f"\n[connect] fleet scale --nodes {a.agents} until all checked in: {results['connect']:.1f} s "
          f"({results['connect'] / a.agents * 1000:.1f} ms per agent); `accept failed` lines: {accept_failures(f) - before}")

    wait_all_on(f, f.wait("the current bundle", lambda: current_sha(f)))
    time.sleep(a.settle)
    agents = agent_pids(f)
    c0, a0, t0 = cpu_ticks(pid), sum(cpu_ticks(p) for p in agents), time.time()
    rss = []
    while time.time() - t0 < a.idle:
        rss.append(rss_mib(pid))
        time.sleep(1.0)
    c1, a1, t1 = cpu_ticks(pid), sum(cpu_ticks(p) for p in agents), time.time()
    cpu = (c1 - c0) / TICK / (t1 - t0) * 100
    agents_cpu = (a1 - a0) / TICK / (t1 - t0) * 100
    results["idle"] = dict(cpu=cpu, rss=max(rss))
    print(f"\n[idle] over {t1 - t0:.0f} s: controller CPU {cpu:.2f} % of one core (/ budget 2 %: {cpu / 2:.2f}), "
          f"RSS max {max(rss):.1f} MiB (/ budget 64 MiB: {max(rss) / 64:.2f}); the {len(agents)} agents together: {agents_cpu:.1f} % of one core")

    results["burst"] = burst(f, "burst")
    results["pinned"] = pinned(f, "pinned")

    if not a.no_herd:
        size = int(a.herd_mib * (1 << 20))
        old = current_sha(f)
        probe = HealthProbe(f)
        probe.start()
        before = accept_failures(f)
        writes = {0: place(f, "data.bin", os.urandom(size))}
        edit(f, "herd", 0)
        new = new_publication(f, old)
        per_edit, records, drift = run_edits(f, "herd", writes, new)
        results["herd"] = summarise(f"herd: {a.herd_mib:g} MiB of random data added, every agent downloads it at once",
                                    per_edit, records, writes, drift, probe.stop())
        print(f"  controller `accept failed` log lines during the phase: {accept_failures(f) - before}")
        results["herd_burst"] = burst(f, "herd-burst")
        results["herd_pinned"] = pinned(f, "herd-pinned")

    load1 = os.getloadavg()
    print(f"\nmachine: {machine()}; load average (1 min) {load0[0]:.1f} at the start, {load1[0]:.1f} at the end")
    b = results["burst"]
    print(f"summary: connect {results['connect']:.1f} s; idle CPU {results['idle']['cpu']:.2f} % / RSS {results['idle']['rss']:.1f} MiB; "
          f"burst p50/p99/max {ms(b['p50'])}/{ms(b['p99'])}/{ms(b['max'])}", end="")
    if results["pinned"]:
        print(f"; pinned fan-out {ms(results['pinned']['fanout'])} "
              f"(controller busy {ms(results['pinned']['busy'])})", end="")
    if "herd" in results:
        h, hb = results["herd"], results["herd_burst"]
        print(f"; herd p99 {ms(h['p99'])}, herd burst p99 {ms(hb['p99'])}", end="")
        if results["herd_pinned"]:
            print(f", herd pinned fan-out {ms(results['herd_pinned']['fanout'])} "
                  f"(controller busy {ms(results['herd_pinned']['busy'])})", end="")
    print()
    print(json.dumps({"agents": a.agents, "profile": PROFILE, **results}, default=float))
    print(f"note: {a.agents} agents and the controller share {len(CPUS)} cores; unpinned propagation is bounded by how fast "
          f"the machine runs {a.agents} agents' downloads, unpacks and restarts, not by the controller alone. The pinned "
          f"fan-out isolates the controller's CPU, not its caches, memory bandwidth or the kernel's loopback work.")
finally:
    f.close()
