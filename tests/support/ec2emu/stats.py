"""What the control API's /_emulator/stats reports: calls and throttles per action, launch
counters, and a log of the last LOG_MAX EC2 calls."""

import copy

LOG_MAX = 20000
OUTCOMES = ("ok", "throttled", "capacity", "partial", "replay", "lost", "error")
COUNTERS = ("capacity_errors", "partial_fulfilments", "instances_launched",
            "idempotent_replays", "lost_responses")


class Stats:
    def __init__(self):
        self.calls = {}
        self.throttled = {}
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.log = []  # [t_unix, action, outcome, launched]

    def call(self, action):
        self.calls[action] = self.calls.get(action, 0) + 1

    def bump(self, counter, n=1):
        self.counters[counter] += n

    def record(self, t_unix, action, outcome, launched=0):
        assert outcome in OUTCOMES, outcome
        if outcome == "throttled":
            self.throttled[action] = self.throttled.get(action, 0) + 1
        self.log.append([t_unix, action, outcome, launched])
        if len(self.log) > LOG_MAX:
            del self.log[: len(self.log) - LOG_MAX]

    def as_json(self):
        out = {"calls": copy.deepcopy(self.calls), "throttled": copy.deepcopy(self.throttled)}
        out.update(self.counters)
        out["log"] = list(self.log)
        return out
