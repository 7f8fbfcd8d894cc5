"""Unit tests of the emulator's decisions (ec2emu/emulator.py, faults.py, fleet.py), with a
made-up clock and a stand-in for moto: what a call takes from the buckets, what it launches,
what it gives back.

    cd tests/support && python3 -m unittest     (./run.sh test runs them)
"""

import unittest
import unittest.mock
import urllib.parse

from ec2emu import fleet
from ec2emu.emulator import Emulator
from ec2emu.faults import Faults, most_specific


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Moto:
    """Stands in for upstream.Upstream and for forward(): records what was forwarded."""

    def __init__(self, status=200):
        self.status = status
        self.bodies = []

    def forward(self, body):
        self.bodies.append(body)
        return (self.status, [("Content-Type", "text/xml")], b"<ok/>")

    def az_of(self, region, subnet, placement_az=None):
        return placement_az or region + "a"

    def launch_template_data(self, region, params, prefix):
        return None, None

    def reset(self):
        return 200


def run_params(min_count, max_count, **extra):
    p = {"Action": "RunInstances", "MinCount": str(min_count), "MaxCount": str(max_count),
         "InstanceType": "t3.micro", "SubnetId": "subnet-a", "ImageId": "ami-1"}
    p.update(extra)
    return p


class EmulatorTest(unittest.TestCase):
    def setUp(self):
        quiet = unittest.mock.patch("ec2emu.emulator.log", lambda msg: None)
        quiet.start()
        self.addCleanup(quiet.stop)
        self.clock = Clock()
        self.moto = Moto()
        self.emu = Emulator(self.moto, 1.0, clock=self.clock, wall=lambda: 0.0)

    def run_instances(self, min_count, max_count, **extra):
        p = run_params(min_count, max_count, **extra)
        return self.emu.handle_ec2("us-east-1", "RunInstances", p, list(p.items()), self.moto.forward)

    def tokens(self, kind, name):
        return self.emu.config_json()[kind][name]["tokens"]

    def test_run_instances_launches_what_the_instance_bucket_holds(self):
        self.emu.configure({"resource_buckets": {"RunInstances": {"tokens": 4.5}}})
        resp = self.run_instances(1, 10)
        self.assertEqual(resp[0], 200)
        sent = dict(urllib.parse.parse_qsl(self.moto.bodies[-1].decode()))
        self.assertEqual((sent["MinCount"], sent["MaxCount"]), ("4", "4"))
        self.assertAlmostEqual(self.tokens("resource_buckets", "RunInstances"), 0.5)
        st = self.emu.stats_json()
        self.assertEqual((st["instances_launched"], st["partial_fulfilments"]), (4, 1))
        self.assertEqual(st["log"][-1][1:], ["RunInstances", "partial", 4])

    def test_run_instances_body_untouched_when_nothing_changes(self):
        self.run_instances(3, 3)
        self.assertEqual(self.moto.bodies, [None])
        self.assertEqual(self.tokens("resource_buckets", "RunInstances"), 997)

    def test_run_instances_throttled_below_min_count_spends_the_request_token(self):
        self.emu.configure({"resource_buckets": {"RunInstances": {"tokens": 4}}})
        resp = self.run_instances(5, 5)
        self.assertEqual(resp[0], 503)
        self.assertIn(b"RequestLimitExceeded", resp[2])
        self.assertEqual(self.moto.bodies, [])
        self.assertEqual(self.tokens("request_buckets", "RunInstances"), 4)
        self.assertEqual(self.tokens("resource_buckets", "RunInstances"), 4)
        self.clock.t += 0.5  # one instance token at 2/s
        self.assertEqual(self.run_instances(5, 5)[0], 200)

    def test_request_bucket_refills_with_the_clock(self):
        for _ in range(5):
            self.assertEqual(self.run_instances(1, 1)[0], 200)
        self.assertEqual(self.run_instances(1, 1)[0], 503)
        self.clock.t += 0.4  # 0.8 tokens
        self.assertEqual(self.run_instances(1, 1)[0], 503)
        self.clock.t += 0.1
        self.assertEqual(self.run_instances(1, 1)[0], 200)
        self.assertEqual(self.emu.stats_json()["throttled"], {"RunInstances": 2})

    def test_capacity_caps_a_launch_then_refuses(self):
        self.emu.configure({"capacity": {"subnet-a": {"t3.*": 3}}})
        self.run_instances(1, 5)
        sent = dict(urllib.parse.parse_qsl(self.moto.bodies[-1].decode()))
        self.assertEqual(sent["MaxCount"], "3")
        resp = self.run_instances(1, 1, **{"Placement.AvailabilityZone": "us-east-1c"})
        self.assertEqual(resp[0], 500)
        self.assertIn(b"InsufficientInstanceCapacity", resp[2])
        self.assertIn(b"(us-east-1c)", resp[2])
        self.assertEqual(self.emu.config_json()["capacity_remaining"], {"subnet-a": {"t3.micro": 0}})
        self.assertEqual(self.emu.stats_json()["capacity_errors"], 1)

    def test_an_upstream_error_gives_tokens_and_capacity_back(self):
        self.emu.configure({"capacity": {"*": {"*": 10}}})
        self.moto.status = 400
        self.assertEqual(self.run_instances(4, 4)[0], 400)
        self.assertEqual(self.tokens("resource_buckets", "RunInstances"), 1000)
        self.assertEqual(self.emu.config_json()["capacity_remaining"], {"subnet-a": {"t3.micro": 10}})

    def test_terminate_takes_one_instance_token_per_id(self):
        self.emu.configure({"resource_buckets": {"TerminateInstances": {"tokens": 2}}})
        p = {"Action": "TerminateInstances", "InstanceId.1": "i-1", "InstanceId.2": "i-2",
             "InstanceId.3": "i-3"}
        resp = self.emu.handle_ec2("us-east-1", "TerminateInstances", p, list(p.items()), self.moto.forward)
        self.assertEqual(resp[0], 503)
        self.assertEqual(self.tokens("request_buckets", "TerminateInstances"), 99)
        self.assertEqual(self.tokens("resource_buckets", "TerminateInstances"), 2)
        self.clock.t += 0.1  # +2 at 20/s
        resp = self.emu.handle_ec2("us-east-1", "TerminateInstances", p, list(p.items()), self.moto.forward)
        self.assertEqual(resp[0], 200)
        self.assertAlmostEqual(self.tokens("resource_buckets", "TerminateInstances"), 1.0)

    def test_client_token_replays_and_a_lost_answer_is_kept(self):
        self.emu.configure({"lose_responses": 1})
        first = self.run_instances(2, 2, ClientToken="t-1")
        self.assertEqual(first[0], 500)
        again = self.run_instances(2, 2, ClientToken="t-1")
        self.assertEqual(again[0], 200)
        self.assertEqual(len(self.moto.bodies), 1)
        self.assertEqual(self.run_instances(3, 3, ClientToken="t-1")[0], 400)
        st = self.emu.stats_json()
        self.assertEqual((st["lost_responses"], st["idempotent_replays"], st["instances_launched"]),
                         (1, 1, 2))

    def test_reset_refills_and_forgets(self):
        self.run_instances(1, 1, ClientToken="t-2")
        self.emu.configure({"time_scale": 7, "capacity": {"*": {"*": 1}}})
        self.emu.reset()
        cfg = self.emu.config_json()
        self.assertEqual((cfg["time_scale"], cfg["capacity"]), (1.0, None))
        self.assertEqual(self.tokens("request_buckets", "RunInstances"), 5)
        self.assertEqual(self.emu.stats_json()["calls"], {})
        self.run_instances(1, 1, ClientToken="t-2")
        self.assertEqual(self.emu.stats_json()["idempotent_replays"], 0)


