"""The made-up traffic behind the simulated worker pool's `stats` reports.

One model, used on both sides of the pool's validation: `worker_pool.py` builds each simulated
worker's 3-second report from it, and `pool_locustfile.py` makes real Locust workers log the
same requests (same endpoints, rate, response times and failures) through Locust's own stats
code. Only the standard library: the locustfile imports it inside Locust's gevent process.

Response times are drawn from a fixed set of `spread` distinct values per endpoint (a
log-normal around 60 ms, rounded the way Locust rounds them for its histogram), so `spread`
bounds the distinct keys an endpoint's `response_times` can carry in one report: that, and
the number of endpoints, is what makes a report big.
"""
import hashlib
import random
from collections import Counter

# The user class both sides report; the bench's locustfile defines it too.
USER_CLASS = "PoolUser"
# What Locust files a failure under: repr() of the exception pool_locustfile.py raises.
ERROR_MESSAGE = "500 Server Error: Internal Server Error"
ERROR = f"Exception({ERROR_MESSAGE!r})"
CONTENT_LENGTH = 1200


def bucket_response_time(ms):
    """Locust's histogram key for a response time (locust.stats.bucket_response_time)."""
    if ms < 100:
        return round(ms)
    if ms < 1000:
        return int(round(ms, -1))
    if ms < 10000:
        return int(round(ms, -2))
    return int(round(ms, -3))


def error_key(method, name, error):
    """The key Locust files an error under (locust.stats.StatsError.create_key)."""
    return hashlib.sha256(f"{method}.{name}.{error!r}".encode()).hexdigest()


class Traffic:
    """Endpoints, each with its own response-time values; a seed makes it repeatable."""

    def __init__(self, endpoints=1, spread=20, fail_ratio=0.01, seed=1):
        rng = random.Random(seed)
        self.endpoints = [("GET", f"/api/item/{i}") for i in range(endpoints)]
        self.fail_ratio = fail_ratio
        self.times = []
        for _ in self.endpoints:
            values = set()
            while len(values) < spread:
                values.add(max(1, bucket_response_time(rng.lognormvariate(4.1, 0.7))))
            self.times.append(sorted(values))

    def sample(self, rng):
        """One request: (method, name, response time ms, failed)."""
        i = rng.randrange(len(self.endpoints))
        method, name = self.endpoints[i]
        return method, name, rng.choice(self.times[i]), rng.random() < self.fail_ratio

    def report(self, requests, since, now, rng):
        """What a worker's `report_to_master` puts in one `stats` message after `requests`
        requests spread evenly over [since, now): `stats`, `stats_total` and `errors`, with
        the fields and types of locust.stats.StatsEntry.serialize and StatsError.serialize."""
        per_endpoint = Counter(rng.randrange(len(self.endpoints)) for _ in range(requests))
        seconds = list(range(int(since), int(now) + 1)) if requests else []
        entries, errors = [], {}
        total = _entry("Aggregated", "", since)
        for i, n in sorted(per_endpoint.items()):
            method, name = self.endpoints[i]
            e = _entry(name, method, since)
            times = Counter(rng.choices(self.times[i], k=n))
            fails = sum(1 for _ in range(n) if rng.random() < self.fail_ratio)
            _fill(e, n, times, fails, seconds, now)
            entries.append(e)
            if fails:
                errors[error_key(method, name, ERROR)] = {
                    "name": name, "method": method, "error": ERROR, "occurrences": fails,
                    "first_seen": since + (now - since) * 0.1, "last_seen": now - (now - since) * 0.1,
                }
            _add(total, e)
        return {"stats": entries, "stats_total": total, "errors": errors}


def _entry(name, method, start):
    return {
        "name": name, "method": method, "last_request_timestamp": None, "start_time": start,
        "num_requests": 0, "num_none_requests": 0, "num_failures": 0, "total_response_time": 0,
        "max_response_time": 0, "min_response_time": None, "total_content_length": 0,
        "response_times": {}, "num_reqs_per_sec": {}, "num_fail_per_sec": {},
    }


def _spread(n, seconds):
    """n split over the seconds as evenly as whole numbers allow."""
    out = {}
    for k, s in enumerate(seconds):
        share = n // len(seconds) + (1 if k < n % len(seconds) else 0)
        if share:
            out[s] = share
    return out


def _fill(e, n, times, fails, seconds, now):
    e["num_requests"] = n
    e["num_failures"] = fails
    e["total_response_time"] = sum(t * c for t, c in times.items())
    e["max_response_time"] = max(times)
    e["min_response_time"] = min(times)
    e["total_content_length"] = n * CONTENT_LENGTH
    e["response_times"] = dict(times)
    e["num_reqs_per_sec"] = _spread(n, seconds)
    e["num_fail_per_sec"] = _spread(fails, seconds)
    e["last_request_timestamp"] = now


def _add(total, e):
    for k in ("num_requests", "num_failures", "total_response_time", "total_content_length"):
        total[k] += e[k]
    total["max_response_time"] = max(total["max_response_time"], e["max_response_time"])
    lo = total["min_response_time"]
    total["min_response_time"] = e["min_response_time"] if lo is None else min(lo, e["min_response_time"])
    total["last_request_timestamp"] = e["last_request_timestamp"]
    for field in ("response_times", "num_reqs_per_sec", "num_fail_per_sec"):
        for k, v in e[field].items():
            total[field][k] = total[field].get(k, 0) + v
