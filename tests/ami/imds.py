#!/usr/bin/env python3
"""A one-instance IMDSv2 emulator for tests/ami/run.sh: the node booted with systemd-nspawn
shares the host's network namespace and reads its user-data here (docs/user-data.md).

    imds.py --user-data FILE --instance-id ID [--listen 127.0.0.1:0]

The first stdout line is `listening on http://HOST:PORT`. IMDSv2 only, as on instances launched
with HttpTokens=required: PUT /latest/api/token with X-aws-ec2-metadata-token-ttl-seconds gives
a token, and every GET without a valid X-aws-ec2-metadata-token answers 401. Serves
/latest/user-data (404 when FILE is missing) and /latest/meta-data/instance-id. Each request
is logged as one line on stderr: `imds: <client> <METHOD> <path> -> <status>`.
"""

import argparse
import http.server
import secrets
import sys
import threading
import time

TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--user-data", required=True)
    ap.add_argument("--instance-id", required=True)
    ap.add_argument("--listen", default="127.0.0.1:0")
    args = ap.parse_args()
    tokens = {}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            pass

        def reply(self, status, body=b""):
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            sys.stderr.write("imds: %s %s %s -> %d\n"
                             % (self.client_address[0], self.command, self.path, status))
            sys.stderr.flush()

        def do_PUT(self):
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)
            if self.path != "/latest/api/token":
                return self.reply(404)
            try:
                ttl = int(self.headers.get(TTL_HEADER, ""))
            except ValueError:
                return self.reply(400)
            if not 1 <= ttl <= 21600:
                return self.reply(400)
            token = secrets.token_urlsafe(24)
            with lock:
                tokens[token] = time.monotonic() + ttl
            self.reply(200, token.encode())

        def do_GET(self):
            with lock:
                exp = tokens.get(self.headers.get(TOKEN_HEADER, ""))
            if exp is None or exp < time.monotonic():
                return self.reply(401)
            if self.path == "/latest/meta-data/instance-id":
                return self.reply(200, args.instance_id.encode())
            if self.path == "/latest/user-data":
                try:
                    with open(args.user_data, "rb") as f:
                        return self.reply(200, f.read())
                except FileNotFoundError:
                    return self.reply(404)
            self.reply(404)

    host, port = args.listen.rsplit(":", 1)
    srv = http.server.ThreadingHTTPServer((host, int(port)), Handler)
    srv.daemon_threads = True
    print("listening on http://%s:%d" % srv.server_address[:2], flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
