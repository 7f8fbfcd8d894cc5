#!/usr/bin/env python3
"""A simulated pool of Locust workers: one process holding N workers, each its own ZMQ DEALER
socket, speaking Locust 2.47's worker protocol to a real master at the real cadence.

    worker_pool.py --workers N --master 127.0.0.1:5557 [--endpoints 1] [--spread 20]
        [--rps-per-user 1] [--fail-ratio 0.01] [--seed 1] [--connect-rate 0]

What each simulated worker does is what `locust.runners.WorkerRunner` does (docs/benchmarks.md,
"One master's capacity", says how it was checked):
- connects with the identity `<hostname>_<32 hex>`, sends `client_ready` with the Locust
  version and repeats it every 5 s until the master's `ack` (gives up after 60 tries);
- from the `ack` on: `heartbeat` every second (`state`, `current_cpu_usage`,
  `current_memory_usage`), `stats` every 3 s (`stats`, `stats_total`, `errors`,
  `user_classes_count`, `user_count`; the requests come from pool_traffic.Traffic at
  `--rps-per-user` per running user), and `logs` when it has new log lines (its start-up
  lines once, then one per stop or reconnect), checked every 10 s;
- `spawn`: `spawning`, then (older timestamps ignored) takes the user counts and answers
  `spawning_complete` with them; `stop`: `client_stopped`, then after the job's
  `stop_timeout` `client_ready` again; `quit`: a last `stats`, then `quit`, and the worker is
  gone; `reconnect`: a new socket with the same identity; a master silent for 60 s: `quit`.
Messages are msgpack `(type, data, node_id)`, as locust.rpc.protocol.Message.

One thread runs every worker: an epoll loop over the sockets' ZMQ descriptors and a timer
heap (ZMQ's own I/O thread moves the bytes). Each worker's decisions are `SimWorker` methods
taking `now` and returning the messages to send, so they are tested without sockets.

Stdout gets one JSON line per second: workers connected (acked), running, users (and the
wall-clock time they last changed), workers that saw the master's `spawning_complete` since
their last `spawn` (and when the last of them did), heartbeat round trip (master's reply to a worker's
heartbeat, ms: p50/p95/max over the last second), workers lost, messages sent and received
by type, and the pool's own CPU seconds. Exits when every worker has quit.
"""
import argparse
import collections
import heapq
import json
import os
import random
import resource
import select
import socket
import sys
import time

import msgpack
import zmq

from pool_traffic import USER_CLASS, Traffic

# locust/runners.py
HEARTBEAT_INTERVAL = 1.0
WORKER_REPORT_INTERVAL = 3.0
WORKER_LOG_REPORT_INTERVAL = 10.0
CONNECT_TIMEOUT = 5.0
CONNECT_RETRY_COUNT = 60
MASTER_HEARTBEAT_TIMEOUT = 60.0
CPU_MONITOR_INTERVAL = 10.0

INIT, SPAWNING, RUNNING = "ready", "spawning", "running"


def locust_version():
    from importlib.metadata import version
    return version("locust")


