#!/usr/bin/env bash
# Quick start and CI entry point for fleet.
#   ./run.sh setup          prepare this machine (.venv with pinned Locust and moto)
#   ./run.sh demo [args]    a local swarm in one command (Ctrl-C stops it)
#   ./run.sh test [args]    fmt, clippy, build, tests (args go to `cargo test`)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$PWD
VENV=$ROOT/.venv
# The Python that builds .venv. As root, `fleet serve` runs the Locust master as an unprivileged
# user (docs/security.md, "The spec author's reach"), which must be able to run .venv's Python:
# a Python under root's 0700 home (pyenv) is out of its reach, Debian's /usr/bin/python3 is not.
PYTHON=python3
if [ "$(id -u)" -eq 0 ] && [ -x /usr/bin/python3 ]; then PYTHON=/usr/bin/python3; fi
# Where cargo puts binaries; relative CARGO_TARGET_DIR is relative to the repo root.
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
# The Locust version pinned in requirements.txt.
LOCUST_VERSION=$(sed -n 's/^locust==\([^[:space:]]*\).*/\1/p' requirements.txt)

usage() {
    cat <<USAGE
usage: ./run.sh <command> [args...]

  setup          install python3-venv if needed, create .venv, install requirements.txt
  demo [args]    setup, build, then run \`fleet --dir demo demo\` (Ctrl-C stops it);
                 args go to \`fleet demo\`, e.g. --agents 5 --users 50
  test [args]    setup, then cargo fmt --check, clippy -D warnings, build, cargo test;
                 args go to \`cargo test\`, e.g. ./run.sh test -p fleet-common
  help           this text

CARGO_TARGET_DIR is honoured. FLEET_CACHE_DIR (default .cache/ in the clone) holds the
AMI suite's cache.
USAGE
}

step() { echo "== $*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

setup() {
    if ! "$PYTHON" -m venv --help >/dev/null 2>&1 || ! "$PYTHON" -c 'import ensurepip' >/dev/null 2>&1; then
        echo "setup: installing python3-venv python3-pip"
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv python3-pip
    fi
    # Debian's nginx, for the nginx front's end-to-end test (tests/tests/nginx.rs).
    if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
        echo "setup: installing nginx"
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y nginx
    fi
    # xmllint (Debian's libxml2-utils) checks `fleet run --junit` files against
    # tests/support/junit.xsd (tests/tests/run.rs).
    if ! command -v xmllint >/dev/null 2>&1; then
        echo "setup: installing libxml2-utils"
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y libxml2-utils
    fi
    # Debian's Chromium and playwright-core (pinned in tests/browser/package-lock.json) for the
    # browser tests in tests/browser/. Never let a tool download its own browser.
    if [ ! -x /usr/bin/chromium ]; then
        echo "setup: installing chromium"
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
    fi
    if ! command -v npm >/dev/null 2>&1; then
        echo "setup: installing nodejs and npm"
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs npm
    fi
    if [ ! -d tests/browser/node_modules ] || [ tests/browser/package-lock.json -nt tests/browser/node_modules/.package-lock.json ]; then
        echo "setup: npm ci in tests/browser"
        (cd tests/browser && npm ci --no-audit --no-fund)
    fi
    # Packer (Debian's 1.6), debootstrap and systemd-nspawn for the AMI suite (tests/ami/run.sh).
    if ! command -v packer >/dev/null 2>&1 || [ ! -x /usr/sbin/debootstrap ] \
        || [ ! -x /usr/bin/systemd-nspawn ]; then
        echo "setup: installing packer debootstrap systemd-container"
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y packer debootstrap systemd-container
    fi
    # A .venv built by another Python (say, pyenv's before the master ran confined) is rebuilt.
    local base
    base=$("$PYTHON" -c 'import sys; print(sys.base_prefix)')
    if [ -x "$VENV/bin/python" ] \
        && [ "$("$VENV/bin/python" -c 'import sys; print(sys.base_prefix)' 2>/dev/null)" != "$base" ]; then
        echo "setup: .venv was built by another Python than $PYTHON: rebuilding it"
        rm -rf "$VENV"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        echo "setup: creating .venv ($PYTHON)"
        "$PYTHON" -m venv "$VENV"
    fi
    if "$VENV/bin/locust" --version 2>/dev/null | grep -q "^locust $LOCUST_VERSION " \
        && [ -x "$VENV/bin/moto_server" ]; then
        echo "setup: .venv is up to date (locust $LOCUST_VERSION, moto)"
        return
    fi
    echo "setup: installing requirements.txt into .venv"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt
    echo "setup: done ($("$VENV/bin/locust" --version | cut -d' ' -f1-2))"
}

demo() {
    setup
    step build
    cargo build --workspace --bins
    exec "$TARGET_DIR/debug/fleet" --dir demo demo --locust "$VENV/bin/locust" "$@"
}

test_all() {
    setup
    step fmt
    cargo fmt --all -- --check
    step clippy
    cargo clippy --workspace --all-targets --locked -- -D warnings
    step "python unit tests (tests/support)"
    (cd tests/support && "$VENV/bin/python" -m unittest --quiet)
    step build
    cargo build --workspace --bins --locked
    step test
    FLEET_TEST_LOCUST=$VENV/bin/locust cargo test --workspace --locked "$@"
    step "fuzz (quick: seeds, regressions and 4 s of mutations per target; docs/reliability.md)"
    tests/fuzz.sh --quick 4
    step browser
    FLEET_TEST_LOCUST=$VENV/bin/locust CARGO_TARGET_DIR=$TARGET_DIR node --test tests/browser/
    step ami
    FLEET_TEST_LOCUST=$VENV/bin/locust CARGO_TARGET_DIR=$TARGET_DIR tests/ami/run.sh
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case $cmd in
    setup) setup ;;
    demo) demo "$@" ;;
    test) test_all "$@" ;;
    help | -h | --help) usage ;;
    *)
        echo "run.sh: unknown command '$cmd'" >&2
        usage >&2
        exit 2
        ;;
esac
