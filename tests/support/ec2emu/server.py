"""The HTTP front: the control API under /_emulator/, EC2 Query-API calls handed to the
emulator, everything else (Auto Scaling, /moto-api/...) forwarded to moto unchanged."""

import http.server
import json
import urllib.parse

from .log import log
from .wire import service_and_region

HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection", "expect",
}


def query_params(query, body, ctype):
    """(params dict, body pairs) of an EC2/Auto Scaling Query-API request: the query string's
    and the form body's parameters (the body wins)."""
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    body_pairs = []
    if body and ("x-www-form-urlencoded" in ctype or not ctype):
        try:
            body_pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            body_pairs = []
    params = dict(pairs)
    params.update(dict(body_pairs))
    return params, body_pairs, "Action" in dict(pairs)


def make_handler(emu, upstream):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "ec2-emulator"
        sys_version = ""

        def log_message(self, fmt, *args):  # quiet: we log our own events
            pass

        def _read_body(self):
            te = (self.headers.get("Transfer-Encoding") or "").lower()
            if "chunked" in te:
                chunks = []
                while True:
                    line = self.rfile.readline()
                    size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(chunks)
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n > 0 else b""

        def _send(self, status, headers, body, reason=None):
            self.send_response(status, reason)
            for k, v in headers:
                lk = k.lower()
                if lk in HOP_BY_HOP or lk in ("content-length", "server", "date"):
                    continue
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD" and body:
                self.wfile.write(body)

        def _json(self, status, obj):
            self._send(status, [("Content-Type", "application/json")],
                       json.dumps(obj).encode() + b"\n")

        def _control(self, body):
            path = urllib.parse.urlsplit(self.path).path.rstrip("/")
            try:
                if path == "/_emulator/health":
                    return self._json(200, {"ok": True})
                if path == "/_emulator/stats" and self.command == "GET":
                    return self._json(200, emu.stats_json())
                if path == "/_emulator/config" and self.command == "GET":
                    return self._json(200, emu.config_json())
                if path == "/_emulator/config" and self.command == "POST":
                    cfg = json.loads(body or b"{}")
                    return self._json(200, emu.configure(cfg))
                if path == "/_emulator/reset" and self.command == "POST":
                    emu.reset()
                    return self._json(200, emu.config_json())
                return self._json(404, {"error": "unknown control path %s %s"
                                        % (self.command, path)})
            except (ValueError, TypeError) as e:
                return self._json(400, {"error": str(e)})

        def _handle(self):
            body = self._read_body()
            if self.path.startswith("/_emulator/"):
                return self._control(body)
            fwd_headers = [(k, v) for k, v in self.headers.items()
                           if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"]

            def forward(new_body):
                b = body if new_body is None else new_body
                st, reason, hdrs, data = upstream.request(self.command, self.path, fwd_headers, b)
                return (st, hdrs, data)

            split = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
            service, region = service_and_region(self.headers, query)
            resp = None
            try:
                if service in ("ec2", "autoscaling"):
                    params, body_pairs, action_in_query = query_params(
                        split.query, body, (self.headers.get("Content-Type") or "").lower())
                    action = params.get("Action")
                    if action and service == "ec2" and body_pairs and not action_in_query:
                        resp = emu.handle_ec2(region, action, params, body_pairs, forward)
                    elif action and service == "ec2":
                        # Action in the query string: no body rewriting possible; enforce
                        # buckets only.
                        resp = emu.plain(action, params, forward)[0]
                    elif action:
                        emu.count_call("autoscaling:" + action)
                if resp is None:
                    resp = forward(None)
            except OSError as e:
                log("upstream error: %s" % e)
                return self._send(502, [("Content-Type", "text/plain")],
                                  ("upstream error: %s\n" % e).encode())
            self._send(resp[0], resp[1], resp[2])

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle

    return Handler
