#!/usr/bin/env python3
"""EC2 throttling / fault emulator: an HTTP proxy between an AWS SDK and moto_server.

It enforces EC2's documented token buckets (shared/EC2-LIMITS.md, refill scaled in time),
answers RequestLimitExceeded, injects InsufficientInstanceCapacity and partial fulfilment,
honours RunInstances/CreateFleet ClientToken idempotency (moto does not), and can "lose"
successful launch responses. Everything else is forwarded to moto untouched.

Standard library only. See tests/support/README.md for the control API.
"""

import argparse
import copy
import fnmatch
import http.client
import http.server
import json
import math
import re
import socket
import sys
import threading
import time
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape as xml_escape

# --------------------------------------------------------------------------------------------
# Defaults (shared/EC2-LIMITS.md)

DEFAULT_REQUEST_BUCKETS = {
    "RunInstances": (5, 2),
    "StartInstances": (5, 2),
    "TerminateInstances": (100, 5),
    "CreateTags": (100, 10),
    "DeleteTags": (100, 10),
    "CreateLaunchTemplateVersion": (100, 5),
    "ModifyLaunchTemplate": (100, 5),
    "NonMutating": (100, 20),  # Describe*/Get*/List* (filtered or paginated)
    "DescribeInstancesUnfiltered": (50, 10),  # DescribeInstances, no Filter.*/MaxResults/NextToken
    "DefaultMutating": (50, 5),  # every other action, CreateFleet included
}
DEFAULT_RESOURCE_BUCKETS = {
    "RunInstances": (1000, 2),  # also CreateFleet instances
    "TerminateInstances": (1000, 20),
    "StartInstances": (1000, 2),
    "StopInstances": (1000, 20),
}
LOG_MAX = 20000
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection", "expect",
}
OUTCOMES = ("ok", "throttled", "capacity", "partial", "replay", "lost", "error")


def log(msg):
    sys.stderr.write("%s ec2_emulator: %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def error_xml(code, message):
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>%s</Code>'
        "<Message>%s</Message></Error></Errors><RequestID>%s</RequestID></Response>"
        % (code, xml_escape(message), uuid.uuid4())
    ).encode()


def error_response(status, code, message):
    return (status, [("Content-Type", "text/xml")], error_xml(code, message))


def throttled_response():
    return error_response(503, "RequestLimitExceeded", "Request limit exceeded.")


def strip_ns(tag):
    return tag.rsplit("}", 1)[-1]


def xml_find_text(root, path):
    """Find text by a slash-separated path of local names (namespace-agnostic)."""
    nodes = [root]
    for part in path.split("/"):
        nxt = []
        for n in nodes:
            nxt.extend(c for c in n if strip_ns(c.tag) == part)
        nodes = nxt
    for n in nodes:
        if n.text is not None:
            return n.text
    return None


# --------------------------------------------------------------------------------------------
# Token buckets


class Bucket:
    __slots__ = ("burst", "refill", "tokens", "last")

    def __init__(self, burst, refill, now):
        self.burst = float(burst)
        self.refill = float(refill)
        self.tokens = float(burst)
        self.last = now

    def settle(self, now, scale):
        elapsed = now - self.last
        if elapsed > 0:  # never move `last` backwards
            self.tokens = min(self.burst, self.tokens + elapsed * self.refill * scale)
            self.last = now

    def as_json(self):
        return {"burst": self.burst, "refill": self.refill, "tokens": self.tokens}


def make_buckets(defaults, now):
    return {name: Bucket(b, r, now) for name, (b, r) in defaults.items()}


# --------------------------------------------------------------------------------------------
# Upstream forwarding


