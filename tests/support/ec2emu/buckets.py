"""EC2's token buckets (the documented defaults are in docs/ec2.md, "Pacing").

A bucket holds at most `burst` tokens and refills at `refill` tokens per second times the time
scale: `tokens = min(burst, tokens + elapsed * refill * time_scale)`. Every API call takes one
token from its request bucket; launching, starting, stopping and terminating also take one
token per instance from the action's instance (resource) bucket. Nothing here locks: the
emulator holds its lock around every use.
"""

import math

# name -> (burst, refill per second)
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
# Request buckets shared by a family of actions, never an action's own.
SHARED_REQUEST_BUCKETS = ("NonMutating", "DescribeInstancesUnfiltered", "DefaultMutating")
# Whole tokens are counted with this slack, so 2.9999999 refilled tokens are 3.
EPSILON = 1e-9


class Bucket:
    __slots__ = ("burst", "refill", "tokens", "last")

    def __init__(self, burst, refill, now):
        self.burst = float(burst)
        self.refill = float(refill)
        self.tokens = float(burst)
        self.last = now

    def settle(self, now, scale):
        """Add what refilled since the last settle, up to the burst."""
        elapsed = now - self.last
        if elapsed > 0:  # never move `last` backwards
            self.tokens = min(self.burst, self.tokens + elapsed * self.refill * scale)
            self.last = now

    def take(self, n, now, scale):
        """Take `n` tokens if the bucket holds them (after settling); True if taken."""
        self.settle(now, scale)
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    def whole(self, now, scale):
        """Whole tokens in the bucket, after settling."""
        self.settle(now, scale)
        return int(math.floor(self.tokens + EPSILON))

    def give_back(self, n):
        self.tokens = min(self.burst, self.tokens + n)

    def update(self, spec):
        """Apply a config object: any of burst, refill, tokens (tokens sets the fill)."""
        if "burst" in spec:
            self.burst = float(spec["burst"])
        if "refill" in spec:
            self.refill = float(spec["refill"])
        if "tokens" in spec:
            self.tokens = float(spec["tokens"])
        self.tokens = min(self.tokens, self.burst)

    def as_json(self):
        return {"burst": self.burst, "refill": self.refill, "tokens": self.tokens}


def make_buckets(defaults, now):
    return {name: Bucket(b, r, now) for name, (b, r) in defaults.items()}


def request_bucket_name(action, params, buckets):
    """The request bucket an EC2 call draws on: the action's own if it has one, else
    DescribeInstancesUnfiltered for a DescribeInstances without Filter.*, MaxResults and
    NextToken, NonMutating for other Describe*/Get*/List*, DefaultMutating for the rest."""
    if action in buckets and action not in SHARED_REQUEST_BUCKETS:
        return action
    if action == "DescribeInstances":
        if not any(k.startswith("Filter.") or k in ("MaxResults", "NextToken") for k in params):
            return "DescribeInstancesUnfiltered"
        return "NonMutating"
    if action.startswith(("Describe", "Get", "List")):
        return "NonMutating"
    return "DefaultMutating"


class Limits:
    """The request buckets, the instance buckets and the time scale their refill runs at."""

    def __init__(self, time_scale, now):
        self.time_scale = time_scale
        self.request = make_buckets(DEFAULT_REQUEST_BUCKETS, now)
        self.resource = make_buckets(DEFAULT_RESOURCE_BUCKETS, now)

    def settle_all(self, now):
        for b in list(self.request.values()) + list(self.resource.values()):
            b.settle(now, self.time_scale)

    def take_request(self, action, params, now):
        """One token from the call's request bucket; True if taken."""
        b = self.request[request_bucket_name(action, params, self.request)]
        return b.take(1, now, self.time_scale)

    def take_instances(self, name, n, now):
        """`n` tokens from instance bucket `name`; True if taken."""
        return self.resource[name].take(n, now, self.time_scale)

    def instances(self, name, now):
        """Instance bucket `name`, settled."""
        b = self.resource[name]
        b.settle(now, self.time_scale)
        return b

    def configure(self, cfg, now):
        """Apply `time_scale`, `request_buckets` and `resource_buckets` of a config object.
        Raises ValueError on a bad value. What refilled so far counts at the old scale."""
        self.settle_all(now)
        if "time_scale" in cfg:
            ts = float(cfg["time_scale"])
            if not ts > 0:
                raise ValueError("time_scale must be > 0")
            self.time_scale = ts
        for key, buckets in (("request_buckets", self.request),
                             ("resource_buckets", self.resource)):
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
                b.update(spec)

    def as_json(self):
        return {
            "time_scale": self.time_scale,
            "request_buckets": {k: b.as_json() for k, b in self.request.items()},
            "resource_buckets": {k: b.as_json() for k, b in self.resource.items()},
        }
