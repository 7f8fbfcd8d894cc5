#!/usr/bin/env python3
"""Check the image's /etc/fleet/agent.toml: exactly the keys the image knows (imds, locust,
state_dir, poweroff_command), no fleet and no secret; the programs it names exist.
Exits 1 with the failed assertion.

    check_agent_toml.py ROOTFS
"""

import os
import sys
import tomllib


def main():
    r = sys.argv[1]
    c = tomllib.load(open(r + "/etc/fleet/agent.toml", "rb"))
    assert set(c) == {"imds", "locust", "state_dir", "poweroff_command"}, sorted(c)
    assert c["imds"] is True
    assert os.access(r + c["locust"], os.X_OK), c["locust"]
    assert c["state_dir"] == "/var/lib/fleet-agent", c["state_dir"]
    assert c["poweroff_command"] == ["/usr/bin/touch", "/run/fleet-agent/poweroff"], c["poweroff_command"]
    assert os.access(r + c["poweroff_command"][0], os.X_OK)


if __name__ == "__main__":
    main()