class SimWorker:
    """One worker's protocol state. `start`, `receive` and `due` return the messages to send
    as (type, data) pairs; `next_due` is when `due` next has something to do."""

    def __init__(self, node_id, traffic, rng, version, rps_per_user=1.0, user_class=USER_CLASS, spread_phases=False):
        self.node_id = node_id
        # Real workers start over seconds, so their 1 s heartbeats and 3 s reports fall at
        # random phases; a pool that connects all at once would beat in lock-step, which costs
        # the master about three times less CPU and flatters it (docs/locust.md).
        self.spread_phases = spread_phases
        self.traffic = traffic
        self.rng = rng
        self.version = version
        self.rps = rps_per_user
        self.user_class = user_class
        self.state = INIT
        self.users = {user_class: 0}
        self.acked = False
        self.index = None
        self.gone = None  # why the worker is gone: "quit", "master-silent", "no-ack"
        self.reconnect = False  # the loop gives the worker a new socket, then clears this
        self.master_done = False  # got the master's spawning_complete since the last spawn
        self.tries = 0
        self.retry_at = None
        self.hb_at = self.stats_at = self.logs_at = None
        self.ready_at = None  # client_ready again after a stop
        self.cpu_at = None
        self.cpu = 0.0
        self.last_master_hb = None
        self.last_spawn_ts = 0.0
        self.stop_timeout = 0.0
        self.report_from = None  # start of the current report's window
        self.owed = 0.0  # requests made since then (fractional), up to `owed_at`
        self.owed_at = None
        self.log_lines = 0  # lines logged so far; `logs` sends them when there are new ones
        self.logs_sent = 0
        self.pending_hb = collections.deque()  # send times of unanswered heartbeats
        self.rtts = []  # heartbeat round trips (s) not yet collected by the loop

    @property
    def user_count(self):
        return sum(self.users.values())

    def start(self, now):
        self.tries = 1
        self.retry_at = now + CONNECT_TIMEOUT
        self.log_lines = 1  # "Starting Locust <version>"
        return [("client_ready", self.version)]

    def next_due(self):
        times = [t for t in (self.retry_at, self.hb_at, self.stats_at, self.logs_at, self.ready_at, self.cpu_at)
                 if t is not None]
        return min(times) if times and not self.gone else None

    def receive(self, mtype, data, now):
        out = []
        if self.gone:
            return out
        if mtype == "ack":
            if not self.acked:
                self.acked = True
                self.retry_at = None
                self.last_master_hb = now
                self.hb_at = self.stats_at = self.logs_at = now
                if self.spread_phases:
                    self.hb_at = now + self.rng.random() * HEARTBEAT_INTERVAL
                    self.stats_at = now + self.rng.random() * WORKER_REPORT_INTERVAL
                self.cpu_at = now + CPU_MONITOR_INTERVAL
                self.report_from = self.owed_at = now
            self.index = (data or {}).get("index")
        elif mtype == "heartbeat":
            self.last_master_hb = now
            if self.pending_hb:
                self.rtts.append(now - self.pending_hb.popleft())
        elif mtype == "spawn":
            out.append(("spawning", None))
            if data["timestamp"] <= self.last_spawn_ts:
                return out
            self.last_spawn_ts = data["timestamp"]
            self.stop_timeout = data.get("stop_timeout") or 0.0
            self._accrue(now)
            if self.state == INIT:
                self.report_from, self.owed = now, 0.0  # a new test: the worker clears its stats
            self.users = {self.user_class: 0, **data["user_classes_count"]}
            self.state = RUNNING
            self.master_done = False
            out.append(("spawning_complete", {"user_classes_count": dict(self.users), "user_count": self.user_count}))
        elif mtype == "spawning_complete":
            self.master_done = True
        elif mtype == "stop":
            self._accrue(now)
            self.users = {self.user_class: 0}
            out.append(("client_stopped", None))
            self.pending_hb = None  # the master forgets the worker until it is ready again
            self.ready_at = now + self.stop_timeout
        elif mtype == "quit":
            out += self._quit(now, "quit")
        elif mtype == "reconnect":
            self.reconnect = True
            self.log_lines += 2  # "Received reconnect message ..." and "Reset connection to master"
        return out

    def _quit(self, now, why):
        report = self._report(now)
        self.users = {self.user_class: 0}
        self.gone = why
        return [("stats", report), ("quit", None)]

    def due(self, now):
        out = []
        if self.gone:
            return out
        if self.retry_at is not None and now >= self.retry_at:
            if self.tries > CONNECT_RETRY_COUNT:
                self.gone = "no-ack"
                return out
            self.tries += 1
            self.retry_at = now + CONNECT_TIMEOUT
            out.append(("client_ready", self.version))
        if self.ready_at is not None and now >= self.ready_at:
            self.ready_at = None
            self.state = INIT
            self.pending_hb = collections.deque()
            out.append(("client_ready", self.version))
        if self.cpu_at is not None and now >= self.cpu_at:
            self.cpu_at = now + CPU_MONITOR_INTERVAL
            self.cpu = round(0.5 + 0.15 * self.user_count + self.rng.random(), 1)
        if self.hb_at is not None and now >= self.hb_at:
            self.hb_at = now + HEARTBEAT_INTERVAL  # gevent.sleep after each: drifts, never bursts
            if self.last_master_hb is not None and now - self.last_master_hb > MASTER_HEARTBEAT_TIMEOUT:
                return self._quit(now, "master-silent")
            if self.pending_hb is not None:
                self.pending_hb.append(now)
            out.append(("heartbeat", {"state": self.state, "current_cpu_usage": self.cpu,
                                      "current_memory_usage": 48_000_000 + self.user_count * 150_000}))
        if self.stats_at is not None and now >= self.stats_at:
            self.stats_at = now + WORKER_REPORT_INTERVAL
            out.append(("stats", self._report(now)))
        if self.logs_at is not None and now >= self.logs_at:
            self.logs_at = now + WORKER_LOG_REPORT_INTERVAL
            if self.log_lines > self.logs_sent:
                self.logs_sent = self.log_lines
                stamp = time.strftime("%Y-%m-%d %H:%M:%S,000")
                lines = [f"[{stamp}] {self.node_id.split('_')[0]}/INFO/locust.main: Starting Locust {self.version}"]
                lines += [f"[{stamp}] {self.node_id.split('_')[0]}/INFO/locust.runners: line {k}" for k in range(1, self.log_lines)]
                out.append(("logs", {"worker_id": self.node_id, "logs": lines}))
        return out

    def _accrue(self, now):
        """Counts the requests the running users made since `owed_at` (before the count changes)."""
        if self.owed_at is not None:
            self.owed += self.user_count * self.rps * max(0.0, now - self.owed_at)
        self.owed_at = now

    def _report(self, now):
        self._accrue(now)
        since = self.report_from if self.report_from is not None else now
        n = int(self.owed + 1e-9)
        self.owed -= n
        self.report_from = now
        data = self.traffic.report(n, since, now, self.rng)
        data["user_classes_count"] = dict(self.users)
        data["user_count"] = self.user_count
        return data