class Upstream:
    def __init__(self, url):
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http":
            raise SystemExit("upstream must be http://host:port")
        self.host = u.hostname
        self.port = u.port or 80
        self.local = threading.local()

    def _conn(self):
        c = getattr(self.local, "conn", None)
        if c is None:
            c = http.client.HTTPConnection(self.host, self.port, timeout=600)
            self.local.conn = c
            self.local.used = False
        return c

    def request(self, method, path, headers, body):
        """-> (status, reason, [(k, v)], body). Retries once on a stale kept-alive socket."""
        for attempt in (0, 1):
            conn = self._conn()
            reused = conn.sock is not None
            try:
                conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                has_host = False
                for k, v in headers:
                    if k.lower() == "host":
                        has_host = True
                    conn.putheader(k, v)
                if not has_host:
                    conn.putheader("Host", "%s:%d" % (self.host, self.port))
                if body or method in ("POST", "PUT", "PATCH"):
                    conn.putheader("Content-Length", str(len(body or b"")))
                conn.endheaders(body if body else None)
                resp = conn.getresponse()
                data = resp.read()
                hdrs = resp.getheaders()
                if resp.will_close:
                    conn.close()
                return resp.status, resp.reason, hdrs, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                self.local.conn = None
                if attempt == 0 and reused:
                    continue
                raise
            except Exception:
                conn.close()
                self.local.conn = None
                raise

    def ec2_query(self, region, params):
        """Our own EC2 query against moto (moto does not verify signatures)."""
        body = urllib.parse.urlencode(params).encode()
        auth = (
            "AWS4-HMAC-SHA256 Credential=testing/20240101/%s/ec2/aws4_request, "
            "SignedHeaders=host, Signature=0" % region
        )
        headers = [
            ("Host", "%s:%d" % (self.host, self.port)),
            ("Content-Type", "application/x-www-form-urlencoded; charset=utf-8"),
            ("Authorization", auth),
        ]
        status, _, _, data = self.request("POST", "/", headers, body)
        if status != 200:
            return None
        try:
            return ET.fromstring(data)
        except ET.ParseError:
            return None


# --------------------------------------------------------------------------------------------
# The emulator state


