"""Unit tests of the IMDSv2 emulator's answers (imds.py), for both of its users: the boot
harness (many instances, `/<id>/latest/...`) and the AMI suite (one, `/latest/...`).

    cd tests/support && python3 -m unittest     (./run.sh test runs them)
"""

import unittest

import imds

TTL = {imds.TTL_HEADER: "60"}


def tok(token):
    return {imds.TOKEN_HEADER: token}


class HarnessTest(unittest.TestCase):
    def setUp(self):
        self.insts = imds.Instances()
        self.insts.add("i-1", {"instance-id": "i-1", "instance-type": "t3.micro",
                               "placement/availability-zone": "us-east-1a", "local-ipv4": ""},
                       b"controller = 1\n")
        self.insts.add("i-2", {"instance-id": "i-2"}, None)

    def token(self, iid, now=0.0):
        status, body, _, extra = imds.answer(self.insts, "PUT", "/%s/latest/api/token" % iid, TTL, now)
        self.assertEqual(status, 200)
        self.assertEqual(extra, [(imds.TTL_HEADER, "60")])
        return body.decode()

    def test_token_ttl_must_be_1_to_21600(self):
        for ttl in (None, "0", "21601", "x"):
            h = {} if ttl is None else {imds.TTL_HEADER: ttl}
            self.assertEqual(imds.answer(self.insts, "PUT", "/i-1/latest/api/token", h, 0.0)[0], 400, ttl)
        h = {imds.TTL_HEADER: "21600"}
        self.assertEqual(imds.answer(self.insts, "PUT", "/i-1/latest/api/token", h, 0.0)[0], 200)
        self.assertEqual(imds.answer(self.insts, "GET", "/i-1/latest/api/token", TTL, 0.0)[0], 405)

    def test_items_need_a_live_token_of_the_same_instance(self):
        t1 = self.token("i-1")
        get = imds.answer
        self.assertEqual(get(self.insts, "GET", "/i-1/latest/meta-data/instance-id", {}, 1.0)[0], 401)
        self.assertEqual(get(self.insts, "GET", "/i-2/latest/meta-data/instance-id", tok(t1), 1.0)[0], 401)
        self.assertEqual(get(self.insts, "GET", "/i-1/latest/meta-data/instance-id", tok(t1), 1.0)[:2],
                         (200, b"i-1"))
        self.assertEqual(get(self.insts, "GET", "/i-1/latest/meta-data/instance-id", tok(t1), 61.0)[0], 401)

    def test_what_is_served(self):
        t1, t2 = self.token("i-1"), self.token("i-2")

        def get(path, t):
            return imds.answer(self.insts, "GET", path, tok(t), 1.0)[:2]
        self.assertEqual(get("/i-1/latest/user-data", t1), (200, b"controller = 1\n"))
        self.assertEqual(get("//i-1//latest/meta-data/placement/availability-zone", t1), (200, b"us-east-1a"))
        self.assertEqual(get("/i-1/latest/meta-data/instance-type/", t1), (200, b"t3.micro"))
        self.assertEqual(get("/i-1/latest/meta-data/local-ipv4", t1)[0], 404)  # not known
        self.assertEqual(get("/i-1/latest/meta-data/ami-id", t1)[0], 404)
        self.assertEqual(get("/i-2/latest/user-data", t2)[0], 404)  # none
        self.assertEqual(imds.answer(self.insts, "PUT", "/i-9/latest/api/token", TTL, 0.0)[0], 404)
        self.assertEqual(imds.answer(self.insts, "PUT", "/latest/api/token", TTL, 0.0)[0], 404)


class SingleInstanceTest(unittest.TestCase):
    def test_paths_without_an_id_and_user_data_read_on_each_request(self):
        ud = [None]
        insts = imds.Instances(single="i-0a")
        insts.add("i-0a", {"instance-id": "i-0a"}, lambda: ud[0])
        status, t, _, _ = imds.answer(insts, "PUT", "/latest/api/token", TTL, 0.0)
        self.assertEqual(status, 200)
        h = tok(t.decode())
        self.assertEqual(imds.answer(insts, "GET", "/latest/meta-data/instance-id", h, 1.0)[:2], (200, b"i-0a"))
        self.assertEqual(imds.answer(insts, "GET", "/latest/user-data", h, 1.0)[0], 404)
        ud[0] = b"x = 1\n"
        self.assertEqual(imds.answer(insts, "GET", "/latest/user-data", h, 1.0)[:2], (200, b"x = 1\n"))
        self.assertEqual(imds.answer(insts, "GET", "/latest/user-data", {}, 1.0)[0], 401)


if __name__ == "__main__":
    unittest.main()
