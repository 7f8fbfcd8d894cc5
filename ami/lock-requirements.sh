#!/usr/bin/env bash
# Writes ami/locust-requirements.txt: the Locust pinned in requirements.txt and every package it
# needs, each at one version with the sha256 of every file PyPI has for that version (all
# wheels and the sdist), so `pip install --require-hashes` installs the same bytes on amd64 and
# arm64 (docs/ami.md, "Locust, hash-pinned"). ami/provision.sh refuses to install without it.
#
# usage: ami/lock-requirements.sh            (after changing locust== in requirements.txt)
#
# Uses pip-tools (pip-compile) from PyPI in a throwaway virtualenv. The dependency set is
# resolved for this machine's python3: the images' Python (Debian 12: 3.11) is what matters,
# since environment markers can add or drop a package per Python version.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$ROOT/ami/locust-requirements.txt
LOCUST_VERSION=$(sed -n 's/^locust==\([^[:space:]]*\).*/\1/p' "$ROOT/requirements.txt")
[ -n "$LOCUST_VERSION" ] || { echo "lock: no locust== in requirements.txt" >&2; exit 1; }

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 -m venv "$TMP/venv"
"$TMP/venv/bin/pip" install --quiet --disable-pip-version-check pip-tools
echo "locust==$LOCUST_VERSION" >"$TMP/locust.in"
# No index or find-links lines: the file must not carry this machine's pip configuration.
"$TMP/venv/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --strip-extras \
    --no-header --no-emit-index-url --no-emit-find-links --no-annotate \
    --output-file "$TMP/locust.txt" "$TMP/locust.in"
{
    echo "# Locust $LOCUST_VERSION for the node image, every file hash-pinned: written by"
    echo "# ami/lock-requirements.sh (python $(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')), installed by ami/provision.sh with"
    echo "# pip install --require-hashes. Do not edit; regenerate after changing requirements.txt."
    cat "$TMP/locust.txt"
} >"$OUT"
echo "lock: wrote $OUT ($(grep -c '^[a-z0-9]' "$OUT") packages, $(grep -c -- '--hash=' "$OUT") hashes)"