class Emulator:
    def __init__(self, upstream, time_scale):
        self.upstream = upstream
        self.cli_time_scale = time_scale
        self.lock = threading.Lock()
        self.subnet_az = {}
        self._reset_locked()

    # -- state ---------------------------------------------------------------------------

    def _reset_locked(self):
        now = time.monotonic()
        self.time_scale = self.cli_time_scale
        self.request_buckets = make_buckets(DEFAULT_REQUEST_BUCKETS, now)
        self.resource_buckets = make_buckets(DEFAULT_RESOURCE_BUCKETS, now)
        self.capacity = None  # config as given; None = unlimited
        self.capacity_remaining = {}  # (subnet, type) -> remaining (concrete pools)
        self.insufficient = []
        self.lose_responses = 0
        self.token_cache = {}  # (region, action, token) -> (params_sig, response)
        self.inflight = {}  # same key -> threading.Event
        self.subnet_az = {}
        self.stats = {
            "calls": {}, "throttled": {}, "capacity_errors": 0, "partial_fulfilments": 0,
            "instances_launched": 0, "idempotent_replays": 0, "lost_responses": 0,
        }
        self.log = []

    def reset(self):
        with self.lock:
            self._reset_locked()
        try:
            st, _, _, _ = self.upstream.request(
                "POST", "/moto-api/reset", [("Content-Length", "0")], b"")
        except OSError as e:
            st = "unreachable (%s)" % e
        log("reset (moto reset: %s)" % st)

    def _settle_all(self, now):
        for b in list(self.request_buckets.values()) + list(self.resource_buckets.values()):
            b.settle(now, self.time_scale)

    def config_json(self):
        with self.lock:
            self._settle_all(time.monotonic())
            return self._config_json_locked()

    def _config_json_locked(self):
        rem = {}
        for (s, t), n in sorted(self.capacity_remaining.items()):
            rem.setdefault(s, {})[t] = n
        return {
            "time_scale": self.time_scale,
            "request_buckets": {k: b.as_json() for k, b in self.request_buckets.items()},
            "resource_buckets": {k: b.as_json() for k, b in self.resource_buckets.items()},
            "capacity": self.capacity,
            "capacity_remaining": rem,
            "insufficient": self.insufficient,
            "lose_responses": self.lose_responses,
        }

    def configure(self, cfg):
        if not isinstance(cfg, dict):
            raise ValueError("config must be a JSON object")
        known = {"time_scale", "request_buckets", "resource_buckets", "capacity",
                 "insufficient", "lose_responses"}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError("unknown config keys: %s" % sorted(unknown))
        with self.lock:
            now = time.monotonic()
            self._settle_all(now)
            if "time_scale" in cfg:
                ts = float(cfg["time_scale"])
                if not ts > 0:
                    raise ValueError("time_scale must be > 0")
                self.time_scale = ts
            for key, buckets in (("request_buckets", self.request_buckets),
                                 ("resource_buckets", self.resource_buckets)):
                for name, spec in (cfg.get(key) or {}).items():
                    if not isinstance(spec, dict):
                        raise ValueError("%s.%s must be an object" % (key, name))
                    b = buckets.get(name)
                    if b is None:
                        if key == "resource_buckets" or not ("burst" in spec and "refill" in spec):
                            raise ValueError(
                                "unknown %s %r (known: %s; a new per-action request bucket "
                                "needs burst and refill)" % (key, name, sorted(buckets)))
                        b = buckets[name] = Bucket(spec["burst"], spec["refill"], now)
                    if "burst" in spec:
                        b.burst = float(spec["burst"])
                    if "refill" in spec:
                        b.refill = float(spec["refill"])
                    if "tokens" in spec:
                        b.tokens = float(spec["tokens"])
                    b.tokens = min(b.tokens, b.burst)
            if "capacity" in cfg:
                cap = cfg["capacity"]
                if cap is not None:
                    if not isinstance(cap, dict) or not all(
                            isinstance(v, dict) for v in cap.values()):
                        raise ValueError("capacity must be {subnet: {type: n}}")
                    cap = {s: {t: int(n) for t, n in v.items()} for s, v in cap.items()}
                self.capacity = cap
                self.capacity_remaining = {}
            if "insufficient" in cfg:
                ins = cfg["insufficient"] or []
                if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in ins):
                    raise ValueError("insufficient must be a list of [subnet, type]")
                self.insufficient = [[str(a), str(b)] for a, b in ins]
            if "lose_responses" in cfg:
                self.lose_responses = int(cfg["lose_responses"])
            out = self._config_json_locked()
        log("config %s" % json.dumps(cfg, sort_keys=True))
        return out

    def stats_json(self):
        with self.lock:
            s = copy.deepcopy(self.stats)
            s["log"] = list(self.log)
            return s

    # -- helpers (call with lock held) ----------------------------------------------------

    def _record(self, action, outcome, launched=0):
        if outcome == "throttled":
            self.stats["throttled"][action] = self.stats["throttled"].get(action, 0) + 1
        self.log.append([time.time(), action, outcome, launched])
        if len(self.log) > LOG_MAX:
            del self.log[: len(self.log) - LOG_MAX]

    def _count_call(self, action):
        self.stats["calls"][action] = self.stats["calls"].get(action, 0) + 1

    def _request_bucket_name(self, action, params):
        if action in self.request_buckets and action not in (
                "NonMutating", "DescribeInstancesUnfiltered", "DefaultMutating"):
            return action
        if action == "DescribeInstances":
            if not any(k.startswith("Filter.") or k in ("MaxResults", "NextToken")
                       for k in params):
                return "DescribeInstancesUnfiltered"
            return "NonMutating"
        if action.startswith(("Describe", "Get", "List")):
            return "NonMutating"
        return "DefaultMutating"

    def _take_request_token(self, action, params, now):
        b = self.request_buckets[self._request_bucket_name(action, params)]
        b.settle(now, self.time_scale)
        if b.tokens >= 1:
            b.tokens -= 1
            return True
        return False

    def _is_insufficient(self, subnet, itype):
        return any(fnmatch.fnmatchcase(subnet, s) and fnmatch.fnmatchcase(itype, t)
                   for s, t in self.insufficient)

    def _remaining(self, subnet, itype):
        """Remaining capacity of a concrete pool, None = unlimited."""
        if self.capacity is None:
            return None
        key = (subnet, itype)
        if key in self.capacity_remaining:
            return self.capacity_remaining[key]
        best = None
        for sp, types in self.capacity.items():
            if not fnmatch.fnmatchcase(subnet, sp):
                continue
            for tp, n in types.items():
                if not fnmatch.fnmatchcase(itype, tp):
                    continue
                score = ("*" not in sp and "?" not in sp, len(sp),
                         "*" not in tp and "?" not in tp, len(tp))
                if best is None or score > best[0]:
                    best = (score, n)
        if best is None:
            return None
        self.capacity_remaining[key] = best[1]
        return best[1]

    def _take_capacity(self, subnet, itype, k):
        rem = self._remaining(subnet, itype)
        if rem is not None:
            self.capacity_remaining[(subnet, itype)] = rem - k

    def _refund(self, subnet, itype, k):
        rb = self.resource_buckets["RunInstances"]
        rb.tokens = min(rb.burst, rb.tokens + k)
        if (subnet, itype) in self.capacity_remaining:
            self.capacity_remaining[(subnet, itype)] += k

    # -- lookups against moto (no lock held) ---------------------------------------------

    def az_of(self, region, subnet, placement_az=None):
        if placement_az:
            return placement_az
        if subnet:
            az = self.subnet_az.get((region, subnet))
            if az is None:
                try:
                    root = self.upstream.ec2_query(region, {
                        "Action": "DescribeSubnets", "Version": "2016-11-15",
                        "SubnetId.1": subnet})
                    az = xml_find_text(root, "subnetSet/item/availabilityZone") if root is not None else None
                except OSError:
                    az = None
                if az:
                    self.subnet_az[(region, subnet)] = az
            if az:
                return az
        return region + "a"

    def launch_template_data(self, region, params, prefix):
        """Instance type and subnet from a launch template referenced by params[prefix.*]."""
        q = {"Action": "DescribeLaunchTemplateVersions", "Version": "2016-11-15"}
        if params.get(prefix + "LaunchTemplateId"):
            q["LaunchTemplateId"] = params[prefix + "LaunchTemplateId"]
        elif params.get(prefix + "LaunchTemplateName"):
            q["LaunchTemplateName"] = params[prefix + "LaunchTemplateName"]
        else:
            return None, None
        q["LaunchTemplateVersion.1"] = params.get(prefix + "Version") or "$Default"
        try:
            root = self.upstream.ec2_query(region, q)
        except OSError:
            return None, None
        if root is None:
            return None, None
        itype = xml_find_text(root, "launchTemplateVersionSet/item/launchTemplateData/instanceType")
        subnet = xml_find_text(
            root, "launchTemplateVersionSet/item/launchTemplateData/networkInterfaceSet/item/subnetId")
        return itype, subnet

    # -- idempotency ----------------------------------------------------------------------

    def _idem_begin(self, key, sig):
        """-> ('replay', response) | ('mismatch', None) | ('go', None). Waits on in-flight."""
        while True:
            with self.lock:
                hit = self.token_cache.get(key)
                if hit is not None:
                    if hit[0] != sig:
                        return "mismatch", None
                    return "replay", hit[1]
                ev = self.inflight.get(key)
                if ev is None:
                    self.inflight[key] = threading.Event()
                    return "go", None
            ev.wait(600)

    def _idem_end(self, key):
        with self.lock:
            ev = self.inflight.pop(key, None)
        if ev is not None:
            ev.set()

    # -- the EC2 entry point ----------------------------------------------------------------

    def handle_ec2(self, region, action, params, pairs, forward):
        """forward(new_body_or_None) -> (status, headers, body). Returns a response tuple."""
        if action not in ("RunInstances", "CreateFleet"):
            return self._plain(action, params, forward)[0]
        token = params.get("ClientToken")
        if not token:
            resp, lost = self._launch(region, action, params, pairs, forward)
            return lost_response(action) if lost else resp
        key = (region, action, token)
        sig = sorted((k, v) for k, v in pairs if k != "ClientToken")
        state, resp = self._idem_begin(key, sig)
        if state == "replay":
            with self.lock:
                self._count_call(action)
                self.stats["idempotent_replays"] += 1
                self._record(action, "replay", 0)
            log("%s replay of ClientToken=%s (nothing launched)" % (action, token))
            return resp
        if state == "mismatch":
            with self.lock:
                self._count_call(action)
                self._record(action, "error", 0)
            return error_response(
                400, "IdempotentParameterMismatch",
                "The client token %s was already used with different parameters." % token)
        try:
            resp, lost = self._launch(region, action, params, pairs, forward)
            if resp[0] == 200:
                with self.lock:
                    self.token_cache[key] = (sig, resp)
            return lost_response(action) if lost else resp
        finally:
            self._idem_end(key)

    def _take_lost_locked(self):
        if self.lose_responses > 0:
            self.lose_responses -= 1
            self.stats["lost_responses"] += 1
            return True
        return False

    def _plain(self, action, params, forward):
        res_name = action if action in ("TerminateInstances", "StartInstances",
                                        "StopInstances") else None
        n = sum(1 for k in params if re.fullmatch(r"InstanceId\.\d+", k)) if res_name else 0
        with self.lock:
            now = time.monotonic()
            self._count_call(action)
            ok = self._take_request_token(action, params, now)
            if ok and res_name:
                rb = self.resource_buckets[res_name]
                rb.settle(now, self.time_scale)
                if rb.tokens >= n:
                    rb.tokens -= n
                else:
                    ok = False
            if not ok:
                self._record(action, "throttled", 0)
        if not ok:
            log("%s throttled" % action)
            return throttled_response(), False
        resp = forward(None)
        with self.lock:
            self._record(action, "ok" if resp[0] < 400 else "error", 0)
            if resp[0] >= 400 and res_name:
                rb = self.resource_buckets[res_name]
                rb.tokens = min(rb.burst, rb.tokens + n)
        if res_name:
            log("%s %d instance(s) -> %d" % (action, n, resp[0]))
        return resp, False

    def _launch(self, region, action, params, pairs, forward):
        if action == "RunInstances":
            return self._run_instances(region, params, pairs, forward)
        if params.get("Type", "maintain") == "instant":
            return self._create_fleet_instant(region, params, pairs, forward)
        return self._plain(action, params, forward)

    # -- RunInstances -----------------------------------------------------------------------

    def _run_instances(self, region, params, pairs, forward):
        action = "RunInstances"
        try:
            min_count = int(params.get("MinCount", ""))
            max_count = int(params.get("MaxCount", ""))
        except ValueError:
            min_count = max_count = None
        if min_count is None or min_count < 1 or max_count < min_count:
            with self.lock:
                self._count_call(action)
                self._record(action, "error", 0)
            return error_response(
                400, "InvalidParameterValue",
                "MinCount and MaxCount must be integers with 1 <= MinCount <= MaxCount"), False
        subnet = params.get("SubnetId") or params.get("NetworkInterface.1.SubnetId") or ""
        itype = params.get("InstanceType") or ""
        if not itype or not subnet:
            lt_type, lt_subnet = None, None
            if any(k.startswith("LaunchTemplate.") for k in params):
                lt_type, lt_subnet = self.launch_template_data(region, params, "LaunchTemplate.")
            itype = itype or lt_type or "m1.small"
            subnet = subnet or lt_subnet or ""
        with self.lock:
            now = time.monotonic()
            self._count_call(action)
            outcome = None
            if not self._take_request_token(action, params, now):
                outcome = "throttled"
            else:
                rb = self.resource_buckets["RunInstances"]
                rb.settle(now, self.time_scale)
                if rb.tokens < min_count:
                    outcome = "throttled"
            if outcome is None:
                rem = self._remaining(subnet, itype)
                if self._is_insufficient(subnet, itype) or (rem is not None and rem < min_count):
                    outcome = "capacity"
                    self.stats["capacity_errors"] += 1
            if outcome is not None:
                self._record(action, outcome, 0)
            else:
                k = min(max_count, int(math.floor(rb.tokens + 1e-9)))
                if rem is not None:
                    k = min(k, rem)
                rb.tokens -= k
                self._take_capacity(subnet, itype, k)
        if outcome == "throttled":
            log("RunInstances throttled (MinCount=%d, pool %s/%s)"
                % (min_count, subnet or "-", itype))
            return throttled_response(), False
        if outcome == "capacity":
            az = self.az_of(region, subnet, params.get("Placement.AvailabilityZone"))
            log("RunInstances InsufficientInstanceCapacity pool %s/%s (MinCount=%d)"
                % (subnet or "-", itype, min_count))
            return error_response(500, "InsufficientInstanceCapacity", insufficient_message(itype, az)), False
        new_pairs = [(kk, str(k) if kk in ("MinCount", "MaxCount") else v) for kk, v in pairs]
        body = None if k == min_count == max_count else encode_pairs(new_pairs)
        try:
            resp = forward(body)
        except Exception:
            with self.lock:
                self._refund(subnet, itype, k)
                self._record(action, "error", 0)
            raise
        lost = False
        with self.lock:
            if resp[0] != 200:
                self._refund(subnet, itype, k)
                self._record(action, "error", 0)
            else:
                self.stats["instances_launched"] += k
                partial = k < max_count
                if partial:
                    self.stats["partial_fulfilments"] += 1
                lost = self._take_lost_locked()
                self._record(action, "lost" if lost else "partial" if partial else "ok", k)
        lost = False if resp[0] != 200 else lost
        if resp[0] == 200:
            log("RunInstances launched %d (MinCount=%d MaxCount=%d) in %s/%s%s"
                % (k, min_count, max_count, subnet or "-", itype,
                   " PARTIAL" if k < max_count else ""))
        else:
            log("RunInstances upstream error %d" % resp[0])
        return resp, lost

    # -- CreateFleet (instant) --------------------------------------------------------------

    def _create_fleet_instant(self, region, params, pairs, forward):
        action = "CreateFleet"
        try:
            target = int(params.get("TargetCapacitySpecification.TotalTargetCapacity", "0"))
            min_target = int(params.get("OnDemandOptions.MinTargetCapacity", "0") or 0)
        except ValueError:
            target, min_target = 0, 0
        # pools in try order: (cfg index, override index or None, subnet, type, priority)
        pools = []
        cfgs = sorted({int(m.group(1)) for k in params
                       for m in [re.match(r"LaunchTemplateConfigs\.(\d+)\.", k)] if m})
        for c in cfgs:
            pre = "LaunchTemplateConfigs.%d." % c
            ovs = sorted({int(m.group(1)) for k in params
                          for m in [re.match(re.escape(pre) + r"Overrides\.(\d+)\.", k)] if m})
            lt_type = lt_subnet = None
            need_lt = not ovs or any(
                not params.get("%sOverrides.%d.InstanceType" % (pre, o)) for o in ovs)
            if need_lt:
                lt_type, lt_subnet = self.launch_template_data(
                    region, params, pre + "LaunchTemplateSpecification.")
            for o in (ovs or [None]):
                op = "%sOverrides.%d." % (pre, o) if o is not None else None
                get = (lambda f: params.get(op + f)) if op else (lambda f: None)
                try:
                    prio = float(get("Priority")) if get("Priority") is not None else math.inf
                except ValueError:
                    prio = math.inf
                pools.append((c, o, get("SubnetId") or lt_subnet or "",
                              get("InstanceType") or lt_type or "m1.small", prio))
        if params.get("OnDemandOptions.AllocationStrategy") == "prioritized" or any(
                p[4] != math.inf for p in pools):
            pools.sort(key=lambda p: p[4])  # stable: listed order breaks ties
        errors = []  # (pool, code, message)
        alloc = []  # (pool, n)
        exhausted = []  # pools that gave some instances, then ran out
        with self.lock:
            now = time.monotonic()
            self._count_call(action)
            throttled = not self._take_request_token(action, params, now)
            rb = self.resource_buckets["RunInstances"]
            rb.settle(now, self.time_scale)
            avail = int(math.floor(rb.tokens + 1e-9))
            if not throttled and target > 0 and avail < max(1, min_target):
                throttled = True
            if throttled:
                self._record(action, "throttled", 0)
            else:
                need = min(target, avail)
                for p in pools:
                    if need <= 0:
                        break
                    rem = self._remaining(p[2], p[3])
                    if self._is_insufficient(p[2], p[3]) or rem == 0:
                        errors.append((p, "InsufficientInstanceCapacity", None))
                        continue
                    n = need if rem is None else min(need, rem)
                    alloc.append((p, n))
                    need -= n
                    if rem is not None and need > 0:
                        exhausted.append((p, "InsufficientInstanceCapacity", None))
                launched = sum(n for _, n in alloc)
                if launched < min(target, avail):
                    errors.extend(exhausted)
                if min_target and launched < min_target:
                    alloc = []
                    launched = 0
                if target > avail and launched < target and pools:
                    errors.append((pools[0], "RequestLimitExceeded",
                                   "Request limit exceeded: %d instance token(s) available for "
                                   "a target of %d." % (avail, target)))
                rb.tokens -= launched
                for p, n in alloc:
                    self._take_capacity(p[2], p[3], n)
                if any(e[1] == "InsufficientInstanceCapacity" for e in errors) and launched == 0:
                    self.stats["capacity_errors"] += 1
        if throttled:
            log("CreateFleet throttled (target %d)" % target)
            return throttled_response(), False
        # one upstream CreateFleet per pool that gets instances (moto puts a fleet's whole
        # capacity into its first override), or one with capacity 0 for the fleet id.
        responses = []
        failed = []
        for p, n in (alloc or [(pools[0] if pools else None, 0)]):
            body = encode_pairs(fleet_subcall_pairs(pairs, p, n))
            try:
                resp = forward(body)
            except Exception as e:
                resp = (502, [], str(e).encode())
            if resp[0] == 200:
                responses.append((p, n, resp))
            else:
                failed.append((p, n, resp))
        with self.lock:
            for p, n, _ in failed:
                if p is not None:
                    self._refund(p[2], p[3], n)
            launched = sum(n for _, n, _ in responses)
            self.stats["instances_launched"] += launched
            lost = bool(responses) and self._take_lost_locked()
            if not responses:
                self._record(action, "error", 0)
            elif lost:
                self._record(action, "lost", launched)
            elif launched < target:
                if launched > 0:
                    self.stats["partial_fulfilments"] += 1
                self._record(action, "partial" if launched else "capacity", launched)
            else:
                self._record(action, "ok", launched)
        if not responses:
            log("CreateFleet upstream error %d" % failed[0][2][0])
            return failed[0][2], False
        for p, n, resp in failed:
            errors.append((p, "InternalError", "upstream error %d" % resp[0]))
        err_items = []
        for p, code, msg in errors:
            if msg is None:
                msg = insufficient_message(p[3], self.az_of(region, p[2]))
            err_items.append(fleet_error_item(params, p, code, msg))
        first = responses[0][2]
        texts = []
        for _, _, resp in responses:
            m = re.search(rb"<fleetInstanceSet>(.*?)</fleetInstanceSet>", resp[2], re.S)
            if m:
                texts.append(m.group(1))
        merged = (b"<fleetInstanceSet>" + b"".join(texts) + b"</fleetInstanceSet>"
                  + (b"<errorSet>" + "".join(err_items).encode() + b"</errorSet>" if err_items else b""))
        body, nsub = re.subn(rb"<fleetInstanceSet/>|<fleetInstanceSet>.*?</fleetInstanceSet>",
                             lambda _m: merged, first[2], count=1, flags=re.S)
        if nsub == 0:
            body = first[2]
        hdrs = [(k, v) for k, v in first[1] if k.lower() != "content-length"]
        log("CreateFleet launched %d of %d in %s%s" % (
            launched, target,
            ", ".join("%s/%s:%d" % (p[2], p[3], n) for p, n, _ in responses if p) or "-",
            " (%d error item(s))" % len(err_items) if err_items else ""))
        return (200, hdrs, body), lost


