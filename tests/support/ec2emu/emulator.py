"""The emulator's state, and what it does with each EC2 call.

RunInstances and CreateFleet are throttled, checked against capacity, rewritten to what
would be launched, made idempotent by ClientToken, and their answers may be lost on purpose;
every other EC2 call only draws on its buckets. One lock guards the buckets, the faults and
the stats; it is never held while moto is asked.
"""

import json
import re
import threading
import time

from . import fleet, wire
from .buckets import Limits
from .faults import Faults
from .journal import Journal
from .log import log
from .stats import Stats

CONFIG_KEYS = {"time_scale", "request_buckets", "resource_buckets", "capacity",
               "insufficient", "lose_responses"}
# Actions whose instance bucket takes one token per InstanceId.N.
INSTANCE_ACTIONS = ("TerminateInstances", "StartInstances", "StopInstances")


class Emulator:
    """`upstream` is an upstream.Upstream (or a stand-in with reset, az_of and
    launch_template_data); `clock` the monotonic clock the buckets run on, `wall` the clock
    of the stats log."""

    def __init__(self, upstream, time_scale, clock=time.monotonic, wall=time.time):
        self.upstream = upstream
        self.cli_time_scale = time_scale
        self.clock = clock
        self.wall = wall
        self.lock = threading.Lock()
        self.journal = Journal()
        self._reset_locked()

    # -- state ---------------------------------------------------------------------------

    def _reset_locked(self):
        self.limits = Limits(self.cli_time_scale, self.clock())
        self.faults = Faults()
        self.stats = Stats()

    def reset(self):
        with self.lock:
            self._reset_locked()
        self.journal.clear()
        log("reset (moto reset: %s)" % self.upstream.reset())

    def config_json(self):
        with self.lock:
            self.limits.settle_all(self.clock())
            return self._config_json_locked()

    def _config_json_locked(self):
        out = self.limits.as_json()
        out.update(self.faults.as_json())
        return out

    def configure(self, cfg):
        if not isinstance(cfg, dict):
            raise ValueError("config must be a JSON object")
        unknown = set(cfg) - CONFIG_KEYS
        if unknown:
            raise ValueError("unknown config keys: %s" % sorted(unknown))
        with self.lock:
            self.limits.configure(cfg, self.clock())
            self.faults.configure(cfg)
            out = self._config_json_locked()
        log("config %s" % json.dumps(cfg, sort_keys=True))
        return out

    def stats_json(self):
        with self.lock:
            return self.stats.as_json()

    def count_call(self, action):
        with self.lock:
            self.stats.call(action)

    # -- helpers (call with the lock held) -----------------------------------------------

    def _record(self, action, outcome, launched=0):
        self.stats.record(self.wall(), action, outcome, launched)

    def _refund(self, subnet, itype, k):
        self.limits.resource["RunInstances"].give_back(k)
        self.faults.give_back(subnet, itype, k)

    def _take_lost(self):
        if self.faults.take_lost():
            self.stats.bump("lost_responses")
            return True
        return False

    # -- the EC2 entry point ----------------------------------------------------------------

    def handle_ec2(self, region, action, params, pairs, forward):
        """forward(new_body_or_None) -> (status, headers, body). Returns a response tuple."""
        if action not in ("RunInstances", "CreateFleet"):
            return self.plain(action, params, forward)[0]
        token = params.get("ClientToken")
        if not token:
            resp, lost = self._launch(region, action, params, pairs, forward)
            return self._lost(action) if lost else resp
        key = (region, action, token)
        sig = sorted((k, v) for k, v in pairs if k != "ClientToken")
        state, resp = self.journal.begin(key, sig)
        if state == "replay":
            with self.lock:
                self.stats.call(action)
                self.stats.bump("idempotent_replays")
                self._record(action, "replay", 0)
            log("%s replay of ClientToken=%s (nothing launched)" % (action, token))
            return resp
        if state == "mismatch":
            with self.lock:
                self.stats.call(action)
                self._record(action, "error", 0)
            return wire.error_response(
                400, "IdempotentParameterMismatch",
                "The client token %s was already used with different parameters." % token)
        resp = None
        try:
            resp, lost = self._launch(region, action, params, pairs, forward)
            return self._lost(action) if lost else resp
        finally:
            self.journal.end(key, sig, resp if resp is not None and resp[0] == 200 else None)

    def _lost(self, action):
        log("%s response lost on purpose (answered InternalError)" % action)
        return wire.lost_response()

    def _launch(self, region, action, params, pairs, forward):
        if action == "RunInstances":
            return self._run_instances(region, params, pairs, forward)
        if params.get("Type", "maintain") == "instant":
            return self._create_fleet_instant(region, params, pairs, forward)
        return self.plain(action, params, forward)

    def plain(self, action, params, forward):
        """A call that only draws on its buckets. -> (response, lost=False)."""
        res_name = action if action in INSTANCE_ACTIONS else None
        n = sum(1 for k in params if re.fullmatch(r"InstanceId\.\d+", k)) if res_name else 0
        with self.lock:
            now = self.clock()
            self.stats.call(action)
            # The request token is spent even when the instance bucket is short.
            ok = self.limits.take_request(action, params, now)
            if ok and res_name:
                ok = self.limits.take_instances(res_name, n, now)
            if not ok:
                self._record(action, "throttled", 0)
        if not ok:
            log("%s throttled" % action)
            return wire.throttled_response(), False
        resp = forward(None)
        with self.lock:
            self._record(action, "ok" if resp[0] < 400 else "error", 0)
            if resp[0] >= 400 and res_name:
                self.limits.resource[res_name].give_back(n)
        if res_name:
            log("%s %d instance(s) -> %d" % (action, n, resp[0]))
        return resp, False

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
                self.stats.call(action)
                self._record(action, "error", 0)
            return wire.error_response(
                400, "InvalidParameterValue",
                "MinCount and MaxCount must be integers with 1 <= MinCount <= MaxCount"), False
        subnet = params.get("SubnetId") or params.get("NetworkInterface.1.SubnetId") or ""
        itype = params.get("InstanceType") or ""
        if not itype or not subnet:
            lt_type, lt_subnet = None, None
            if any(k.startswith("LaunchTemplate.") for k in params):
                lt_type, lt_subnet = self.upstream.launch_template_data(
                    region, params, "LaunchTemplate.")
            itype = itype or lt_type or "m1.small"
            subnet = subnet or lt_subnet or ""
        with self.lock:
            outcome, k = self._decide_run(action, params, subnet, itype, min_count, max_count)
        if outcome == "throttled":
            log("RunInstances throttled (MinCount=%d, pool %s/%s)"
                % (min_count, subnet or "-", itype))
            return wire.throttled_response(), False
        if outcome == "capacity":
            az = self.upstream.az_of(region, subnet, params.get("Placement.AvailabilityZone"))
            log("RunInstances InsufficientInstanceCapacity pool %s/%s (MinCount=%d)"
                % (subnet or "-", itype, min_count))
            return wire.error_response(
                500, "InsufficientInstanceCapacity", wire.insufficient_message(itype, az)), False
        new_pairs = [(kk, str(k) if kk in ("MinCount", "MaxCount") else v) for kk, v in pairs]
        body = None if k == min_count == max_count else wire.encode_pairs(new_pairs)
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
                self.stats.bump("instances_launched", k)
                partial = k < max_count
                if partial:
                    self.stats.bump("partial_fulfilments")
                lost = self._take_lost()
                self._record(action, "lost" if lost else "partial" if partial else "ok", k)
        if resp[0] == 200:
            log("RunInstances launched %d (MinCount=%d MaxCount=%d) in %s/%s%s"
                % (k, min_count, max_count, subnet or "-", itype,
                   " PARTIAL" if k < max_count else ""))
        else:
            log("RunInstances upstream error %d" % resp[0])
        return resp, lost

    def _decide_run(self, action, params, subnet, itype, min_count, max_count):
        """(lock held) -> ("throttled" | "capacity", 0) or (None, k): k instances to launch,
        their tokens and capacity taken. Throttled when the request bucket is empty or the
        instance bucket holds fewer than MinCount; capacity when the pool fails or holds
        fewer than MinCount; else k = min(MaxCount, whole instance tokens, capacity)."""
        now = self.clock()
        self.stats.call(action)
        rb = self.limits.instances("RunInstances", now)
        if not self.limits.take_request(action, params, now) or rb.tokens < min_count:
            self._record(action, "throttled", 0)
            return "throttled", 0
        rem = self.faults.remaining(subnet, itype)
        if self.faults.is_insufficient(subnet, itype) or (rem is not None and rem < min_count):
            self.stats.bump("capacity_errors")
            self._record(action, "capacity", 0)
            return "capacity", 0
        k = min(max_count, rb.whole(now, self.limits.time_scale))
        if rem is not None:
            k = min(k, rem)
        rb.tokens -= k
        self.faults.take(subnet, itype, k)
        return None, k

    # -- CreateFleet (instant) --------------------------------------------------------------

    def _create_fleet_instant(self, region, params, pairs, forward):
        action = "CreateFleet"
        try:
            target = int(params.get("TargetCapacitySpecification.TotalTargetCapacity", "0"))
            min_target = int(params.get("OnDemandOptions.MinTargetCapacity", "0") or 0)
        except ValueError:
            target, min_target = 0, 0
        pools = fleet.fleet_pools(
            params, lambda prefix: self.upstream.launch_template_data(region, params, prefix))
        with self.lock:
            throttled, alloc, errors = self._decide_fleet(action, params, pools, target, min_target)
        if throttled:
            log("CreateFleet throttled (target %d)" % target)
            return wire.throttled_response(), False
        # one upstream CreateFleet per pool that gets instances (moto puts a fleet's whole
        # capacity into its first override), or one with capacity 0 for the fleet id.
        responses = []
        failed = []
        for p, n in (alloc or [(pools[0] if pools else None, 0)]):
            body = wire.encode_pairs(wire.fleet_subcall_pairs(pairs, p, n))
            try:
                resp = forward(body)
            except Exception as e:
                resp = (502, [], str(e).encode())
            (responses if resp[0] == 200 else failed).append((p, n, resp))
        with self.lock:
            for p, n, _ in failed:
                if p is not None:
                    self._refund(p[2], p[3], n)
            launched = sum(n for _, n, _ in responses)
            self.stats.bump("instances_launched", launched)
            lost = bool(responses) and self._take_lost()
            if not responses:
                self._record(action, "error", 0)
            elif lost:
                self._record(action, "lost", launched)
            elif launched < target:
                if launched > 0:
                    self.stats.bump("partial_fulfilments")
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
                msg = wire.insufficient_message(p[3], self.upstream.az_of(region, p[2]))
            err_items.append(wire.fleet_error_item(params, p, code, msg))
        first = responses[0][2]
        body = wire.merge_fleet_bodies(first[2], [r[2] for _, _, r in responses], err_items)
        hdrs = [(k, v) for k, v in first[1] if k.lower() != "content-length"]
        log("CreateFleet launched %d of %d in %s%s" % (
            launched, target,
            ", ".join("%s/%s:%d" % (p[2], p[3], n) for p, n, _ in responses if p) or "-",
            " (%d error item(s))" % len(err_items) if err_items else ""))
        return (200, hdrs, body), lost

    def _decide_fleet(self, action, params, pools, target, min_target):
        """(lock held) -> (throttled, alloc, errors); the allocated tokens and capacity are
        taken. Throttled when the request bucket is empty or the instance bucket holds fewer
        than max(1, MinTargetCapacity) whole tokens; a shortage of instance tokens below the
        target is a RequestLimitExceeded error item."""
        now = self.clock()
        self.stats.call(action)
        throttled = not self.limits.take_request(action, params, now)
        rb = self.limits.instances("RunInstances", now)
        avail = rb.whole(now, self.limits.time_scale)
        if not throttled and target > 0 and avail < max(1, min_target):
            throttled = True
        if throttled:
            self._record(action, "throttled", 0)
            return True, [], []
        alloc, errors = fleet.allocate(pools, min(target, avail), self.faults)
        launched = sum(n for _, n in alloc)
        if min_target and launched < min_target:
            alloc = []
            launched = 0
        if target > avail and launched < target and pools:
            errors.append((pools[0], "RequestLimitExceeded",
                           "Request limit exceeded: %d instance token(s) available for "
                           "a target of %d." % (avail, target)))
        rb.tokens -= launched
        for p, n in alloc:
            self.faults.take(p[2], p[3], n)
        if any(e[1] == fleet.ICE for e in errors) and launched == 0:
            self.stats.bump("capacity_errors")
        return False, alloc, errors
