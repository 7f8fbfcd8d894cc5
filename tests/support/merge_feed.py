#!/usr/bin/env python3
"""Feeds Locust masters the same worker `stats` reports, for checking merged views exactly.

    merge_feed.py --masters 127.0.0.1:5557[,127.0.0.1:5558...] --workers N --users U
        [--seconds 30] [--seed 1] [--endpoints 3] [--spread 20] [--fail-ratio 0.05]
        [--rps-per-user 1]

The pool's simulated workers (worker_pool.SimWorker, with pool_traffic.Traffic behind their
reports; built from the seed as worker_pool.Pool builds them) run a test of U users each for
`--seconds` on a simulated clock that starts at the current second, so what they report
depends on the seed alone. Every `stats` message goes, with the worker's identity, to every
master listed: a master fed by two feeds sees exactly the requests of the masters fed by each.
The workers do not join the masters (no `client_ready`): a master adds up a `stats` message
from any worker, and nothing else is needed here.

Stdout gets one JSON line: reports sent and the requests and failures in them.
"""
import argparse
import json
import random
import socket
import time

import msgpack
import zmq

from pool_traffic import USER_CLASS, Traffic
from worker_pool import SimWorker, locust_version


def reports(args):
    """The `stats` messages of every worker, as (node_id, data), in the order sent."""
    traffic = Traffic(args.endpoints, args.spread, args.fail_ratio, args.seed)
    rng = random.Random(args.seed)
    host, version = socket.gethostname(), locust_version()
    workers = [
        SimWorker(f"{host}_{rng.getrandbits(128):032x}", traffic, random.Random(rng.random()), version,
                  args.rps_per_user)
        for _ in range(args.workers)
    ]
    t0 = float(int(time.time()))
    out = []
    for w in workers:
        w.start(t0)
        w.receive("ack", {"index": 0}, t0)
        w.receive("spawn", {"timestamp": t0, "user_classes_count": {USER_CLASS: args.users},
                            "stop_timeout": 0}, t0)
    for s in range(1, args.seconds + 1):
        now = t0 + s
        for w in workers:
            w.receive("heartbeat", None, now)  # the master answers: the worker stays
            out += [(w.node_id, data) for mtype, data in w.due(now) if mtype == "stats"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--masters", required=True, help="HOST:PORT of each master, comma-separated")
    ap.add_argument("--workers", type=int, required=True)
    ap.add_argument("--users", type=int, required=True, help="users per worker")
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--endpoints", type=int, default=3)
    ap.add_argument("--spread", type=int, default=20)
    ap.add_argument("--fail-ratio", type=float, default=0.05)
    ap.add_argument("--rps-per-user", type=float, default=1.0)
    args = ap.parse_args()

    msgs = reports(args)
    ctx = zmq.Context()
    socks = {}
    for addr in args.masters.split(","):
        for node_id, data in msgs:
            key = (addr, node_id)
            if key not in socks:
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.IDENTITY, node_id.encode())
                s.connect(f"tcp://{addr}")
                socks[key] = s
            socks[key].send(msgpack.dumps(("stats", data, node_id)))
    for s in socks.values():
        s.close(linger=10_000)  # waits until the messages are out
    ctx.term()
    print(json.dumps({
        "reports": len(msgs),
        "requests": sum(d["stats_total"]["num_requests"] for _, d in msgs),
        "failures": sum(d["stats_total"]["num_failures"] for _, d in msgs),
    }), flush=True)


if __name__ == "__main__":
    main()
