#!/usr/bin/env python3
"""EC2 throttling / fault emulator: an HTTP proxy between an AWS SDK and moto_server.

It enforces EC2's documented token buckets (docs/ec2.md, "Pacing"; refill scaled in time),
answers RequestLimitExceeded, injects InsufficientInstanceCapacity and partial fulfilment,
honours RunInstances/CreateFleet ClientToken idempotency (moto does not), and can "lose"
successful launch responses. Everything else is forwarded to moto untouched.

Standard library only. The code is in ec2emu/, by concern; tests/support/README.md documents
the behaviour and the control API.
"""

import argparse

from ec2emu.emulator import Emulator
from ec2emu.log import log
from ec2emu.server import make_handler
from ec2emu.upstream import Upstream
from loopback import Server, parse_hostport


def main():
    ap = argparse.ArgumentParser(
        description="EC2 throttling/fault emulator between an AWS SDK and moto_server. "
        "Forwards everything to --upstream; enforces EC2 token buckets, capacity errors, "
        "partial fulfilment and ClientToken idempotency for EC2 Query-API calls. Control API "
        "under /_emulator/ (health, config, reset, stats); see tests/support/README.md.")
    ap.add_argument("--listen", type=parse_hostport, default=("127.0.0.1", 0),
                    help="HOST:PORT to listen on (port 0 = any free port; default 127.0.0.1:0)")
    ap.add_argument("--upstream", required=True, help="moto_server URL, e.g. http://127.0.0.1:5000")
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="multiply every bucket refill rate by this (bursts unchanged; default 1)")
    args = ap.parse_args()
    if not args.time_scale > 0:
        ap.error("--time-scale must be > 0")
    upstream = Upstream(args.upstream)
    emu = Emulator(upstream, args.time_scale)
    srv = Server(args.listen, make_handler(emu, upstream))
    port = srv.server_address[1]
    print("listening on http://%s:%d" % (args.listen[0], port), flush=True)
    log("listening on http://%s:%d, upstream %s, time scale %g"
        % (args.listen[0], port, args.upstream, args.time_scale))
    try:
        srv.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    log("stopped")


if __name__ == "__main__":
    main()
