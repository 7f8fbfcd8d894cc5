#!/usr/bin/env python3
"""Bytes per second per open dashboard, with N local agents (stub workers), idle and under a spec edit.

Usage: .venv/bin/python bench/dashboard_stream.py [--agents 1000] [--dashboards 2]
           [--idle 30] [--load 30] [--edit 20] [--fleet-bin PATH] [--no-build]

Each dashboard is what the page does, without a browser: it holds `GET /api/events` open and,
when the stream's `nodes` summary says the rows changed (its version, standing counts or the
current bundle), fetches the first page of rows (`GET /api/nodes?offset=0&limit=50`), as
dashboard.html does. Bytes are counted at the HTTP level: the stream's body as it arrives
(chunked framing included) plus each row fetch's status line, headers and body; TLS overhead is
not counted. A controller that sends `snapshot` events (before the summary stream) carried every
row on its stream and is measured the same way, with no fetches.

Windows: the page load (the stream's first chunk and the first page of rows) is reported alone;
`idle` is after every agent runs the bundle and the fleet has settled, with Locust's totals
standing still; `load` is the same fleet while a test runs, Locust's totals changing every
second; `edit` starts at the rename of a new locustfile and lasts `--edit` seconds (propagation to
1000 agents on 2 cores takes several). The stub workers run no test, so the master is external
and stood in for by this script: a web server on `master.web_url` answering `/stats/requests`
with totals that change on every poll during `load` (and `edit`) and stand still otherwise.

`--fleet-bin` runs another `fleet` binary as the controller and the CLI (the agents stay this
build's), to measure an older controller on the same fleet.
"""
import argparse
import http.server
import json
import os
import socket
import ssl
import threading
import time
import urllib.request

from common import REL, Fleet, build_release, machine

ap = argparse.ArgumentParser()
ap.add_argument("--agents", type=int, default=1000)
ap.add_argument("--dashboards", type=int, default=2)
ap.add_argument("--idle", type=float, default=30.0)
ap.add_argument("--load", type=float, default=30.0)
ap.add_argument("--edit", type=float, default=20.0)
ap.add_argument("--fleet-bin", default=None)
ap.add_argument("--no-build", action="store_true")
a = ap.parse_args()
if not a.no_build:
    build_release()

SPEC = "from locust import User, task\n\n\nclass Stub(User):\n    @task\n    def t(self):\n        pass\n# round {}\n"


class Dashboard(threading.Thread):
    """One open dashboard: the event stream, plus the row fetches the page would make."""

    def __init__(self, f):
        super().__init__(daemon=True)
        self.f = f
        self.lock = threading.Lock()
        self.bytes = 0
        self.events = {}
        self.fetches = 0
        self.first_chunk = None
        self.rows_key = None
        self.stop = False
        self.mode = None

    def count(self, n):
        with self.lock:
            self.bytes += n

    def snapshot_counts(self):
        with self.lock:
            return self.bytes, dict(self.events), self.fetches

    def fetch_rows(self):
        url = f"https://127.0.0.1:{self.f.port}/api/nodes?offset=0&limit=50"
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.f.token}"})
        with urllib.request.urlopen(req, context=self.f.ctx, timeout=30) as r:
            body = r.read()
            head = len(f"HTTP/1.1 {r.status} OK\r\n") + len(str(r.headers).encode())
        with self.lock:
            self.fetches += 1
            self.bytes += head + len(body)

    def on_event(self, name, data):
        with self.lock:
            self.events[name] = self.events.get(name, 0) + 1
        if name == "snapshot":
            self.mode = "snapshot"
        elif name == "spec":
            self.current = (json.loads(data).get("current") or {}).get("sha256")
        elif name == "nodes":
            s = json.loads(data)
            key = json.dumps([s.get("version"), s.get("standing"), getattr(self, "current", None)])
            if key != self.rows_key:
                self.rows_key = key
                self.fetch_rows()

    def run(self):
        raw = socket.create_connection(("127.0.0.1", self.f.port))
        sock = self.f.ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        sock.sendall(
            (f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{self.f.port}\r\n"
             f"Authorization: Bearer {self.f.token}\r\nAccept: text/event-stream\r\n\r\n").encode()
        )
        buf = b""
        head_done = False
        body = b""  # de-chunked, not yet parsed into events
        started = None
        sock.settimeout(1.0)
        while not self.stop:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                return
            self.count(len(data))
            buf += data
            if not head_done:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    continue
                head_done = True
                buf = buf[end + 4:]
            # Chunked transfer: <hex size>\r\n<data>\r\n
            while True:
                nl = buf.find(b"\r\n")
                if nl < 0:
                    break
                size = int(buf[:nl].split(b";")[0], 16)
                if len(buf) < nl + 2 + size + 2:
                    break
                body += buf[nl + 2:nl + 2 + size]
                buf = buf[nl + 2 + size + 2:]
            while b"\n\n" in body:
                block, body = body.split(b"\n\n", 1)
                name, payload = None, None
                for line in block.decode().split("\n"):
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        payload = line[6:]
                if name and payload is not None:
                    if started is None:
                        started = time.time()
                    self.on_event(name, payload)
                    # Every part of the first chunk arrives at once: `locust` (or a snapshot)
                    # closes it.
                    if self.first_chunk is None and name in ("locust", "snapshot"):
                        with self.lock:
                            self.first_chunk = self.bytes