class Pool:
    """N SimWorkers on real sockets, driven by one epoll loop."""

    def __init__(self, args):
        self.args = args
        raise_nofile()
        self.ctx = zmq.Context()
        self.ctx.setsockopt(zmq.LINGER, 0)
        self.ctx.set(zmq.MAX_SOCKETS, args.workers * 2 + 64)
        self.epoll = select.epoll()
        self.by_fd = {}
        self.socks = []
        self.timers = []
        self.scheduled = []
        traffic = Traffic(args.endpoints, args.spread, args.fail_ratio, args.seed)
        rng = random.Random(args.seed)
        host, version = socket.gethostname(), locust_version()
        self.workers = [
            SimWorker(f"{host}_{rng.getrandbits(128):032x}", traffic, random.Random(rng.random()), version, args.rps_per_user,
                     spread_phases=args.phases == "spread")
            for _ in range(args.workers)
        ]
        self.sent = collections.Counter()
        self.recv = collections.Counter()
        self.send_errors = 0
        self.reconnects = 0
        self.rtts = []
        self.t0 = time.monotonic()
        self.all_ready_s = None
        self.users = self.done = self.acked = 0
        self.users_changed_at = self.all_done_at = None

    def connect(self, i):
        w = self.workers[i]
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, w.node_id.encode())
        s.setsockopt(zmq.TCP_KEEPALIVE, 1)
        s.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
        s.connect(f"tcp://{self.args.master}")
        fd = s.getsockopt(zmq.FD)
        self.by_fd[fd] = i
        self.epoll.register(fd, select.EPOLLIN)
        if i < len(self.socks):
            self.socks[i] = s
        else:
            self.socks.append(s)

    def disconnect(self, i):
        s = self.socks[i]
        fd = s.getsockopt(zmq.FD)
        self.epoll.unregister(fd)
        del self.by_fd[fd]
        s.close(linger=1000)
        self.socks[i] = None

    def send(self, i, msgs):
        self.put(i, msgs)
        self.after(i)

    def put(self, i, msgs):
        """Sends without blocking, as Locust's rpc does; a full queue counts as a send error."""
        s, node_id = self.socks[i], self.workers[i].node_id
        for mtype, data in msgs:
            try:
                s.send(msgpack.dumps((mtype, data, node_id)), zmq.NOBLOCK)
                self.sent[mtype] += 1
            except zmq.Again:
                self.send_errors += 1

    def after(self, i):
        """Follows up on worker i: drains its socket (a send can swallow ZMQ's wake-up), swaps
        its socket on `reconnect`, closes it when gone, reschedules its timers."""
        w = self.workers[i]
        if self.socks[i] is not None and not w.gone:
            self.drain(i)
        if w.reconnect:
            w.reconnect = False
            self.reconnects += 1
            self.disconnect(i)
            self.connect(i)
        if w.gone and self.socks[i] is not None:
            self.disconnect(i)
        t = w.next_due()
        if t is not None and (self.scheduled[i] is None or t < self.scheduled[i]):
            self.scheduled[i] = t
            heapq.heappush(self.timers, (t, i))

    def drain(self, i):
        s = self.socks[i]
        w = self.workers[i]
        while s.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            mtype, data, _ = msgpack.loads(s.recv(zmq.NOBLOCK), raw=False, strict_map_key=False)
            self.recv[mtype] += 1
            users, done, acked = w.user_count, w.master_done, w.acked
            out = w.receive(mtype, data, time.monotonic())
            self.track(w, users, done, acked)
            self.put(i, out)
            if w.reconnect or w.gone:
                return
        if w.rtts:
            self.rtts += w.rtts
            w.rtts.clear()

    def track(self, w, users, done, acked):
        """Keeps the pool's totals and the times the bench reads: when every worker had its
        `ack` (seconds from the first connect), when the users last changed and when the
        master's `spawning_complete` had reached every worker (wall clock)."""
        if w.acked and not acked:
            self.acked += 1
            if self.acked == len(self.workers) and self.all_ready_s is None:
                self.all_ready_s = time.monotonic() - self.t0
        if w.user_count != users:
            self.users += w.user_count - users
            self.users_changed_at = time.time()
        if w.master_done != done:
            self.done += 1 if w.master_done else -1
            if self.done == len(self.workers):
                self.all_done_at = time.time()

    def status(self, now):
        ws = self.workers
        acked = sum(1 for w in ws if w.acked and not w.gone)
        r = sorted(self.rtts)
        self.rtts = []
        line = {
            "t": round(time.time(), 3), "workers": len(ws), "acked": acked,
            "running": sum(1 for w in ws if w.state == RUNNING and not w.gone),
            "users": self.users, "users_changed_at": self.users_changed_at,
            "master_spawning_complete": self.done, "all_master_spawning_complete_at": self.all_done_at,
            "hb_rtt_ms": {"n": len(r), "p50": ms(r, 50), "p95": ms(r, 95), "max": ms(r, 100)},
            "lost": collections.Counter(w.gone for w in ws if w.gone and w.gone != "quit"),
            "quit": sum(1 for w in ws if w.gone == "quit"),
            "reconnects": self.reconnects, "send_errors": self.send_errors,
            "all_ready_s": self.all_ready_s and round(self.all_ready_s, 3),
            "sent": dict(self.sent), "recv": dict(self.recv), "cpu_s": round(sum(os.times()[:2]), 2),
        }
        print(json.dumps(line), flush=True)

    def run(self):
        self.scheduled = [None] * len(self.workers)
        rate = self.args.connect_rate
        next_status = time.monotonic() + 1.0
        for i in range(len(self.workers)):
            if rate:
                time.sleep(max(0.0, self.t0 + i / rate - time.monotonic()))
            self.connect(i)
            self.send(i, self.workers[i].start(time.monotonic()))
        while not all(w.gone for w in self.workers):
            now = time.monotonic()
            wait = min(next_status, self.timers[0][0] if self.timers else next_status) - now
            for fd, _ in self.epoll.poll(max(0.0, wait)):
                i = self.by_fd.get(fd)
                if i is not None:
                    self.after(i)
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                t, i = heapq.heappop(self.timers)
                if self.scheduled[i] != t:
                    continue
                self.scheduled[i] = None
                w = self.workers[i]
                if self.socks[i] is not None:
                    users, done, acked = w.user_count, w.master_done, w.acked
                    out = w.due(now)
                    self.track(w, users, done, acked)
                    self.send(i, out)
            if now >= next_status:
                self.status(now)
                next_status += 1.0
        self.status(time.monotonic())


