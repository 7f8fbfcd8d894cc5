"""fleet's stats plugin for a Locust master: GET <web base path>/fleet/stats.

fleet adds this file to every managed master's locustfile list (`-f SPEC,<this file>`); the
controller embeds it and writes it into the master's workspace at each start. It defines no
User class, so Locust's class picking sees only the spec's.

The route answers the raw material of the master's statistics, the numbers Locust derives its
own `/stats/requests` from, so that the controller can merge several masters exactly
(docs/locust.md, "The merged view's source"):

- per endpoint (method, name) and for the total: request, failure and `None`-time counts, the
  sum, min and max of response times, the content-length sum, the response-time histogram as
  Locust keeps it (rounded ms -> count, Locust's own bucketing), and the requests and failures
  of each second for the last PER_SECOND_WINDOW seconds before the last request;
- errors by (method, name, error) with occurrences and first and last seen;
- the runner's state, user count and worker count, and the stats' start and last request times.

Percentiles are not in it on purpose: merged percentiles come from the merged histograms.
Change nothing here without bumping FORMAT (and the controller's reader with it).
"""
import json
import time

from locust import events

FORMAT = 1
# Locust's current_rps averages seconds [last - 12, last - 3]; 20 leaves room for a master whose
# last request came a few seconds after another's.
PER_SECOND_WINDOW = 20


def _pairs(counts, since=None):
    return sorted([k, v] for k, v in counts.items() if v and (since is None or k >= since))


def _entry(e, since):
    return {
        "method": e.method,
        "name": e.name,
        "num_requests": e.num_requests,
        "num_none_requests": e.num_none_requests,
        "num_failures": e.num_failures,
        "total_response_time": e.total_response_time,
        "min_response_time": e.min_response_time,
        "max_response_time": e.max_response_time,
        "total_content_length": e.total_content_length,
        "response_times": _pairs(e.response_times),
        "reqs_per_sec": _pairs(e.num_reqs_per_sec, since),
        "fails_per_sec": _pairs(e.num_fail_per_sec, since),
    }


def snapshot(environment):
    """The document the route answers (a dict), for this master as it is now."""
    runner = environment.runner
    stats = runner.stats
    last = stats.last_request_timestamp
    since = int(last) - PER_SECOND_WINDOW if last else None
    return {
        "format": FORMAT,
        "time": time.time(),
        "state": runner.state,
        "user_count": runner.user_count,
        "worker_count": getattr(runner, "worker_count", 0),
        "start_time": stats.start_time,
        "last_request_timestamp": last,
        "total": _entry(stats.total, since),
        "entries": [_entry(e, since) for _, e in sorted(stats.entries.items())],
        "errors": [
            {
                "method": err.method,
                "name": err.name,
                "error": err.parse_error(err.error),
                "occurrences": err.occurrences,
                "first_seen": err.first_seen,
                "last_seen": err.last_seen,
            }
            for err in stats.errors.values()
        ],
    }


@events.init.add_listener
def _install(environment, web_ui=None, **_kw):
    # Workers that download the master's locustfiles (`-f -`) get this file too: without a web
    # UI it does nothing.
    if web_ui is None or environment.runner is None:
        return
    options = environment.parsed_options
    base = (getattr(options, "web_base_path", "") or "").rstrip("/")

    @web_ui.app.route(f"{base}/fleet/stats")
    @web_ui.auth_required_if_enabled
    def fleet_stats():
        from flask import Response

        return Response(json.dumps(snapshot(environment)), mimetype="application/json")
