#!/usr/bin/env bash
# Turns a Debian or Ubuntu system into a fleet node image (docs/ami.md):
#   - the fleet-agent binary            /usr/local/bin/fleet-agent        root 0755
#   - Locust in a virtualenv            /opt/fleet/venv                   root, read-only to the agent
#   - the default agent config          /etc/fleet/agent.toml             root 0644, nothing secret
#   - the units, enabled                /etc/systemd/system/fleet-agent.service,
#                                       fleet-poweroff.path, fleet-poweroff.service
#   - the system user fleet-agent       no login, no password, home /var/lib/fleet-agent
#   - what went in                      /opt/fleet/image-info.txt
#
# usage: LOCUST_VERSION=2.47.0 provision.sh AGENT_BINARY
#
# Runs as root on the Packer build instance (packer/fleet-agent.pkr.hcl uploads ami/ to
# /tmp/fleet-ami) and in a debootstrap root under chroot (tests/ami/run.sh), so it needs no
# running systemd and starts nothing. Running it again upgrades in place: the binary, config
# and units are replaced, the venv is rebuilt only for another Locust version.
# Locust and everything it needs come from ami/locust-requirements.txt, installed with
# `pip install --require-hashes`: pip refuses any file whose sha256 is not listed there, so a
# changed or substituted package on the index (or on a mirror, PIP_INDEX_URL) fails the build.
# pip honours its usual environment (PIP_INDEX_URL, PIP_CERT, PIP_CACHE_DIR); without
# PIP_CACHE_DIR nothing is cached in the image.
set -euo pipefail
umask 022

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
AGENT_BIN=/usr/local/bin/fleet-agent
AGENT_USER=fleet-agent
STATE_DIR=/var/lib/fleet-agent
VENV=/opt/fleet/venv
CONF_DIR=/etc/fleet
UNIT_DIR=/etc/systemd/system
UNITS=(fleet-agent.service fleet-poweroff.path fleet-poweroff.service)
ENABLE=(fleet-agent.service fleet-poweroff.path)

say() { echo "provision: $*"; }
die() {
    echo "provision: $*" >&2
    exit 1
}

