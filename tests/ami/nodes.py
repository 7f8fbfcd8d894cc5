#!/usr/bin/env python3
"""Read the controller's `/api/nodes` answer on stdin.

    nodes.py joined NODE_ID WORKERS MAX_UPTIME_S
        exit 0 if the node reports a running bundle, from the ec2 backend, with WORKERS
        workers all running, in a heartbeat younger than 5 s, from an agent up for at most
        MAX_UPTIME_S (so one started after a given moment).
    nodes.py describe NODE_ID
        print one line about the node: status, bundle, sequence, workers, heartbeat age.
"""

import json
import sys


def joined(n, workers, max_uptime):
    return (n["status"] == "running" and n["backend"] == "ec2" and len(n["workers"]) == workers
            and all(w["state"] == "running" for w in n["workers"])
            and n["heartbeat_age_s"] < 5 and n["uptime_s"] <= max_uptime)


def describe(n):
    return "node %s (%s): %s, bundle %s seq %d, workers %s, heartbeat %.1f s ago" % (
        n["node_id"], n["backend"], n["status"], n["running"]["sha256"][:12],
        n["running"]["sequence"], "/".join(w["state"] for w in n["workers"]),
        n["heartbeat_age_s"])


def main():
    cmd, node_id = sys.argv[1], sys.argv[2]
    found = [x for x in json.load(sys.stdin) if x["node_id"] == node_id]
    if cmd == "joined":
        sys.exit(0 if found and joined(found[0], int(sys.argv[3]), int(sys.argv[4])) else 1)
    if cmd == "describe" and found:
        print(describe(found[0]))
        return
    sys.exit(1)


if __name__ == "__main__":
    main()
