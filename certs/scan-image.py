#!/usr/bin/env python3
"""Looks for secrets in a node image's root filesystem (certs/README.md, docs/ami.md).

    scan-image.py ROOT [--fleet-dir DIR] [--allow GLOB]...

A fleet node image must hold nothing secret: the agent token comes in EC2 user-data, and the
CA key, server key and signing key never leave the controller host. This walks ROOT (a
debootstrap root, or a mounted AMI snapshot) without following links and reports:

- PEM private keys of any kind (`-----BEGIN ... PRIVATE KEY-----` followed by key data), which
  includes OpenSSH host keys a build machine left behind;
- small files holding an Ed25519 PKCS#8 key (what `fleet init` writes as secrets/signing.pk8);
- `token = "<43 characters>"` lines: an agent token baked into a config file;
- with --fleet-dir: the exact secrets of that fleet (agent and operator token, UI password
  hash, CA and server key material, signing key, raw and in base64) anywhere in any file.

Skipped: /proc, /sys, /dev, /run (empty in an image), and distribution documentation and
public CA certificates. A finding is accepted, and listed as allowed, when the file is
published as it is: a file of a Debian package whose md5sum dpkg recorded, or a file of a
Python package whose sha256 its RECORD lists (gevent ships test keys, gnutls a self-test
key). Such a file is on every mirror, so it cannot hold a secret of ours. --allow GLOB (a path
inside ROOT) accepts more. Prints one line per finding and `scan-image: N files, M findings`;
exits 1 if there is any finding.
"""

import argparse
import base64
import fnmatch
import glob
import hashlib
import os
import re
import sys

SKIP_DIRS = {"/proc", "/sys", "/dev", "/run", "/usr/share/doc", "/usr/share/man",
             "/usr/share/locale", "/usr/share/ca-certificates", "/etc/ssl/certs",
             "/usr/share/zoneinfo"}
PEM_KEY = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----\r?\n(?:[A-Za-z0-9-]+:[^\n]*\r?\n)*\r?\n?"
    rb"[A-Za-z0-9+/=]{16,}")
# The Ed25519 OID and the nested OCTET STRING of a PKCS#8 private key (v1 and v2 documents).
ED25519_PKCS8 = b"\x30\x05\x06\x03\x2b\x65\x70\x04\x22\x04\x20"
TOKEN_LINE = re.compile(rb'(?m)^\s*"?token"?\s*=\s*"[A-Za-z0-9_-]{43}"')
MAX_KEY_FILE = 512


def fleet_needles(d):
    """(what, bytes) pairs for the secrets `fleet init` made in fleet directory d."""
    out = []

    def read(rel):
        try:
            with open(os.path.join(d, rel), "rb") as f:
                return f.read()
        except OSError:
            return None

    for rel in ("secrets/agent.token", "secrets/operator.token", "secrets/ui.hash"):
        v = read(rel)
        if v and v.strip():
            out.append((rel, v.strip()))
    for rel in ("certs/ca.key", "certs/server.key"):
        v = read(rel)
        if v:
            body = b"".join(l.strip() for l in v.splitlines() if l and not l.startswith(b"-----"))
            # The first 48 base64 characters of the key, which sit on one line in any PEM copy.
            if len(body) >= 48:
                out.append((rel, body[:48]))
    v = read("secrets/signing.pk8")
    if v:
        out.append(("secrets/signing.pk8", v))
        out.append(("secrets/signing.pk8 (base64)", base64.b64encode(v)[:48]))
    if not out:
        sys.exit("scan-image: %s holds no fleet secrets (is it a fleet directory?)" % d)
    return out


def published_files(root):
    """path inside root -> (algorithm, digest, origin) for files as their packages ship them."""
    known = {}
    for f in glob.glob(os.path.join(root, "var/lib/dpkg/info/*.md5sums")):
        pkg = os.path.basename(f)[: -len(".md5sums")]
        with open(f, "rb") as fh:
            for line in fh:
                digest, _, path = line.rstrip(b"\n").partition(b"  ")
                known["/" + path.decode("utf-8", "replace")] = ("md5", digest.decode(), "Debian package " + pkg)
    for rec in glob.glob(os.path.join(root, "**/site-packages/*.dist-info/RECORD"), recursive=True):
        site = os.path.dirname(os.path.dirname(rec))
        dist = os.path.basename(os.path.dirname(rec))[: -len(".dist-info")]
        with open(rec, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.rstrip("\n").rsplit(",", 2)
                if len(parts) != 3 or not parts[1].startswith("sha256="):
                    continue
                path = os.path.normpath(os.path.join(site, parts[0]))
                known["/" + os.path.relpath(path, root)] = ("sha256", parts[1][7:], "Python package " + dist)
    return known


def published(data, entry):
    algo, digest, _ = entry
    if algo == "md5":
        return hashlib.md5(data).hexdigest() == digest
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode() == digest


def scan(root, needles, allow):
    findings, allowed, files = [], [], 0
    root = os.path.abspath(root)
    known = published_files(root)
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = "/" + os.path.relpath(dirpath, root).lstrip(".")
        rel_dir = "/" if rel_dir == "/" else rel_dir.rstrip("/")
        dirnames[:] = sorted(n for n in dirnames
                             if (rel_dir.rstrip("/") + "/" + n) not in SKIP_DIRS)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = rel_dir.rstrip("/") + "/" + name
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            files += 1
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                findings.append((rel, "unreadable: %s" % e))
                continue
            hits = []
            m = PEM_KEY.search(data)
            if m:
                kind = m.group(1).decode().strip() or "PKCS#8"
                hits.append("PEM private key (%s)" % kind)
            if st.st_size <= MAX_KEY_FILE and ED25519_PKCS8 in data:
                hits.append("Ed25519 PKCS#8 private key")
            if TOKEN_LINE.search(data):
                hits.append("a token = \"...\" line (agent token)")
            for what, needle in needles:
                if needle in data:
                    hits.append("the fleet's %s" % what)
            for h in hits:
                entry = known.get(rel)
                if entry and published(data, entry):
                    allowed.append((rel, "%s, as published in %s" % (h, entry[2])))
                elif any(fnmatch.fnmatch(rel, g) for g in allow):
                    allowed.append((rel, "%s (--allow)" % h))
                else:
                    findings.append((rel, h))
    return files, findings, allowed


def main():
    ap = argparse.ArgumentParser(description="look for secrets in a node image root")
    ap.add_argument("root")
    ap.add_argument("--fleet-dir")
    ap.add_argument("--allow", action="append", default=[])
    a = ap.parse_args()
    if not os.path.isdir(a.root):
        sys.exit("scan-image: %s is not a directory" % a.root)
    needles = fleet_needles(a.fleet_dir) if a.fleet_dir else []
    files, findings, allowed = scan(a.root, needles, a.allow)
    for rel, what in allowed:
        print("allowed: %s: %s" % (rel, what))
    for rel, what in findings:
        print("SECRET: %s: %s" % (rel, what))
    print("scan-image: %d files, %d findings%s" % (
        files, len(findings),
        " (%d fleet secrets looked for)" % len(needles) if needles else ""))
    sys.exit(1 if findings else 0)


if __name__ == "__main__":
    main()
