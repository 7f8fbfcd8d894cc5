"""Unit tests of the simulated worker pool (worker_pool.py, pool_traffic.py): each worker's
decisions with a made-up clock, its reports read back by Locust's own code, and a short run
of a small pool against a real Locust master. The comparison with real workers is
pool_validation.py (tests/tests/worker_pool.rs runs it).

    cd tests/support && python3 -m unittest     (./run.sh test runs them)
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
import unittest

import msgpack

from pool_traffic import ERROR, USER_CLASS, Traffic, bucket_response_time
from worker_pool import (CONNECT_RETRY_COUNT, MASTER_HEARTBEAT_TIMEOUT, RUNNING, SimWorker)

HERE = os.path.dirname(os.path.abspath(__file__))
LOCUST = os.environ.get("FLEET_TEST_LOCUST", os.path.join(HERE, "..", "..", ".venv", "bin", "locust"))


def worker(rps=1.0, endpoints=1):
    return SimWorker("vm_" + "0" * 32, Traffic(endpoints, 20, 0.01, 1), random.Random(1), "2.47.0", rps)


def types(msgs):
    return [t for t, _ in msgs]


def spawn(ts, users, stop_timeout=None):
    return {"timestamp": ts, "user_classes_count": {USER_CLASS: users}, "host": None, "stop_timeout": stop_timeout,
            "parsed_options": {}}


class SimWorkerTest(unittest.TestCase):
    def test_says_ready_and_repeats_it_every_5_s_until_the_ack(self):
        w = worker()
        self.assertEqual(w.start(0.0), [("client_ready", "2.47.0")])
        self.assertEqual(w.next_due(), 5.0)
        self.assertEqual(w.due(4.9), [])
        self.assertEqual(types(w.due(5.0)), ["client_ready"])
        self.assertEqual(w.next_due(), 10.0)

    def test_gives_up_after_locusts_retry_count(self):
        w = worker()
        w.start(0.0)
        sent = 1
        t = 0.0
        while not w.gone:
            t += 5.0
            sent += len(w.due(t))
        self.assertEqual((w.gone, sent), ("no-ack", CONNECT_RETRY_COUNT + 1))

    def test_heartbeats_every_second_and_reports_every_3_s_from_the_ack(self):
        w = worker()
        w.start(0.0)
        w.receive("ack", {"index": 7}, 0.5)
        self.assertEqual(w.index, 7)
        self.assertEqual(types(w.due(0.5)), ["heartbeat", "stats", "logs"])
        t, beats, stats = 0.5, 0, 0  # then 30 s in steps of 0.1 s
        while t < 30.5:
            t = round(t + 0.1, 1)
            out = types(w.due(t))
            beats += out.count("heartbeat")
            stats += out.count("stats")
        self.assertEqual((beats, stats), (30, 10))

    def test_spread_phases_put_each_workers_beats_and_reports_at_its_own_offset(self):
        phases = set()
        for seed in range(50):
            w = SimWorker("vm_" + "0" * 32, Traffic(1, 20, 0.01, 1), random.Random(seed), "2.47.0",
                          spread_phases=True)
            w.start(0.0)
            w.receive("ack", {"index": seed}, 0.5)
            self.assertTrue(0.5 <= w.hb_at < 1.5 and 0.5 <= w.stats_at < 3.5, (w.hb_at, w.stats_at))
            phases.add(round(w.hb_at, 4))
            t, beats, stats = 0.5, 0, 0  # the rates stay 1/s and 1/3 s
            while t < 30.5:
                t = round(t + 0.01, 2)
                out = types(w.due(t))
                beats += out.count("heartbeat")
                stats += out.count("stats")
            self.assertIn(beats, (29, 30))
            self.assertIn(stats, (9, 10))
        self.assertGreater(len(phases), 45, "lock-step: the phases are not spread")

    def test_heartbeat_state_and_usage_fields(self):
        w = worker()
        w.start(0.0)
        w.receive("ack", None, 0.0)
        hb = dict(w.due(0.0))["heartbeat"]
        self.assertEqual(set(hb), {"state", "current_cpu_usage", "current_memory_usage"})
        self.assertEqual(hb["state"], "ready")

    def test_measures_the_heartbeat_round_trip(self):
        w = worker()
        w.start(0.0)
        w.receive("ack", None, 0.0)
        w.due(0.0)
        w.due(1.0)
        w.receive("heartbeat", None, 0.25)
        w.receive("heartbeat", None, 1.5)
        self.assertEqual([round(x, 3) for x in w.rtts], [0.25, 0.5])

    def test_spawn_answers_spawning_then_complete_with_the_counts(self):
        w = worker()
        w.start(0.0)
        w.receive("ack", None, 0.0)
        out = w.receive("spawn", spawn(10.0, 4), 1.0)
        self.assertEqual(out, [("spawning", None),
                               ("spawning_complete", {"user_classes_count": {USER_CLASS: 4}, "user_count": 4})])
        self.assertEqual((w.state, w.user_count), (RUNNING, 4))
        # An older or equal timestamp: `spawning` only, as WorkerRunner discards it.
        self.assertEqual(w.receive("spawn", spawn(10.0, 9), 1.1), [("spawning", None)])
        self.assertEqual(w.user_count, 4)
        w.receive("spawning_complete", {"user_count": 4}, 1.2)
        self.assertTrue(w.master_done)

    def test_stop_then_ready_again_after_the_stop_timeout(self):
        w = worker()
        w.start(0.0)
        w.receive("ack", None, 0.0)
        w.receive("spawn", spawn(1.0, 3, stop_timeout=2), 1.0)
        self.assertEqual(w.receive("stop", None, 5.0), [("client_stopped", None)])
        self.assertEqual(w.user_count, 0)
        self.assertNotIn("client_ready", types(w.due(6.9)))
        self.assertIn("client_ready", types(w.due(7.0)))
        self.assertEqual(w.state, "ready")

    def test_quit_sends_a_last_report_then_quit(self):
        w = worker()
        w.start(0.0)
        w.receive("ack", None, 0.0)
        w.receive("spawn", spawn(1.0, 10), 0.0)
        w.due(0.0)
        out = w.receive("quit", None, 2.0)
        self.assertEqual(types(out), ["stats", "quit"])
        self.assertEqual(out[0][1]["stats_total"]["num_requests"], 20)
        self.assertEqual((w.gone, w.next_due(), w.due(3.0)), ("quit", None, []))

    def test_quits_when_the_master_is_silent_for_60_s(self):
        w = worker()
        w.start(0.0)
        w.receive("ack", None, 0.0)
        t = 0.0
        while not w.gone:
            out = w.due(t)
            if t < 10:
                w.receive("heartbeat", None, t)  # the master's last answer is at 9 s
            t += 1.0
        self.assertEqual((w.gone, t - 1.0, types(out)), ("master-silent", 9.0 + MASTER_HEARTBEAT_TIMEOUT + 1, ["stats", "quit"]))

    def test_reconnect_asks_the_loop_for_a_new_socket(self):
        w = worker()
        w.start(0.0)
        w.receive("ack", None, 0.0)
        w.receive("reconnect", None, 1.0)
        self.assertTrue(w.reconnect)

    def test_reports_users_times_rate_times_elapsed_requests(self):
        w = worker(rps=2.0, endpoints=50)
        w.start(0.0)
        w.receive("ack", None, 100.0)
        w.due(100.0)
        w.receive("spawn", spawn(1.0, 10), 100.0)
        report = dict(w.due(103.0))["stats"]
        self.assertEqual(report["stats_total"]["num_requests"], 60)
        self.assertEqual(sum(e["num_requests"] for e in report["stats"]), 60)
        self.assertEqual((report["user_count"], report["user_classes_count"]), (10, {USER_CLASS: 10}))
        self.assertGreater(len(report["stats"]), 20)


class TrafficTest(unittest.TestCase):
    def test_spread_bounds_the_distinct_response_times(self):
        t = Traffic(endpoints=1, spread=5, seed=3)
        r = t.report(1000, 0.0, 3.0, random.Random(1))
        self.assertEqual(len(r["stats"][0]["response_times"]), 5)
        self.assertTrue(all(bucket_response_time(k) == k for k in r["stats"][0]["response_times"]))

    def test_no_requests_reports_only_an_empty_total(self):
        r = Traffic().report(0, 0.0, 3.0, random.Random(1))
        self.assertEqual((r["stats"], r["errors"], r["stats_total"]["num_requests"]), ([], {}, 0))

    def test_locusts_own_merge_reads_the_reports(self):
        """Reports from two workers, msgpack-encoded, go through Locust's Message.unserialize
        and the master's worker_report listener: totals, failures and errors add up, and the
        field names are exactly Locust's."""
        t = Traffic(endpoints=3, spread=10, fail_ratio=0.2, seed=2)
        rng = random.Random(5)
        reports = [t.report(n, 10.0, 13.0, rng) for n in (300, 150)]
        blobs = [msgpack.dumps(("stats", r, "w")) for r in reports]
        script = r"""
import sys, json, msgpack
from locust.event import Events
from locust.rpc.protocol import Message
from locust.stats import RequestStats, StatsEntryDict, StatsErrorDict, setup_distributed_stats_event_listeners
events, stats = Events(), RequestStats()
setup_distributed_stats_event_listeners(events, stats)
keys = sorted(StatsEntryDict.__annotations__), sorted(StatsErrorDict.__annotations__)
for blob in msgpack.loads(sys.stdin.buffer.read()):
    m = Message.unserialize(blob)
    assert all(sorted(e) == keys[0] for e in m.data["stats"] + [m.data["stats_total"]]), "entry fields"
    assert all(sorted(e) == keys[1] for e in m.data["errors"].values()), "error fields"
    events.worker_report.fire(client_id="w", data=m.data)
print(json.dumps({"requests": stats.total.num_requests, "failures": stats.total.num_failures,
    "entries": len(stats.entries), "errors": sum(e.occurrences for e in stats.errors.values()),
    "error": sorted({e.error for e in stats.errors.values()}), "p50": stats.total.get_response_time_percentile(0.5)}))
"""
        out = subprocess.run([os.path.join(os.path.dirname(LOCUST), "python"), "-c", script], input=msgpack.dumps(blobs),
                             capture_output=True, check=True).stdout
        got = json.loads(out)
        failures = sum(r["stats_total"]["num_failures"] for r in reports)
        self.assertEqual((got["requests"], got["entries"], got["failures"], got["errors"]), (450, 3, failures, failures))
        self.assertGreater(failures, 0)
        self.assertEqual(got["error"], [ERROR])
        self.assertIn(got["p50"], {k for ts in t.times for k in ts})