def window(dashboards, seconds):
    before = [d.snapshot_counts() for d in dashboards]
    t = time.time()
    time.sleep(seconds)
    dt = time.time() - t
    after = [d.snapshot_counts() for d in dashboards]
    per = [(b[0] - a_[0]) / dt for a_, b in zip(before, after)]
    events = {}
    for a_, b in zip(before, after):
        for k, v in b[1].items():
            events[k] = events.get(k, 0) + v - a_[1].get(k, 0)
    fetches = sum(b[2] - a_[2] for a_, b in zip(before, after))
    n = len(dashboards)
    return sum(per) / n, {k: v / n for k, v in events.items()}, fetches / n, dt


class FakeLocust(http.server.BaseHTTPRequestHandler):
    """The external master's web UI, as far as the controller's stats poll goes."""

    moving = False
    polls = 0

    def do_GET(self):
        cls = FakeLocust
        if self.path.endswith("/fleet/stats"):
            # An external master has no fleet stats plugin: the controller then reads its
            # /stats/requests, as here.
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if cls.moving:
            cls.polls += 1
        body = json.dumps({
            "state": "running", "user_count": 1000, "worker_count": a.agents,
            "total_rps": 2000.0 + cls.polls * 3.7, "fail_ratio": 0.001 * (cls.polls % 7), "stats": [],
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


f = Fleet(
    managed_master=False,
    worker_command=["sleep", "3600"],
    agent_settings={"heartbeat_ms": 5000, "join_grace_ms": 200, "stable_ms": 2000},
)
if a.fleet_bin:
    # The controller (and the CLI that goes with it) under test; the agents stay this build's.
    import subprocess
    import signal as _signal

    def start_other():
        log = open(os.path.join(f.dir, "serve.log"), "a")
        f.serve = subprocess.Popen([a.fleet_bin, "--dir", f.dir, "serve"], stdout=log, stderr=log)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", f.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("fleet serve did not start")

    def cli_other(*args, check=True):
        r = subprocess.run([a.fleet_bin, "--dir", f.dir, *args], capture_output=True, text=True)
        if check and r.returncode != 0:
            raise SystemExit(f"fleet {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    f.start = start_other
    f.cli = cli_other
locust = http.server.ThreadingHTTPServer(("127.0.0.1", f.web_port), FakeLocust)
threading.Thread(target=locust.serve_forever, daemon=True).start()
try:
    f.write_spec(SPEC.format(0))
    f.start()
    f.wait("first publication", f.current_sha)
    t = time.time()
    f.cli("scale", "--nodes", str(a.agents), "--wait", "900")
    print(f"scale to {a.agents} local agents: {time.time() - t:.1f} s")
    sha = f.current_sha()
    f.wait("every agent on the bundle", lambda: all((n.get("running") or {}).get("sha256") == sha for n in f.api("/api/nodes")), timeout=300, every=1)
    time.sleep(10)  # statuses settle (starting -> running after the join grace)

    dash = [Dashboard(f) for _ in range(a.dashboards)]
    for d in dash:
        d.start()
    f.wait("first chunks", lambda: all(d.first_chunk for d in dash), timeout=60, every=0.1)
    time.sleep(2)
    first = sum(d.first_chunk for d in dash) / len(dash)
    mode = "snapshot" if dash[0].mode == "snapshot" else "parts"

    idle, idle_ev, idle_fetch, idle_dt = window(dash, a.idle)
    FakeLocust.moving = True
    load, load_ev, load_fetch, load_dt = window(dash, a.load)
    old = f.current_sha()
    f.write_spec(SPEC.format(1))
    edit, edit_ev, edit_fetch, edit_dt = window(dash, a.edit)
    new = f.current_sha()
    on_new = sum(1 for n in f.api("/api/nodes") if (n.get("running") or {}).get("sha256") == new)
    for d in dash:
        d.stop = True

    print(f"\n{a.agents} agents (heartbeat 5 s), {a.dashboards} open dashboards, stream mode: {mode}, on {machine()}")
    print(f"controller: {a.fleet_bin or os.path.join(REL, 'fleet')}")
    print(f"page load per dashboard (first chunk + first page of rows): {first / 1024:.1f} KiB")
    print(f"idle  ({idle_dt:.0f} s): {idle:.0f} B/s per dashboard; events/dashboard {idle_ev}; row fetches/dashboard {idle_fetch:.0f}")
    print(f"load  ({load_dt:.0f} s, Locust totals moving): {load:.0f} B/s per dashboard; events/dashboard {load_ev}; row fetches/dashboard {load_fetch:.0f}")
    print(f"edit  ({edit_dt:.0f} s from the rename, totals moving): {edit:.0f} B/s per dashboard; events/dashboard {edit_ev}; row fetches/dashboard {edit_fetch:.0f}")
    print(f"after the edit window: {on_new}/{a.agents} agents on the new bundle ({'changed' if new != old else 'NOT published'})")
finally:
    f.close()
    locust.shutdown()
