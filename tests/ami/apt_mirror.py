#!/usr/bin/env python3
"""Print the Debian mirror this machine's apt sources use for SUITE (deb822 `.sources` files
first, then one-line `.list` files), or deb.debian.org when none names it.

    apt_mirror.py SUITE
"""

import glob
import re
import sys


def from_sources(suite):
    for f in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in open(f).read().split("\n\n"):
            kv = dict(re.findall(r"(?m)^(\w[\w-]*):\s*(.*)$", stanza))
            if "deb" in kv.get("Types", "").split() and suite in kv.get("Suites", "").split():
                return kv["URIs"].split()[0]
    return None


def from_lists(suite):
    for f in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
        try:
            for line in open(f):
                p = line.split()
                if len(p) >= 3 and p[0] == "deb" and p[2] == suite and not p[1].startswith("["):
                    return p[1]
        except OSError:
            pass
    return None


def main():
    suite = sys.argv[1]
    print(from_sources(suite) or from_lists(suite) or "http://deb.debian.org/debian")


if __name__ == "__main__":
    main()
