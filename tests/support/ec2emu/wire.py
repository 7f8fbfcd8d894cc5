"""The EC2 Query API on the wire: signing scopes, form parameters, error bodies, and the
pieces of CreateFleet bodies the emulator rewrites or writes."""

import re
import urllib.parse
import uuid
from xml.sax.saxutils import escape as xml_escape

SCOPE_RE = re.compile(r"Credential=[^/,\s]+/\d{8}/([^/,\s]+)/([^/,\s]+)/aws4_request")


def service_and_region(headers, query):
    """(service, region) from the SigV4 scope of the Authorization header or of a presigned
    query; (None, None) for an unsigned request."""
    auth = headers.get("Authorization") or ""
    m = SCOPE_RE.search(auth)
    if not m:
        cred = (query.get("X-Amz-Credential") or [""])[0]
        m = re.search(r"/\d{8}/([^/]+)/([^/]+)/aws4_request", cred)
    if not m:
        return None, None
    return m.group(2), m.group(1)


def encode_pairs(pairs):
    return "&".join("%s=%s" % (urllib.parse.quote(k, safe="-_.~"), urllib.parse.quote(v, safe="-_.~"))
                    for k, v in pairs).encode()


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


def lost_response():
    return error_response(500, "InternalError", "We encountered an internal error. Please try again.")


def insufficient_message(itype, az):
    return ("We currently do not have sufficient %s capacity in the Availability Zone you "
            "requested (%s). Our system will be working on provisioning additional capacity. "
            "You can currently get %s capacity by not specifying an Availability Zone in your "
            "request or choosing a different Availability Zone." % (itype, az, itype))


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


def fleet_subcall_pairs(pairs, pool, n):
    """Keep only one (config, override) of a CreateFleet request, renumbered to 1/1, for a
    total capacity of `n`."""
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
    """One <item> of a CreateFleet answer's errorSet, for `pool`."""
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


def merge_fleet_bodies(first, bodies, err_items):
    """One CreateFleet answer from several: `first`'s body with the instances of all
    `bodies` and `err_items` (strings) as its errorSet."""
    texts = []
    for b in bodies:
        m = re.search(rb"<fleetInstanceSet>(.*?)</fleetInstanceSet>", b, re.S)
        if m:
            texts.append(m.group(1))
    merged = (b"<fleetInstanceSet>" + b"".join(texts) + b"</fleetInstanceSet>"
              + (b"<errorSet>" + "".join(err_items).encode() + b"</errorSet>" if err_items else b""))
    body, nsub = re.subn(rb"<fleetInstanceSet/>|<fleetInstanceSet>.*?</fleetInstanceSet>",
                         lambda _m: merged, first, count=1, flags=re.S)
    return body if nsub else first
