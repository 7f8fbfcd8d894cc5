#!/usr/bin/env python3
"""fleet-agent footprint: stripped release binary size and idle RSS (budget: 5 MiB each).

Usage: .venv/bin/python bench/agent.py

The idle agent is connected to a controller, long-polling, heartbeating, supervising one stub
worker. For scale, the same run measures `sleep`'s RSS (a floor for any process) and the
controller's RSS with that one agent.
"""
import os
import subprocess
import time

from common import REL, Fleet, build_release, machine

build_release()
MiB = 1024 * 1024
binary = os.path.join(REL, "fleet-agent")
size = os.path.getsize(binary)
stripped = b".symtab" not in subprocess.run(["objdump", "-h", binary], capture_output=True).stdout if os.path.exists("/usr/bin/objdump") else None


def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


f = Fleet(managed_master=False, worker_command=["sleep", "3600"])
try:
    f.write_spec("from locust import User\n\n\nclass Stub(User):\n    pass\n")
    f.start()
    f.wait("first publication", f.current_sha)
    f.cli("scale", "--nodes", "1")
    time.sleep(10)
    pid = int(open(os.path.join(f.dir, "local", "local-0001", "agent.pid")).read())
    agent_rss = rss(pid)
    ctl_rss = rss(f.serve.pid)
    floor = subprocess.Popen(["sleep", "30"])
    time.sleep(0.2)
    sleep_rss = rss(floor.pid)
    floor.kill()
    print(f"machine: {machine()}")
    print(f"fleet-agent release binary: {size / MiB:.2f} MiB (stripped: {stripped}); budget 5 MiB; ratio {size / (5 * MiB):.2f}")
    print(f"fleet-agent idle RSS: {agent_rss / MiB:.2f} MiB; budget 5 MiB; ratio {agent_rss / (5 * MiB):.2f}")
    print(f"  same run: `sleep` RSS {sleep_rss / MiB:.2f} MiB; controller RSS with 1 agent {ctl_rss / MiB:.2f} MiB")
finally:
    f.close()
