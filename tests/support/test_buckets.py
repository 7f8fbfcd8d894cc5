"""Unit tests of the emulator's bucket arithmetic (ec2emu/buckets.py).

    cd tests/support && python3 -m unittest     (./run.sh test runs them)
"""

import unittest

from ec2emu.buckets import (DEFAULT_REQUEST_BUCKETS, DEFAULT_RESOURCE_BUCKETS, Bucket, Limits,
                            request_bucket_name)


class BucketTest(unittest.TestCase):
    def test_starts_full(self):
        b = Bucket(5, 2, now=100.0)
        self.assertEqual(b.tokens, 5)

    def test_refill_is_elapsed_times_rate_times_scale(self):
        b = Bucket(5, 2, now=0.0)
        self.assertTrue(b.take(5, 0.0, 1))
        b.settle(1.0, 1)
        self.assertAlmostEqual(b.tokens, 2.0)
        b.settle(1.25, 4)  # 0.25 s at 2/s, 4 times faster
        self.assertAlmostEqual(b.tokens, 4.0)

    def test_refill_stops_at_burst(self):
        b = Bucket(5, 2, now=0.0)
        b.take(3, 0.0, 1)
        b.settle(3600.0, 50)
        self.assertEqual(b.tokens, 5)

    def test_a_clock_going_back_changes_nothing(self):
        b = Bucket(5, 2, now=10.0)
        b.take(5, 10.0, 1)
        b.settle(9.0, 1)
        self.assertEqual((b.tokens, b.last), (0, 10.0))
        b.settle(10.5, 1)  # counted from 10.0, not from 9.0
        self.assertAlmostEqual(b.tokens, 1.0)

    def test_take_all_or_nothing(self):
        b = Bucket(5, 2, now=0.0)
        self.assertFalse(b.take(6, 0.0, 1))
        self.assertEqual(b.tokens, 5)
        self.assertTrue(b.take(5, 0.0, 1))
        self.assertEqual(b.tokens, 0)
        self.assertFalse(b.take(1, 0.4, 1))  # 0.8 refilled
        self.assertAlmostEqual(b.tokens, 0.8)
        self.assertTrue(b.take(1, 0.5, 1))

    def test_whole_tokens_tolerate_rounding(self):
        b = Bucket(1000, 2, now=0.0)
        b.tokens = 2.9999999999
        self.assertEqual(b.whole(0.0, 1), 3)
        b.tokens = 2.9
        self.assertEqual(b.whole(0.0, 1), 2)

    def test_give_back_stops_at_burst(self):
        b = Bucket(10, 1, now=0.0)
        b.take(4, 0.0, 1)
        b.give_back(3)
        self.assertEqual(b.tokens, 9)
        b.give_back(3)
        self.assertEqual(b.tokens, 10)

    def test_update_keeps_omitted_fields_and_clips_the_fill(self):
        b = Bucket(100, 5, now=0.0)
        b.update({"burst": 20})
        self.assertEqual(b.as_json(), {"burst": 20, "refill": 5, "tokens": 20})
        b.update({"tokens": 0})
        self.assertEqual(b.as_json(), {"burst": 20, "refill": 5, "tokens": 0})
        b.update({"refill": 1, "tokens": 50})
        self.assertEqual(b.as_json(), {"burst": 20, "refill": 1, "tokens": 20})


class RequestBucketNameTest(unittest.TestCase):
    def name(self, action, params=(), extra=None):
        buckets = dict(DEFAULT_REQUEST_BUCKETS)
        buckets.update(extra or {})
        return request_bucket_name(action, dict.fromkeys(params, "x"), buckets)

    def test_actions_with_their_own_bucket(self):
        for a in ("RunInstances", "StartInstances", "TerminateInstances", "CreateTags"):
            self.assertEqual(self.name(a), a)

    def test_describe_instances_unfiltered_or_not(self):
        self.assertEqual(self.name("DescribeInstances"), "DescribeInstancesUnfiltered")
        self.assertEqual(self.name("DescribeInstances", ["InstanceId.1"]),
                         "DescribeInstancesUnfiltered")
        for p in ("Filter.1.Name", "MaxResults", "NextToken"):
            self.assertEqual(self.name("DescribeInstances", [p]), "NonMutating", p)

    def test_families(self):
        self.assertEqual(self.name("DescribeSubnets"), "NonMutating")
        self.assertEqual(self.name("GetConsoleOutput"), "NonMutating")
        self.assertEqual(self.name("ListImagesInRecycleBin"), "NonMutating")
        self.assertEqual(self.name("CreateFleet"), "DefaultMutating")
        self.assertEqual(self.name("StopInstances"), "DefaultMutating")

    def test_a_configured_bucket_takes_over_and_shared_names_stay_shared(self):
        self.assertEqual(self.name("CreateFleet", extra={"CreateFleet": None}), "CreateFleet")
        self.assertEqual(self.name("NonMutating"), "DefaultMutating")


