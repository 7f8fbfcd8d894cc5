"""ClientToken idempotency, which moto does not have: the answer to a launch is kept under
(region, action, token); the same token with the same parameters gets that answer again,
with other parameters IdempotentParameterMismatch, and while the first call is in flight a
second one waits for it."""

import threading

# How long a call waits for one in flight with the same token, at most.
INFLIGHT_WAIT_S = 600


class Journal:
    def __init__(self):
        self.lock = threading.Lock()
        self.answers = {}  # key -> (params signature, response)
        self.inflight = {}  # key -> threading.Event

    def begin(self, key, sig):
        """-> ("replay", response) | ("mismatch", None) | ("go", None). "go" makes this call
        the one in flight for `key`: it must call end(key, ...) whatever happens."""
        while True:
            with self.lock:
                hit = self.answers.get(key)
                if hit is not None:
                    if hit[0] != sig:
                        return "mismatch", None
                    return "replay", hit[1]
                ev = self.inflight.get(key)
                if ev is None:
                    self.inflight[key] = threading.Event()
                    return "go", None
            ev.wait(INFLIGHT_WAIT_S)

    def end(self, key, sig, response):
        """The call in flight for `key` is over; `response` (None: nothing to keep) is what
        later calls with the same token and parameters get."""
        with self.lock:
            if response is not None:
                self.answers[key] = (sig, response)
            ev = self.inflight.pop(key, None)
        if ev is not None:
            ev.set()

    def clear(self):
        """Forget every answer (calls in flight finish as usual)."""
        with self.lock:
            self.answers = {}
