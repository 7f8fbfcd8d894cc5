#!/usr/bin/env python3
"""Tiny stand-in for fleet-agent, for testing boot_harness.py (stdlib only).

`fake_agent.py --config FILE`: reads state_dir from FILE, does the IMDSv2 dance against
$AWS_EC2_METADATA_SERVICE_ENDPOINT, writes STATE/identity.json with the instance id,
instance type, availability zone, local IPv4 and user-data (text), then sleeps. On SIGTERM it
writes STATE/sigterm and exits 0. Exits 2 if IMDS fails.
"""

import argparse
import json
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    args = ap.parse_args()
    text = open(args.config).read()
    m = re.search(r'^state_dir\s*=\s*"((?:[^"\\]|\\.)*)"', text, re.M)
    state = json.loads('"%s"' % m.group(1)) if m else "."
    os.makedirs(state, exist_ok=True)

    def on_term(signum, frame):
        with open(os.path.join(state, "sigterm"), "w") as f:
            f.write("%f\n" % time.time())
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    base = os.environ["AWS_EC2_METADATA_SERVICE_ENDPOINT"].rstrip("/")
    try:
        req = urllib.request.Request(base + "/latest/api/token", method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
        token = urllib.request.urlopen(req, timeout=10).read().decode()

        def get(path):
            r = urllib.request.Request(base + path, headers={"X-aws-ec2-metadata-token": token})
            try:
                return urllib.request.urlopen(r, timeout=10).read()
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return None
                raise

        ident = {
            "instance_id": get("/latest/meta-data/instance-id").decode(),
            "instance_type": (get("/latest/meta-data/instance-type") or b"").decode(),
            "availability_zone": (get("/latest/meta-data/placement/availability-zone") or b"").decode(),
            "local_ipv4": (get("/latest/meta-data/local-ipv4") or b"").decode(),
        }
        ud = get("/latest/user-data")
        ident["user_data"] = ud.decode("utf-8", "replace") if ud is not None else None
    except Exception as e:
        print("fake_agent: IMDS failed: %r" % e, flush=True)
        sys.exit(2)
    tmp = os.path.join(state, "identity.json.tmp")
    with open(tmp, "w") as f:
        json.dump(ident, f)
    os.replace(tmp, os.path.join(state, "identity.json"))
    print("fake_agent: booted as %s" % ident["instance_id"], flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
