"""The HTTP server the test tools listen with, and their HOST:PORT arguments (stdlib only)."""

import argparse
import http.server


class Server(http.server.ThreadingHTTPServer):
    """Threaded, restartable on the same port, with a deep accept queue: a thousand agents
    may connect at once."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


def parse_hostport(s):
    """`HOST:PORT` -> (host, port), for argparse (`type=parse_hostport`)."""
    host, _, port = s.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT, got %r" % s)
    return host, int(port)