class LimitsTest(unittest.TestCase):
    def test_defaults_full(self):
        lim = Limits(1.0, now=0.0)
        j = lim.as_json()
        self.assertEqual(j["request_buckets"]["RunInstances"], {"burst": 5, "refill": 2, "tokens": 5})
        self.assertEqual(set(j["request_buckets"]), set(DEFAULT_REQUEST_BUCKETS))
        self.assertEqual(set(j["resource_buckets"]), set(DEFAULT_RESOURCE_BUCKETS))
        self.assertEqual(j["resource_buckets"]["RunInstances"]["tokens"], 1000)

    def test_a_call_takes_from_its_bucket_only(self):
        lim = Limits(1.0, now=0.0)
        for _ in range(50):
            self.assertTrue(lim.take_request("DescribeInstances", {}, 0.0))
        self.assertFalse(lim.take_request("DescribeInstances", {}, 0.0))
        self.assertTrue(lim.take_request("DescribeInstances", {"MaxResults": "5"}, 0.0))
        self.assertEqual(lim.request["NonMutating"].tokens, 99)
        self.assertEqual(lim.request["DescribeInstancesUnfiltered"].tokens, 0)

    def test_time_scale_multiplies_refill_not_burst(self):
        lim = Limits(50.0, now=0.0)
        for _ in range(5):
            self.assertTrue(lim.take_request("RunInstances", {}, 0.0))
        self.assertFalse(lim.take_request("RunInstances", {}, 0.0))
        self.assertTrue(lim.take_request("RunInstances", {}, 0.01))  # 0.01 s * 2/s * 50 = 1
        lim.settle_all(100.0)
        self.assertEqual(lim.request["RunInstances"].tokens, 5)

    def test_instance_tokens(self):
        lim = Limits(1.0, now=0.0)
        lim.configure({"resource_buckets": {"TerminateInstances": {"tokens": 2}}}, 0.0)
        self.assertFalse(lim.take_instances("TerminateInstances", 3, 0.0))
        self.assertTrue(lim.take_instances("TerminateInstances", 3, 0.05))  # + 0.05 * 20
        self.assertAlmostEqual(lim.resource["TerminateInstances"].tokens, 0.0)

    def test_a_new_time_scale_counts_from_the_change(self):
        lim = Limits(1.0, now=0.0)
        lim.configure({"request_buckets": {"RunInstances": {"tokens": 0}}}, 0.0)
        lim.configure({"time_scale": 10}, 1.0)  # 1 s at 2/s before the change
        self.assertAlmostEqual(lim.request["RunInstances"].tokens, 2.0)
        lim.settle_all(1.1)  # 0.1 s at 2/s * 10 after it
        self.assertAlmostEqual(lim.request["RunInstances"].tokens, 4.0)

    def test_new_request_bucket_needs_burst_and_refill(self):
        lim = Limits(1.0, now=0.0)
        with self.assertRaisesRegex(ValueError, "needs burst and refill"):
            lim.configure({"request_buckets": {"CreateFleet": {"burst": 3}}}, 0.0)
        lim.configure({"request_buckets": {"CreateFleet": {"burst": 3, "refill": 1, "tokens": 1}}}, 0.0)
        self.assertTrue(lim.take_request("CreateFleet", {}, 0.0))
        self.assertFalse(lim.take_request("CreateFleet", {}, 0.0))
        self.assertEqual(lim.request["DefaultMutating"].tokens, 50)

    def test_bad_config(self):
        lim = Limits(1.0, now=0.0)
        for cfg in ({"time_scale": 0}, {"resource_buckets": {"CreateFleet": {"burst": 1, "refill": 1}}},
                    {"request_buckets": {"RunInstances": 5}}):
            with self.assertRaises(ValueError, msg=cfg):
                lim.configure(cfg, 0.0)


if __name__ == "__main__":
    unittest.main()