def lost_response(action):
    log("%s response lost on purpose (answered InternalError)" % action)
    return error_response(500, "InternalError",
                          "We encountered an internal error. Please try again.")


def insufficient_message(itype, az):
    return ("We currently do not have sufficient %s capacity in the Availability Zone you "
            "requested (%s). Our system will be working on provisioning additional capacity. "
            "You can currently get %s capacity by not specifying an Availability Zone in your "
            "request or choosing a different Availability Zone." % (itype, az, itype))


def fleet_subcall_pairs(pairs, pool, n):
    """Keep only one (config, override) of a CreateFleet request, renumbered to 1/1."""
    out = []
    c, o = (pool[0], pool[1]) if pool else (None, None)
    for k, v in pairs:
        if k == "ClientToken" or k.startswith("OnDemandOptions.MinTargetCapacity"):
            continue
        if k in ("TargetCapacitySpecification.OnDemandTargetCapacity",
                 "TargetCapacitySpecification.SpotTargetCapacity"):
            continue
        if k == "TargetCapacitySpecification.TotalTargetCapacity":
            out.append((k, str(n)))
            continue
        m = re.match(r"LaunchTemplateConfigs\.(\d+)\.(.*)$", k)
        if m:
            if c is None or int(m.group(1)) != c:
                continue
            rest = m.group(2)
            mo = re.match(r"Overrides\.(\d+)\.(.*)$", rest)
            if mo:
                if o is None or int(mo.group(1)) != o:
                    continue
                rest = "Overrides.1." + mo.group(2)
            out.append(("LaunchTemplateConfigs.1." + rest, v))
            continue
        out.append((k, v))
    return out


