#!/usr/bin/env python3
"""Adapt the test fleet's fleet.toml (as `fleet init` wrote it) for the boot phase: the Locust
master and its web UI on free ports, and the nodes' max lifetime and heartbeat interval in
their user-data.

    fleet_toml.py FLEET_TOML MASTER_PORT WEB_PORT LIFETIME_S
"""

import sys


def main():
    path, master_port, web_port, lifetime_s = sys.argv[1:]
    t = open(path).read()
    t = t.replace("port = 5557", "port = %s" % master_port)
    t = t.replace("127.0.0.1:8089", "127.0.0.1:%s" % web_port)
    t = t.replace("[ec2]\n", "[ec2]\nmax_lifetime_s = %s\nagent_settings = { heartbeat_ms = 1000 }\n"
                  % lifetime_s, 1)
    open(path, "w").write(t)


if __name__ == "__main__":
    main()
