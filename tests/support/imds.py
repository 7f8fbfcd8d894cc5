#!/usr/bin/env python3
"""The IMDSv2 emulator of the tests (stdlib only), as strict as an instance launched with
HttpTokens=required: `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds`
(1..21600) gives a token, and every other request without a live token for the same instance
answers 401.

Two users, one emulator:
- the boot harness (boot_harness.py) serves every instance moto reports, each under its id:
  `http://HOST:PORT/<instance-id>/latest/...`;
- the AMI suite (tests/ami/run.sh) runs this file as a program for the one node it boots, whose
  agent reads `http://HOST:PORT/latest/...`:

      imds.py --user-data FILE --instance-id ID [--listen 127.0.0.1:0]

  The first stdout line is `listening on http://HOST:PORT`; each request is logged as one line
  on stderr, `imds: <client> <METHOD> <path> -> <status>`. FILE is read on every request (404
  while it does not exist).

Served: `latest/user-data` (404 when the instance has none) and `latest/meta-data/` items
`instance-id`, `instance-type`, `placement/availability-zone`, `local-ipv4` (404 when not
known); anything else is 404, so is an unknown instance. Repeated slashes are collapsed.
"""

import argparse
import http.server
import re
import secrets
import sys
import threading
import time

from loopback import Server, parse_hostport

TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TTL_S = 21600
META_ITEMS = ("instance-id", "instance-type", "placement/availability-zone", "local-ipv4")
# Expired tokens are dropped once there are this many.
PRUNE_AT = 100000


class Instances:
    """What the emulator serves, and the tokens it issued. Safe to share between threads.

    `single`: the instance that paths without an id (`/latest/...`) belong to, or None.
    """

    def __init__(self, single=None):
        self.lock = threading.Lock()
        self.single = single
        self.data = {}  # id -> {item: str, "user-data": bytes | None | callable}
        self.tokens = {}  # token -> (id, expires, monotonic)

    def add(self, iid, meta, user_data):
        """Serve instance `iid`: `meta` maps META_ITEMS to strings; `user_data` is bytes, None
        (no user-data) or a function returning either (called on every request)."""
        entry = {k: v for k, v in meta.items() if k in META_ITEMS}
        entry["user-data"] = user_data
        with self.lock:
            self.data[iid] = entry

    def known(self, iid):
        with self.lock:
            return iid in self.data

    def issue(self, iid, ttl, now):
        tok = secrets.token_urlsafe(32)
        with self.lock:
            if len(self.tokens) > PRUNE_AT:
                for t, (_, exp) in list(self.tokens.items()):
                    if exp < now:
                        del self.tokens[t]
            self.tokens[tok] = (iid, now + ttl)
        return tok

    def authorized(self, token, iid, now):
        with self.lock:
            ent = self.tokens.get(token) if token else None
        return ent is not None and ent[0] == iid and ent[1] >= now

    def item(self, iid, name):
        """The value of a meta-data item or "user-data", or None."""
        with self.lock:
            v = self.data.get(iid, {}).get(name)
        return v() if callable(v) else v


def split_path(path, single):
    """`/<id>/latest/...` -> (id, "/latest/..."); with a single instance, `/latest/...` is
    that instance's."""
    path = re.sub(r"/+", "/", path.split("?", 1)[0].split("#", 1)[0])
    if single is not None and (path == "/latest" or path.startswith("/latest/")):
        return single, path
    parts = path.strip("/").split("/", 1)
    return parts[0], "/" + parts[1] if len(parts) > 1 else "/"


def answer(insts, method, path, headers, now):
    """The reply to one request: (status, body bytes, content type, extra headers)."""
    iid, rest = split_path(path, insts.single)
    if not insts.known(iid):
        return 404, b"Not Found\n", "text/plain", []
    if rest == "/latest/api/token":
        if method != "PUT":
            return 405, b"Method Not Allowed\n", "text/plain", []
        try:
            ttl = int(headers.get(TTL_HEADER))
        except (TypeError, ValueError):
            ttl = 0
        if not 1 <= ttl <= MAX_TTL_S:
            return 400, b"Bad Request\n", "text/plain", []
        tok = insts.issue(iid, ttl, now)
        return 200, tok.encode(), "text/plain", [(TTL_HEADER, str(ttl))]
    if method not in ("GET", "HEAD"):
        return 405, b"Method Not Allowed\n", "text/plain", []
    if not insts.authorized(headers.get(TOKEN_HEADER), iid, now):
        return 401, b"Unauthorized\n", "text/plain", []
    if rest == "/latest/user-data":
        ud = insts.item(iid, "user-data")
        if ud is None:
            return 404, b"Not Found\n", "text/plain", []
        return 200, ud, "application/octet-stream", []
    if rest.startswith("/latest/meta-data/"):
        name = rest[len("/latest/meta-data/"):].rstrip("/")
        v = insts.item(iid, name) if name in META_ITEMS else None
        if v:
            return 200, v.encode(), "text/plain", []
    return 404, b"Not Found\n", "text/plain", []


def make_handler(insts, log_requests=False):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "EC2ws"
        sys_version = ""

        def log_message(self, fmt, *args):
            pass

        def _route(self):
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)
            status, body, ctype, extra = answer(
                insts, self.command, self.path, self.headers, time.monotonic())
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            for k, v in extra:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            if log_requests:
                sys.stderr.write("imds: %s %s %s -> %d\n"
                                 % (self.client_address[0], self.command, self.path, status))
                sys.stderr.flush()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _route

    return Handler


def start(insts, listen, log_requests=False):
    """Serve `insts` on `listen` (host, port) from a daemon thread; returns the base URL."""
    srv = Server(listen, make_handler(insts, log_requests))
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.5},
                     daemon=True, name="imds").start()
    return "http://%s:%d" % (listen[0], srv.server_address[1])


def read_file(path):
    def read():
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
    return read


def main():
    ap = argparse.ArgumentParser(
        description="IMDSv2 emulator for one instance, under http://HOST:PORT/latest/...")
    ap.add_argument("--user-data", required=True, help="file served as user-data")
    ap.add_argument("--instance-id", required=True)
    ap.add_argument("--listen", type=parse_hostport, default=("127.0.0.1", 0))
    args = ap.parse_args()
    insts = Instances(single=args.instance_id)
    insts.add(args.instance_id, {"instance-id": args.instance_id}, read_file(args.user_data))
    print("listening on %s" % start(insts, args.listen, log_requests=True), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
