#!/usr/bin/env python3
"""Writes the AMI id from Packer's manifest into a fleet.toml (`[ec2] ami = "..."`).

    set-ami.py MANIFEST FLEET_TOML [--region REGION]

MANIFEST is what the manifest post-processor of packer/fleet-agent.pkr.hcl wrote. Its last
run's amazon-ebs artifact id reads `us-east-1:ami-0abc,eu-west-1:ami-0def` (one entry per
region with ami_regions); the entry for REGION is taken, else the first (the build region).
Only the `ami` line of the `[ec2]` table is changed (or added, or the table appended), so
the rest of the file, comments included, stays as it was. Prints one line; exits 1 with one
line on failure. Used by packer/build.sh and tested by tests/ami/run.sh.
"""

import argparse
import json
import os
import re
import sys


def fail(msg):
    sys.stderr.write("set-ami: %s\n" % msg)
    sys.exit(1)


def ami_from_manifest(path, region):
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        fail("cannot read manifest %s: %s" % (path, e))
    builds = [b for b in m.get("builds", []) if b.get("builder_type") == "amazon-ebs"]
    last = m.get("last_run_uuid")
    runs = [b for b in builds if b.get("packer_run_uuid") == last] or builds
    if not runs:
        fail("no amazon-ebs build in %s" % path)
    pairs = []
    for part in runs[-1].get("artifact_id", "").split(","):
        reg, _, ami = part.strip().partition(":")
        if re.fullmatch(r"ami-[0-9a-f]{8,17}", ami):
            pairs.append((reg, ami))
    if not pairs:
        fail("no AMI id in the artifact of %s" % path)
    if region:
        for reg, ami in pairs:
            if reg == region:
                return reg, ami
        fail("the build made no AMI in %s (it made %s)" % (region, ", ".join(r for r, _ in pairs)))
    return pairs[0]


HEADER = re.compile(r"^\s*\[\s*ec2\s*\]\s*(#.*)?$")
ANY_HEADER = re.compile(r"^\s*\[")
AMI_LINE = re.compile(r"^(\s*)ami\s*=.*$")


def set_ami(text, ami):
    lines = text.splitlines(keepends=True)
    new = 'ami = "%s"\n' % ami
    for i, line in enumerate(lines):
        if HEADER.match(line):
            j = i + 1
            while j < len(lines) and not ANY_HEADER.match(lines[j]):
                m = AMI_LINE.match(lines[j])
                if m:
                    lines[j] = m.group(1) + new
                    return "".join(lines)
                j += 1
            lines.insert(i + 1, new)
            return "".join(lines)
    if text and not text.endswith("\n"):
        text += "\n"
    return text + "\n[ec2]\n" + new


def main():
    ap = argparse.ArgumentParser(description="write the AMI id from a Packer manifest into fleet.toml")
    ap.add_argument("manifest")
    ap.add_argument("fleet_toml")
    ap.add_argument("--region", default="")
    a = ap.parse_args()
    region, ami = ami_from_manifest(a.manifest, a.region)
    try:
        with open(a.fleet_toml) as f:
            text = f.read()
    except OSError as e:
        fail("cannot read %s: %s" % (a.fleet_toml, e))
    out = set_ami(text, ami)
    try:
        import tomllib  # Python 3.11+: check the edit before writing it.
    except ImportError:
        tomllib = None
    if tomllib is not None:
        try:
            got = tomllib.loads(out).get("ec2", {}).get("ami")
        except tomllib.TOMLDecodeError as e:
            fail("%s would not parse after the edit (%s); set ec2.ami = %r by hand"
                 % (a.fleet_toml, e, ami))
        if got != ami:
            fail("%s: could not set ec2.ami; set it to %r by hand" % (a.fleet_toml, ami))
        conf_region = tomllib.loads(out).get("ec2", {}).get("region")
        if conf_region and conf_region != region:
            sys.stderr.write("set-ami: warning: the AMI is in %s but ec2.region is %s\n"
                             % (region, conf_region))
    tmp = a.fleet_toml + ".set-ami.tmp"
    with open(tmp, "w") as f:
        f.write(out)
    os.chmod(tmp, os.stat(a.fleet_toml).st_mode & 0o7777)
    os.replace(tmp, a.fleet_toml)
    print("%s: ec2.ami = %s (%s)" % (a.fleet_toml, ami, region))


if __name__ == "__main__":
    main()
