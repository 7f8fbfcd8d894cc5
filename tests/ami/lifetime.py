#!/usr/bin/env python3
"""From the booted container's journal (`journalctl -o short-monotonic`): the time from the
start of the agent that reached its max lifetime to its power-off request. Prints it; exits 0
when it is within [LIFETIME_S - 1, LIFETIME_S + 5], 1 otherwise.

    lifetime.py LIFETIME_S JOURNAL_TXT
"""

import re
import sys


def start_to_request(lines):
    """(agent start, power-off request) in monotonic seconds, either None if missing. The
    lifetime counts from the start of the agent that reaches it (the last one started)."""
    start = stop = None
    for line in lines:
        m = re.match(r"\[\s*([0-9.]+)\]", line)
        if not m:
            continue
        if stop is None and "Started fleet-agent.service" in line:
            start = float(m.group(1))
        if stop is None and "max lifetime reached" in line:
            stop = float(m.group(1))
    return start, stop


def main():
    life = float(sys.argv[1])
    start, stop = start_to_request(open(sys.argv[2], errors="replace"))
    if start is None or stop is None:
        sys.exit(1)
    print("agent start to power-off request: %.1f s" % (stop - start))
    sys.exit(0 if life - 1 <= stop - start <= life + 5 else 1)


if __name__ == "__main__":
    main()