def fleet_error_item(params, pool, code, message):
    c, o, subnet, itype = pool[0], pool[1], pool[2], pool[3]
    pre = "LaunchTemplateConfigs.%d.LaunchTemplateSpecification." % c
    spec = ""
    for field, tag in (("LaunchTemplateId", "launchTemplateId"),
                       ("LaunchTemplateName", "launchTemplateName"), ("Version", "version")):
        if params.get(pre + field):
            spec += "<%s>%s</%s>" % (tag, xml_escape(params[pre + field]), tag)
    ov = ""
    if o is not None:
        ov = "<overrides><instanceType>%s</instanceType>%s</overrides>" % (
            xml_escape(itype), "<subnetId>%s</subnetId>" % xml_escape(subnet) if subnet else "")
    return ("<item><launchTemplateAndOverrides><launchTemplateSpecification>%s"
            "</launchTemplateSpecification>%s</launchTemplateAndOverrides>"
            "<lifecycle>on-demand</lifecycle><errorCode>%s</errorCode>"
            "<errorMessage>%s</errorMessage></item>" % (spec, ov, code, xml_escape(message)))


def encode_pairs(pairs):
    return "&".join("%s=%s" % (urllib.parse.quote(k, safe="-_.~"), urllib.parse.quote(v, safe="-_.~"))
                    for k, v in pairs).encode()


