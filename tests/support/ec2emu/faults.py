"""Injected faults: capacity per pool, pools that always fail, lost responses.

A pool is (subnet, instance type). `capacity` maps fnmatch patterns to starting capacities;
the most specific match sets a concrete pool's start, and each pool then counts down on its
own. Nothing here locks: the emulator holds its lock around every use.
"""

import fnmatch


def most_specific(capacity, subnet, itype):
    """The starting capacity `capacity` ({subnet pattern: {type pattern: n}}) gives a pool:
    literal beats pattern, then the longer pattern wins, subnet before type. None if no
    pattern matches (unlimited)."""
    best = None
    for sp, types in capacity.items():
        if not fnmatch.fnmatchcase(subnet, sp):
            continue
        for tp, n in types.items():
            if not fnmatch.fnmatchcase(itype, tp):
                continue
            score = ("*" not in sp and "?" not in sp, len(sp),
                     "*" not in tp and "?" not in tp, len(tp))
            if best is None or score > best[0]:
                best = (score, n)
    return None if best is None else best[1]


class Faults:
    def __init__(self):
        self.capacity = None  # config as given; None = unlimited
        self.remaining_by_pool = {}  # (subnet, type) -> remaining (concrete pools)
        self.insufficient = []  # [[subnet pattern, type pattern]]
        self.lose_responses = 0

    def configure(self, cfg):
        """Apply `capacity`, `insufficient` and `lose_responses` of a config object. Raises
        ValueError on a bad value."""
        if "capacity" in cfg:
            cap = cfg["capacity"]
            if cap is not None:
                if not isinstance(cap, dict) or not all(isinstance(v, dict) for v in cap.values()):
                    raise ValueError("capacity must be {subnet: {type: n}}")
                cap = {s: {t: int(n) for t, n in v.items()} for s, v in cap.items()}
            self.capacity = cap
            self.remaining_by_pool = {}
        if "insufficient" in cfg:
            ins = cfg["insufficient"] or []
            if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in ins):
                raise ValueError("insufficient must be a list of [subnet, type]")
            self.insufficient = [[str(a), str(b)] for a, b in ins]
        if "lose_responses" in cfg:
            self.lose_responses = int(cfg["lose_responses"])

    def is_insufficient(self, subnet, itype):
        return any(fnmatch.fnmatchcase(subnet, s) and fnmatch.fnmatchcase(itype, t)
                   for s, t in self.insufficient)

    def remaining(self, subnet, itype):
        """Remaining capacity of a concrete pool, None = unlimited."""
        if self.capacity is None:
            return None
        key = (subnet, itype)
        if key not in self.remaining_by_pool:
            n = most_specific(self.capacity, subnet, itype)
            if n is None:
                return None
            self.remaining_by_pool[key] = n
        return self.remaining_by_pool[key]

    def take(self, subnet, itype, k):
        rem = self.remaining(subnet, itype)
        if rem is not None:
            self.remaining_by_pool[(subnet, itype)] = rem - k

    def give_back(self, subnet, itype, k):
        if (subnet, itype) in self.remaining_by_pool:
            self.remaining_by_pool[(subnet, itype)] += k

    def take_lost(self):
        """True if this successful launch's response is to be lost."""
        if self.lose_responses > 0:
            self.lose_responses -= 1
            return True
        return False

    def as_json(self):
        rem = {}
        for (s, t), n in sorted(self.remaining_by_pool.items()):
            rem.setdefault(s, {})[t] = n
        return {
            "capacity": self.capacity,
            "capacity_remaining": rem,
            "insufficient": self.insufficient,
            "lose_responses": self.lose_responses,
        }