[ $# -eq 1 ] || die "usage: LOCUST_VERSION=X.Y.Z provision.sh AGENT_BINARY"
AGENT_SRC=$1
[ "$(id -u)" -eq 0 ] || die "must run as root"
[ -n "${LOCUST_VERSION:-}" ] || die "set LOCUST_VERSION (the Packer variable locust_version)"
[[ $LOCUST_VERSION =~ ^[0-9]+(\.[0-9]+)*$ ]] || die "LOCUST_VERSION '$LOCUST_VERSION' is not a version"
[ -f "$AGENT_SRC" ] || die "no agent binary at $AGENT_SRC"
LOCK=$HERE/locust-requirements.txt
LOCKED=$(sed -n 's/^locust==\([^[:space:]]*\).*/\1/p' "$LOCK" 2>/dev/null || true)
[ "$LOCKED" = "$LOCUST_VERSION" ] ||
    die "LOCUST_VERSION $LOCUST_VERSION is not the locust in $LOCK (${LOCKED:-none}); run ami/lock-requirements.sh after changing requirements.txt"
# Staged next to its final place (the upload directory may be mounted noexec) and checked
# there: a binary for another architecture or a newer glibc fails the build, not the node.
install -o root -g root -m 0755 "$AGENT_SRC" "$AGENT_BIN.new"
trap 'rm -f "$AGENT_BIN.new"' EXIT
AGENT_VERSION=$("$AGENT_BIN.new" --version) || die "$AGENT_SRC does not run on this system (architecture? glibc?)"
say "$AGENT_VERSION, locust $LOCUST_VERSION, $(. /etc/os-release && echo "$PRETTY_NAME") on $(uname -m)"

# A cloud image's first boot configures apt and may still hold its lock.
if command -v cloud-init >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    cloud-init status --wait >/dev/null || true
fi

# Packages (ami/packages.txt): install only what is missing.
missing=()
while read -r pkg; do
    pkg=${pkg%%#*}
    pkg=${pkg//[[:space:]]/}
    [ -n "$pkg" ] || continue
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done <"$HERE/packages.txt"
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Wait for a dpkg lock held by unattended-upgrades or cloud-init instead of failing.
    apt-get -o DPkg::Lock::Timeout=600 update -q
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
fi

# The user the agent and its workers run as: a system account that cannot log in.
if ! getent passwd "$AGENT_USER" >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir "$STATE_DIR" \
        --shell /usr/sbin/nologin --comment "fleet agent" "$AGENT_USER"
    say "created user $AGENT_USER"
fi

# A rename: safe even while an agent runs from the old binary (an in-place upgrade).
mv -f "$AGENT_BIN.new" "$AGENT_BIN"

# Locust. Rebuilt from scratch when the pinned version changes, so no stale package stays.
install -d -o root -g root -m 0755 /opt/fleet
if "$VENV/bin/locust" --version 2>/dev/null | grep -q "^locust $LOCUST_VERSION "; then
    say "venv already has locust $LOCUST_VERSION"
else
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    [ -n "${PIP_CACHE_DIR:-}" ] || export PIP_NO_CACHE_DIR=1
    say "installing locust==$LOCUST_VERSION into $VENV (hash-pinned: $(grep -c -- '--hash=' "$LOCK") hashes)"
    "$VENV/bin/pip" install --quiet --no-input --disable-pip-version-check --prefer-binary \
        --require-hashes -r "$LOCK"
fi
# Root owns every file; nobody else may write (the agent user only reads and executes).
chown -R root:root "$VENV"
chmod -R go-w "$VENV"
LOCUST_LINE=$("$VENV/bin/locust" --version)
case $LOCUST_LINE in
    "locust $LOCUST_VERSION "*) ;;
    *) die "locust in $VENV says '$LOCUST_LINE', wanted $LOCUST_VERSION" ;;
esac

# The default config: no secret, nothing fleet-specific (user-data brings those).
install -d -o root -g root -m 0755 "$CONF_DIR"
install -o root -g root -m 0644 "$HERE/agent.toml" "$CONF_DIR/agent.toml"

for u in "${UNITS[@]}"; do
    install -o root -g root -m 0644 "$HERE/$u" "$UNIT_DIR/$u"
done
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
# Enabling only makes the [Install] symlinks: nothing starts on the build machine, where
# there is no fleet user-data.
systemctl enable "${ENABLE[@]}" 2>&1 | sed 's/^/provision: /'
# A unit that does not load fails the build, not the boot. Warnings are shown, not fatal: on
# a cloud image they may concern the base's own units (the tests require none for ours).
verify_out=$(systemd-analyze verify "${UNITS[@]/#/$UNIT_DIR/}" 2>&1) || die "systemd-analyze verify: $verify_out"
[ -z "$verify_out" ] || say "systemd-analyze verify: $verify_out"

{
    echo "# What ami/provision.sh put into this image (docs/ami.md)."
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "base: $(. /etc/os-release && echo "$PRETTY_NAME") $(dpkg --print-architecture)"
    echo "agent: $AGENT_VERSION ($AGENT_BIN, sha256 $(sha256sum "$AGENT_BIN" | cut -d' ' -f1))"
    echo "locust: $LOCUST_LINE"
    echo "python: $("$VENV/bin/python" --version 2>&1)"
    echo "# pip freeze of $VENV:"
    "$VENV/bin/pip" freeze --disable-pip-version-check
} >/opt/fleet/image-info.txt
chmod 0644 /opt/fleet/image-info.txt
say "done: $AGENT_BIN, $VENV ($(du -sh "$VENV" | cut -f1)), $CONF_DIR/agent.toml, ${UNITS[*]}"
