#!/usr/bin/env bash
# Image hygiene before the snapshot: the last step of the Packer build, and of the provisioning
# tests/ami/run.sh makes. Removes what belongs to the build machine rather than to the image,
# so that every node made from the image gets its own identity and nothing of the build.
# Runs as root; needs no running systemd.
set -euo pipefail

say() { echo "cleanup: $*"; }
[ "$(id -u)" -eq 0 ] || {
    echo "cleanup: must run as root" >&2
    exit 1
}

# What Packer uploaded (ami/ and the agent binary) and what the build cached.
rm -rf /tmp/fleet-ami /root/.cache/pip
# The agent never ran here; make sure no state from a test start is baked in.
rm -rf /var/lib/fleet-agent /var/lib/private/fleet-agent

apt-get clean
rm -rf /var/lib/apt/lists/*

# cloud-init sets a new instance up on its first boot (host keys, the launch key pair, hostname)
# only if it believes that boot is a first boot.
if command -v cloud-init >/dev/null 2>&1; then
    cloud-init clean --logs
    # The build instance's SSH host keys: each node gets its own from cloud-init.
    rm -f /etc/ssh/ssh_host_*
fi
# The key pair Packer logged in with: cloud-init installs each instance's own.
rm -f /root/.ssh/authorized_keys /home/*/.ssh/authorized_keys
rm -f /root/.bash_history /home/*/.bash_history

# An empty machine-id makes systemd create a new one at first boot (and treat it as a first
# boot). On Debian, /var/lib/dbus/machine-id points at it.
if [ -e /etc/machine-id ]; then
    : >/etc/machine-id
fi
if [ -f /var/lib/dbus/machine-id ] && [ ! -L /var/lib/dbus/machine-id ]; then
    rm -f /var/lib/dbus/machine-id
    ln -s /etc/machine-id /var/lib/dbus/machine-id
fi
rm -f /var/lib/systemd/random-seed

say "done"