SCOPE_RE = re.compile(r"Credential=[^/,\s]+/\d{8}/([^/,\s]+)/([^/,\s]+)/aws4_request")


def service_and_region(headers, query):
    auth = headers.get("Authorization") or ""
    m = SCOPE_RE.search(auth)
    if not m:
        cred = (query.get("X-Amz-Credential") or [""])[0]
        m = re.search(r"/\d{8}/([^/]+)/([^/]+)/aws4_request", cred)
    if not m:
        return None, None
    return m.group(2), m.group(1)


# --------------------------------------------------------------------------------------------
# HTTP front


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


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
                    pairs = urllib.parse.parse_qsl(split.query, keep_blank_values=True)
                    ctype = (self.headers.get("Content-Type") or "").lower()
                    body_pairs = []
                    if body and ("x-www-form-urlencoded" in ctype or not ctype):
                        try:
                            body_pairs = urllib.parse.parse_qsl(
                                body.decode("utf-8"), keep_blank_values=True)
                        except UnicodeDecodeError:
                            body_pairs = []
                    params = dict(pairs)
                    params.update(dict(body_pairs))
                    action = params.get("Action")
                    if action and service == "ec2" and body_pairs and "Action" not in dict(pairs):
                        resp = emu.handle_ec2(region, action, params, body_pairs, forward)
                    elif action and service == "ec2":
                        # Action in the query string: no body rewriting possible; enforce
                        # buckets only.
                        resp = emu._plain(action, params, forward)[0]
                    elif action:
                        with emu.lock:
                            emu._count_call("autoscaling:" + action)
                if resp is None:
                    resp = forward(None)
            except OSError as e:
                log("upstream error: %s" % e)
                return self._send(502, [("Content-Type", "text/plain")],
                                  ("upstream error: %s\n" % e).encode())
            self._send(resp[0], resp[1], resp[2])

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle

    return Handler


