"""CreateFleet (instant): the pools a request names, and how its instances are spread over
them. Pure functions; the emulator supplies launch-template lookups and capacity."""

import math
import re

ICE = "InsufficientInstanceCapacity"


def fleet_pools(params, lt_data):
    """The pools of a CreateFleet request in the order they are tried: priority order when
    the request is prioritized or names priorities (listed order breaks ties), else listed
    order. A pool is (config index, override index or None, subnet, type, priority).
    `lt_data(prefix)` -> (type, subnet) of the launch template named by params[prefix.*],
    asked only when an override lacks a type."""
    pools = []
    cfgs = sorted({int(m.group(1)) for k in params
                   for m in [re.match(r"LaunchTemplateConfigs\.(\d+)\.", k)] if m})
    for c in cfgs:
        pre = "LaunchTemplateConfigs.%d." % c
        ovs = sorted({int(m.group(1)) for k in params
                      for m in [re.match(re.escape(pre) + r"Overrides\.(\d+)\.", k)] if m})
        lt_type = lt_subnet = None
        if not ovs or any(not params.get("%sOverrides.%d.InstanceType" % (pre, o)) for o in ovs):
            lt_type, lt_subnet = lt_data(pre + "LaunchTemplateSpecification.")
        for o in (ovs or [None]):
            op = "%sOverrides.%d." % (pre, o) if o is not None else None

            def get(field, op=op):
                return params.get(op + field) if op else None
            try:
                prio = float(get("Priority")) if get("Priority") is not None else math.inf
            except ValueError:
                prio = math.inf
            pools.append((c, o, get("SubnetId") or lt_subnet or "",
                          get("InstanceType") or lt_type or "m1.small", prio))
    if params.get("OnDemandOptions.AllocationStrategy") == "prioritized" or any(
            p[4] != math.inf for p in pools):
        pools.sort(key=lambda p: p[4])  # stable: listed order breaks ties
    return pools


def allocate(pools, need, faults):
    """Spread `need` instances over `pools` in order, each taking what its capacity allows.
    -> (alloc [(pool, n)], errors [(pool, code, message or None)]). A pool that is failing or
    empty is an error; a pool that gave some and ran out is one only if `need` is not met."""
    alloc = []
    errors = []
    exhausted = []
    want = need
    for p in pools:
        if need <= 0:
            break
        rem = faults.remaining(p[2], p[3])
        if faults.is_insufficient(p[2], p[3]) or rem == 0:
            errors.append((p, ICE, None))
            continue
        n = need if rem is None else min(need, rem)
        alloc.append((p, n))
        need -= n
        if rem is not None and need > 0:
            exhausted.append((p, ICE, None))
    if sum(n for _, n in alloc) < want:
        errors.extend(exhausted)
    return alloc, errors