def ms(sorted_s, p):
    if not sorted_s:
        return None
    k = min(len(sorted_s) - 1, int(round(p / 100 * (len(sorted_s) - 1))))
    return round(sorted_s[k] * 1000, 1)


def raise_nofile():
    """Two descriptors per worker (its TCP socket and ZMQ's mailbox): the soft limit goes to
    the hard limit, and a hard limit too low for the pool is an error."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, required=True)
    ap.add_argument("--master", default="127.0.0.1:5557", help="the master's HOST:PORT")
    ap.add_argument("--endpoints", type=int, default=1, help="endpoints in each stats report (1 or 50)")
    ap.add_argument("--spread", type=int, default=20, help="distinct response times per endpoint")
    ap.add_argument("--rps-per-user", type=float, default=1.0)
    ap.add_argument("--fail-ratio", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--phases", choices=["spread", "lockstep"], default="spread",
                    help="heartbeat and report phases: random per worker (as workers started over time) or all at the ack")
    ap.add_argument("--connect-rate", type=float, default=0, help="workers connected per second (0: all at once)")
    a = ap.parse_args(argv)
    need = a.workers * 2 + 64
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard < need:
        ap.error(f"{a.workers} workers need {need} open files but the hard limit is {hard}: raise it (ulimit -Hn) or use fewer workers")
    return a


if __name__ == "__main__":
    try:
        Pool(parse_args()).run()
    except KeyboardInterrupt:
        sys.exit(0)