class PoolAgainstRealMasterTest(unittest.TestCase):
    """20 simulated workers and a real master: all connect, a swarm reaches its user count at
    the master, a stop brings every worker back as ready."""

    def test_pool_runs_a_swarm_on_a_real_master(self):
        from pool_validation import Master
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        m = Master(LOCUST, env, subprocess.DEVNULL)
        pool = None
        try:
            wait(m.stats, 30)
            pool = subprocess.Popen([sys.executable, "worker_pool.py", "--workers", "20", "--master", f"127.0.0.1:{m.port}"],
                                    cwd=HERE, stdout=subprocess.PIPE, text=True)
            wait(lambda: (m.stats() or {}).get("worker_count") == 20, 20)
            m.post("/swarm", {"user_count": 40, "spawn_rate": 40})
            wait(lambda: (m.stats() or {}).get("user_count") == 40, 20)
            m.post("/stop")
            wait(lambda: (s := m.stats() or {}).get("state") == "stopped" and s.get("worker_count") == 20, 20)
            line = last_status(pool, lambda s: s["recv"].get("stop") == 20)
            self.assertEqual((line["acked"], line["lost"], line["send_errors"]), (20, {}, 0))
            self.assertEqual(line["recv"]["spawn"], 20)
            self.assertEqual(line["master_spawning_complete"], 20)
            self.assertGreater(line["sent"]["heartbeat"], 20)
        finally:
            m.proc.send_signal(signal.SIGTERM)
            m.proc.wait(10)
            if pool:
                pool.wait(10)  # the master's quit ends every worker, and so the pool
                pool.stdout.close()
        self.assertEqual(pool.returncode, 0)


def wait(fn, timeout):
    t = time.time()
    while time.time() - t < timeout:
        if fn():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def last_status(pool, until):
    for line in pool.stdout:
        s = json.loads(line)
        if until(s):
            return s
    raise AssertionError("the pool ended first")


if __name__ == "__main__":
    unittest.main()