class FaultsTest(unittest.TestCase):
    def test_most_specific_capacity(self):
        cap = {"*": {"*": 100}, "subnet-1": {"*": 10, "t3.micro": 5}, "subnet-?": {"t3.micro": 7}}
        self.assertEqual(most_specific(cap, "subnet-1", "t3.micro"), 5)
        self.assertEqual(most_specific(cap, "subnet-1", "m5.large"), 10)
        self.assertEqual(most_specific(cap, "subnet-2", "t3.micro"), 7)
        self.assertEqual(most_specific(cap, "subnet-22", "t3.micro"), 100)
        self.assertIsNone(most_specific({"subnet-1": {"*": 1}}, "subnet-2", "x"))

    def test_pools_count_down_on_their_own(self):
        f = Faults()
        f.configure({"capacity": {"*": {"*": 3}}})
        f.take("a", "t", 2)
        self.assertEqual((f.remaining("a", "t"), f.remaining("b", "t")), (1, 3))
        f.configure({"capacity": {"*": {"*": 3}}})
        self.assertEqual(f.remaining("a", "t"), 3)


class FleetAllocateTest(unittest.TestCase):
    pools = [(1, 1, "subnet-a", "t3.micro", 1.0), (1, 2, "subnet-b", "t3.micro", 2.0),
             (1, 3, "subnet-c", "t3.micro", 3.0)]

    def test_spread_in_order_with_capacity(self):
        f = Faults()
        f.configure({"capacity": {"subnet-a": {"*": 2}, "*": {"*": 100}},
                     "insufficient": [["subnet-b", "*"]]})
        alloc, errors = fleet.allocate(self.pools, 5, f)
        self.assertEqual([(p[2], n) for p, n in alloc], [("subnet-a", 2), ("subnet-c", 3)])
        self.assertEqual([(p[2], code) for p, code, _ in errors], [("subnet-b", fleet.ICE)])

    def test_an_exhausted_pool_is_an_error_only_when_short(self):
        f = Faults()
        f.configure({"capacity": {"*": {"*": 2}}})
        alloc, errors = fleet.allocate(self.pools, 6, f)
        self.assertEqual(sum(n for _, n in alloc), 6)
        self.assertEqual(errors, [])
        alloc, errors = fleet.allocate(self.pools, 7, f)
        self.assertEqual(sum(n for _, n in alloc), 6)
        self.assertEqual(len(errors), 3)

    def test_pools_in_priority_order(self):
        params = {
            "LaunchTemplateConfigs.1.Overrides.1.SubnetId": "subnet-a",
            "LaunchTemplateConfigs.1.Overrides.1.InstanceType": "t3.micro",
            "LaunchTemplateConfigs.1.Overrides.1.Priority": "2",
            "LaunchTemplateConfigs.1.Overrides.2.SubnetId": "subnet-b",
            "LaunchTemplateConfigs.1.Overrides.2.InstanceType": "t3.small",
            "LaunchTemplateConfigs.1.Overrides.2.Priority": "1",
        }
        pools = fleet.fleet_pools(params, lambda prefix: (None, None))
        self.assertEqual([(p[2], p[3]) for p in pools], [("subnet-b", "t3.small"), ("subnet-a", "t3.micro")])


if __name__ == "__main__":
    unittest.main()