def parse_hostport(s):
    host, _, port = s.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT, got %r" % s)
    return host, int(port)


def main():
    ap = argparse.ArgumentParser(
        description="EC2 throttling/fault emulator between an AWS SDK and moto_server. "
        "Forwards everything to --upstream; enforces EC2 token buckets, capacity errors, "
        "partial fulfilment and ClientToken idempotency for EC2 Query-API calls. Control API "
        "under /_emulator/ (health, config, reset, stats); see tests/support/README.md.")
    ap.add_argument("--listen", type=parse_hostport, default=("127.0.0.1", 0),
                    help="HOST:PORT to listen on (port 0 = any free port; default 127.0.0.1:0)")
    ap.add_argument("--upstream", required=True, help="moto_server URL, e.g. http://127.0.0.1:5000")
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="multiply every bucket refill rate by this (bursts unchanged; default 1)")
    args = ap.parse_args()
    if not args.time_scale > 0:
        ap.error("--time-scale must be > 0")
    upstream = Upstream(args.upstream)
    emu = Emulator(upstream, args.time_scale)
    srv = Server(args.listen, make_handler(emu, upstream))
    port = srv.server_address[1]
    print("listening on http://%s:%d" % (args.listen[0], port), flush=True)
    log("listening on http://%s:%d, upstream %s, time scale %g"
        % (args.listen[0], port, args.upstream, args.time_scale))
    try:
        srv.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    log("stopped")


if __name__ == "__main__":
    main()
