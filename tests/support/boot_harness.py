#!/usr/bin/env python3
"""Boot harness: "boots" the EC2 instances moto reports by starting one fleet-agent per
instance, with the IMDSv2 emulator (imds.py) serving each instance's identity and user-data.

Polls moto directly (boto3) for instances tagged fleet=NAME; for each one that is pending or
running it writes DIR/<id>/agent.toml and starts `AGENT --config DIR/<id>/agent.toml` in its
own process group with AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:<port>/<id>. When
the instance leaves pending/running (or disappears) the agent gets SIGTERM, SIGKILL after 10 s.
State goes to DIR/harness.json. See tests/support/README.md.
"""

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import imds
from loopback import parse_hostport

ALIVE_STATES = ("pending", "running")
KILL_AFTER = 10.0


def log(msg):
    sys.stderr.write("%s boot_harness: %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


class Inst:
    __slots__ = ("id", "state", "itype", "az", "ip", "user_data", "proc", "pid", "started",
                 "agent", "exit_code", "kill_at", "booting", "stopped_by_us", "dir")

    def __init__(self, iid):
        self.id = iid
        self.state = None
        self.itype = self.az = self.ip = None
        self.user_data = None  # bytes, None = no user data; fetched once
        self.proc = None
        self.pid = None
        self.started = None
        self.agent = "none"  # none|booting|running|stopping|exited|killed|not-started
        self.exit_code = None
        self.kill_at = None
        self.booting = False
        self.stopped_by_us = False
        self.dir = None


class Harness:
    def __init__(self, args, imds_url):
        self.args = args
        self.imds_url = imds_url
        self.lock = threading.RLock()
        self.insts = {}
        self.imds = imds.Instances()
        self.dirty = threading.Event()
        self.stop = threading.Event()
        self.shutting_down = False
        self.workdir = os.path.abspath(args.workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.pool = ThreadPoolExecutor(max_workers=args.boot_workers,
                                       thread_name_prefix="boot")
        self.client = None
        self.slow_logged = -1e9

    # -- moto --------------------------------------------------------------------------------

    def make_client(self):
        import boto3
        from botocore.config import Config
        return boto3.client(
            "ec2", endpoint_url=self.args.moto, region_name=self.args.region,
            aws_access_key_id="testing", aws_secret_access_key="testing",
            config=Config(retries={"mode": "standard", "max_attempts": 3},
                          max_pool_connections=self.args.boot_workers + 4,
                          connect_timeout=5, read_timeout=120))

    def describe(self):
        seen = {}
        paginator = self.client.get_paginator("describe_instances")
        pages = paginator.paginate(
            Filters=[{"Name": "tag:fleet", "Values": [self.args.fleet]}],
            PaginationConfig={"PageSize": 1000})
        for page in pages:
            for res in page.get("Reservations", []):
                for i in res.get("Instances", []):
                    seen[i["InstanceId"]] = i
        return seen

    def poll_once(self):
        """One paginated DescribeInstances pass. Returns how long it took."""
        t0 = time.monotonic()
        try:
            seen = self.describe()
        except Exception as e:  # moto down or slow: keep everything as it is
            log("DescribeInstances failed: %s" % e)
            return time.monotonic() - t0
        dt = time.monotonic() - t0
        if dt > 2 and time.monotonic() - self.slow_logged > 60:
            self.slow_logged = time.monotonic()
            log("DescribeInstances took %.1fs for %d instances (polling no faster than that)"
                % (dt, len(seen)))
        changed = False
        with self.lock:
            for iid, d in seen.items():
                st = d.get("State", {}).get("Name")
                inst = self.insts.get(iid)
                if inst is None:
                    inst = self.insts[iid] = Inst(iid)
                    inst.dir = os.path.join(self.workdir, iid)
                    changed = True
                inst.itype = d.get("InstanceType")
                inst.az = d.get("Placement", {}).get("AvailabilityZone")
                inst.ip = d.get("PrivateIpAddress")
                if st != inst.state:
                    if inst.state is not None:
                        log("%s %s -> %s" % (iid, inst.state, st))
                    inst.state = st
                    changed = True
                if st in ALIVE_STATES:
                    if not inst.booting and (inst.agent in ("none",) or (
                            inst.stopped_by_us and inst.agent in ("exited", "killed"))):
                        inst.booting = True
                        inst.agent = "booting"
                        inst.stopped_by_us = False
                        changed = True
                        self.pool.submit(self.boot, inst)
                else:
                    if self.stop_agent(inst, "instance %s" % st):
                        changed = True
            for iid, inst in self.insts.items():
                if iid not in seen and inst.state != "gone":
                    log("%s disappeared" % iid)
                    inst.state = "gone"
                    self.stop_agent(inst, "instance gone")
                    changed = True
        if changed:
            self.dirty.set()
        return dt

    # -- agents ------------------------------------------------------------------------------

    def stop_agent(self, inst, why):
        """SIGTERM the agent's process group (caller holds the lock). True if signalled."""
        if inst.proc is None or inst.agent not in ("running",):
            return False
        inst.stopped_by_us = True
        inst.agent = "stopping"
        inst.kill_at = time.monotonic() + KILL_AFTER
        try:
            os.killpg(inst.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        except PermissionError:
            inst.proc.terminate()
        log("%s SIGTERM agent pid %d (%s)" % (inst.id, inst.proc.pid, why))
        return True

    def boot(self, inst):
        try:
            self._boot(inst)
        except Exception as e:
            log("%s boot failed: %r" % (inst.id, e))
            with self.lock:
                inst.agent = "not-started"
                inst.booting = False
            self.dirty.set()

    def _boot(self, inst):
        iid = inst.id
        if not self.imds.known(iid):
            try:
                r = self.client.describe_instance_attribute(InstanceId=iid, Attribute="userData")
                v = (r.get("UserData") or {}).get("Value")
                ud = base64.b64decode(v) if v else None
            except Exception as e:
                log("%s userData fetch failed (%s); booting without user-data" % (iid, e))
                ud = None
            self.imds.add(iid, {
                "instance-id": iid,
                "instance-type": inst.itype or "",
                "placement/availability-zone": inst.az or "",
                "local-ipv4": inst.ip or "",
            }, ud)
            with self.lock:
                inst.user_data = ud
        d = inst.dir
        state_dir = os.path.join(d, "state")
        os.makedirs(state_dir, exist_ok=True)
        cfg = "state_dir = %s\n" % json.dumps(state_dir)
        for s in self.args.agent_setting:
            k, _, v = s.partition("=")
            cfg += "%s = %s\n" % (k.strip(), v.strip())
        write_atomic(os.path.join(d, "agent.toml"), cfg.encode())
        if inst.user_data is not None:
            write_atomic(os.path.join(d, "user-data"), inst.user_data)
        env = dict(os.environ)
        env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = "%s/%s" % (self.imds_url, iid)
        cmd = [self.args.agent, "--config", os.path.join(d, "agent.toml")] + self.args.agent_arg
        with self.lock:
            if self.shutting_down or inst.state not in ALIVE_STATES:
                inst.agent = "not-started"
                inst.booting = False
                self.dirty.set()
                return
            with open(os.path.join(d, "agent.log"), "ab") as logf:
                logf.write(("--- %s harness: starting %s\n" % (
                    time.strftime("%Y-%m-%dT%H:%M:%S"), " ".join(cmd))).encode())
                logf.flush()
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                        stderr=subprocess.STDOUT, env=env, cwd=d,
                                        start_new_session=True, close_fds=True)
            inst.proc = proc
            inst.pid = proc.pid
            inst.started = time.time()
            inst.agent = "running"
            inst.exit_code = None
            inst.kill_at = None
            inst.booting = False
        log("%s agent started pid %d (user-data %s)" % (
            iid, proc.pid, "%d bytes" % len(inst.user_data) if inst.user_data is not None else "none"))
        self.dirty.set()

    def reap(self):
        """Collect exited agents; SIGKILL the ones past their deadline."""
        now = time.monotonic()
        changed = False
        with self.lock:
            for inst in self.insts.values():
                p = inst.proc
                if p is None or inst.agent not in ("running", "stopping"):
                    continue
                rc = p.poll()
                if rc is not None:
                    if inst.agent == "running":
                        log("%s agent pid %d exited on its own with %s" % (inst.id, p.pid, rc))
                    inst.agent = "killed" if rc == -signal.SIGKILL else "exited"
                    inst.exit_code = rc
                    inst.kill_at = None
                    changed = True
                    # take any stragglers in the group down with it
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                elif inst.kill_at is not None and now >= inst.kill_at:
                    log("%s agent pid %d ignored SIGTERM for %.0fs: SIGKILL" % (
                        inst.id, p.pid, KILL_AFTER))
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        p.kill()
                    inst.kill_at = None
        if changed:
            self.dirty.set()

    def reaper_loop(self):
        while not self.stop.wait(0.2):
            self.reap()

    # -- harness.json ------------------------------------------------------------------------

    def snapshot(self):
        with self.lock:
            return {
                "fleet": self.args.fleet,
                "imds": self.imds_url,
                "updated": time.time(),
                "instances": {
                    i.id: {"state": i.state, "pid": i.pid, "started": i.started,
                           "agent": i.agent, "exit_code": i.exit_code}
                    for i in self.insts.values()
                },
            }

    def write_json(self):
        write_atomic(os.path.join(self.workdir, "harness.json"),
                     json.dumps(self.snapshot(), sort_keys=True).encode())

    def writer_loop(self):
        # Rewrites harness.json after every change; changes that arrive while a write is in
        # progress (e.g. a burst of 1000 boots) are coalesced into the next write, at most
        # every 50 ms.
        while True:
            self.dirty.wait()
            self.dirty.clear()
            try:
                self.write_json()
            except OSError as e:
                log("writing harness.json failed: %s" % e)
            if self.stop.is_set() and not self.dirty.is_set():
                return
            time.sleep(0.05)

    # -- shutdown ----------------------------------------------------------------------------

    def shutdown(self):
        with self.lock:
            self.shutting_down = True
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self.lock:
            live = [i for i in self.insts.values()
                    if i.proc is not None and i.agent in ("running", "stopping")]
            for i in live:
                self.stop_agent(i, "harness stopping")
        log("stopping: SIGTERM sent to %d agent(s)" % len(live))
        deadline = time.monotonic() + KILL_AFTER
        while time.monotonic() < deadline:
            self.reap()
            with self.lock:
                if not any(i.agent == "stopping" for i in self.insts.values()):
                    break
            time.sleep(0.1)
        with self.lock:
            left = [i for i in self.insts.values() if i.agent == "stopping"]
            for i in left:
                i.kill_at = time.monotonic()
        if left:
            log("SIGKILL to %d agent(s)" % len(left))
            self.reap()
            for i in left:
                try:
                    i.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            self.reap()
        self.write_json()


def write_atomic(path, data):
    tmp = "%s.tmp.%d.%d" % (path, os.getpid(), threading.get_ident())
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(
        description="Boot harness: start one fleet-agent per EC2 instance that moto reports "
        "for a fleet (tag fleet=NAME), with an IMDSv2 emulator serving each instance's "
        "identity and user-data under http://IMDS/<instance-id>/latest/...; stop the agent "
        "when the instance stops/terminates/disappears. State in WORKDIR/harness.json.")
    ap.add_argument("--moto", required=True, help="moto_server URL (polled directly)")
    ap.add_argument("--fleet", required=True, help="fleet name (instances tagged fleet=NAME)")
    ap.add_argument("--agent", required=True, help="agent executable (fleet-agent)")
    ap.add_argument("--workdir", required=True, help="directory for per-instance dirs + harness.json")
    ap.add_argument("--region", default="us-east-1")
    ap.add_argument("--imds-listen", type=parse_hostport, default=("127.0.0.1", 0),
                    help="HOST:PORT for the IMDS emulator (default 127.0.0.1:0 = free port)")
    ap.add_argument("--agent-setting", action="append", default=[], metavar="KEY=TOMLVALUE",
                    help="line added verbatim to each agent.toml as `KEY = TOMLVALUE` (repeatable)")
    ap.add_argument("--agent-arg", action="append", default=[], metavar="ARG",
                    help="extra argument appended to the agent command line (repeatable)")
    ap.add_argument("--poll", type=float, default=0.5,
                    help="seconds between polls (default 0.5; at least as long as the last "
                    "DescribeInstances pass took)")
    ap.add_argument("--boot-workers", type=int, default=8,
                    help="threads fetching user-data and spawning agents (default 8)")
    args = ap.parse_args()
    for s in args.agent_setting:
        if "=" not in s:
            ap.error("--agent-setting needs KEY=TOMLVALUE, got %r" % s)
    if not os.access(args.agent, os.X_OK):
        ap.error("--agent %s is not executable" % args.agent)

    # IMDS first, so the URL is known before anything slow (importing boto3) happens.
    h = Harness(args, None)
    imds_url = h.imds_url = imds.start(h.imds, args.imds_listen)
    print("imds on %s" % imds_url, flush=True)
    log("imds on %s; fleet %s; moto %s; workdir %s" % (imds_url, args.fleet, args.moto, h.workdir))

    def on_signal(signum, frame):
        if not h.stop.is_set():
            log("got %s" % signal.Signals(signum).name)
        h.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    h.client = h.make_client()
    h.dirty.set()
    writer = threading.Thread(target=h.writer_loop, daemon=True, name="writer")
    writer.start()
    threading.Thread(target=h.reaper_loop, daemon=True, name="reaper").start()
    while not h.stop.is_set():
        took = h.poll_once()
        # moto's DescribeInstances costs seconds of its CPU at 1000+ instances: never spend
        # more than half of moto's time on our polling.
        h.stop.wait(max(args.poll, took))
    h.shutdown()
    h.dirty.set()
    writer.join(5)
    log("exit")
    sys.exit(0)


if __name__ == "__main__":
    main()
