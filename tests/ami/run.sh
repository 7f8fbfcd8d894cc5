#!/usr/bin/env bash
# The AMI suite (docs/ami.md, "Tests"). Slower than the rest; ./run.sh test runs it last.
#
#   tests/ami/run.sh [-k]      -k: keep the work directory (root filesystem, logs)
#
# 1. packer: `packer validate` of packer/fleet-agent.pkr.hcl with the installed Packer (Debian's
#    1.6.6 here), offline and without AWS credentials; packer/build.sh --validate; set-ami.py.
# 2. the release agent, built as packer/build.sh builds it.
# 3. a Debian root filesystem from debootstrap (minbase + ami/packages.txt + systemd), cached
#    as a tarball under $FLEET_CACHE_DIR/ami (default .cache/ami in the clone), extracted afresh.
# 4. ami/provision.sh and ami/cleanup.sh run in it under chroot, staged exactly as Packer
#    uploads them; then: the binaries run, the units verify, owners and modes, no secret.
# 5. if systemd-nspawn can boot a container here: the root boots, the agent starts from its
#    unit, reads user-data from the IMDSv2 emulator on the host (tests/support/imds.py), joins a
#    `fleet serve` on loopback with real Locust workers, and at max_lifetime_s powers the
#    container off through fleet-poweroff.path. If it cannot boot, the reason is printed.
#
# Needs root, debootstrap, systemd-nspawn (systemd-container), packer, python3, curl, openssl,
# and the network on a cold cache (Debian mirror, PyPI; pip downloads are cached too).
# Every mount is made in a private mount namespace (unshare -m), so none outlives the suite.
# Prints one line per check and `ami: N passed, M failed`; exits 1 if a check failed.
# FLEET_AMI_REQUIRE_BOOT=1 turns "cannot boot here" into a failure.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 1
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
# The root filesystem tarball and pip's downloads, kept between runs: under FLEET_CACHE_DIR
# (default .cache/ in the clone, git-ignored; a relative path is relative to the clone).
CACHE_ROOT=${FLEET_CACHE_DIR:-.cache}
case $CACHE_ROOT in /*) ;; *) CACHE_ROOT=$ROOT/$CACHE_ROOT ;; esac
CACHE=$CACHE_ROOT/ami
SUITE=bookworm
LOCUST_VERSION=$(sed -n 's/^locust==\([^[:space:]]*\).*/\1/p' requirements.txt)
HOST_LOCUST=${FLEET_TEST_LOCUST:-$ROOT/.venv/bin/locust}
INSTANCE_ID="i-0a11ce5ba5eba11f0"
LIFETIME_S=60
KEEP=0
case ${1:-} in
    -k) KEEP=1 ;;
    "") ;;
    *)
        echo "usage: tests/ami/run.sh [-k]" >&2
        exit 2
        ;;
esac

passed=0
failed=0
skipped=0
ok() {
    echo "ok    $*"
    passed=$((passed + 1))
}
fail() {
    echo "FAIL  $*"
    failed=$((failed + 1))
}
skip() {
    echo "skip  $*"
    skipped=$((skipped + 1))
}
note() { echo "      $*"; }
phase() {
    echo "-- $* (t=${SECONDS}s)"
}
# check NAME CMD...: ok if CMD succeeds, else FAIL with its last output lines.
check() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then
        ok "$name"
    else
        fail "$name"
        printf '%s\n' "$out" | tail -n 15 | sed 's/^/      | /'
    fi
}
# wait_until SECONDS CMD...: polls CMD every 0.5 s.
wait_until() {
    local end=$((SECONDS + $1))
    shift
    while [ $SECONDS -lt $end ]; do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    "$@" >/dev/null 2>&1
}
finish() {
    echo "ami: $passed passed, $failed failed"
    [ $failed -eq 0 ]
    exit $?
}

WORK=$(mktemp -d /var/tmp/fleet-ami-test.XXXXXX)
chmod 0755 "$WORK"
RFS=$WORK/root
SERVE_PID=
IMDS_PID=
NSPAWN_PID=
stop_pid() { # stop_pid PID SECONDS: SIGTERM, then SIGKILL after SECONDS
    local pid=$1 i
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < $2 * 4; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.25
    done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
}
cleanup() {
    stop_pid "$NSPAWN_PID" 20
    stop_pid "$SERVE_PID" 15
    stop_pid "$IMDS_PID" 5
    if grep -q " $WORK" /proc/mounts; then
        echo "FAIL  mounts left under $WORK:"
        grep " $WORK" /proc/mounts | sed 's/^/      | /'
    fi
    if [ $KEEP -eq 1 ]; then
        echo "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# In a private mount namespace: mount what a chroot needs, run the command, and let the
# namespace take every mount with it. in_root [--pip] [--user U] CMD...
in_root() {
    local pip=0 spec=
    while :; do
        case $1 in
            --pip) pip=1; shift ;;
            --user) spec="--userspec=$2:$2"; shift 2 ;;
            *) break ;;
        esac
    done
    local envs=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
        "LOCUST_VERSION=$LOCUST_VERSION")
    [ $pip -eq 1 ] && envs+=("${PIP_ENV[@]}")
    unshare -m --propagation private -- bash -c '
        set -e
        r=$1 pip=$2 cache=$3 spec=$4
        shift 4
        mount -t proc proc "$r/proc"
        mount --rbind /dev "$r/dev"
        mount --bind /etc/resolv.conf "$r/etc/resolv.conf"
        if [ "$pip" = 1 ]; then
            mkdir -p "$r/tmp/fleet-ami/pip-cache"
            mount --bind "$cache" "$r/tmp/fleet-ami/pip-cache"
        fi
        exec chroot $spec "$r" /usr/bin/env -i "$@"
    ' in_root "$RFS" $pip "$CACHE/pip" "$spec" "${envs[@]}" "$@"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

echo "ami suite: $SUITE rootfs, locust $LOCUST_VERSION, work dir $WORK, cache $CACHE"

phase "tools"
missing=()
for t in debootstrap systemd-nspawn packer python3 curl openssl unshare zstd cargo; do
    command -v $t >/dev/null || missing+=("$t")
done
if [ "$(id -u)" -ne 0 ]; then
    fail "the suite needs root (debootstrap, chroot, systemd-nspawn)"
    finish
fi
if [ ${#missing[@]} -gt 0 ]; then
    fail "tools missing: ${missing[*]} (./run.sh setup installs packer debootstrap systemd-container)"
    finish
fi
ok "tools: $(packer version | head -1), $(debootstrap --version | head -1), $(systemd-nspawn --version | head -1)"
check "scripts parse (bash -n, python ast)" bash -c '
    for f in ami/provision.sh ami/cleanup.sh packer/build.sh certs/audit.sh tests/ami/run.sh; do bash -n "$f" || exit 1; done
    for f in packer/set-ami.py certs/scan-image.py tests/support/imds.py tests/ami/*.py; do
        python3 -c "import ast,sys; ast.parse(open(sys.argv[1]).read())" "$f" || exit 1
    done'

phase "agent and controller binaries"
t0=$SECONDS
if out=$(cargo build --release --locked -p fleet-agent 2>&1); then
    AGENT=$TARGET_DIR/release/fleet-agent
    size=$(stat -c %s "$AGENT")
    ok "cargo build --release -p fleet-agent ($((SECONDS - t0)) s, $((size / 1024)) KiB)"
    [ "$size" -le $((5 * 1024 * 1024)) ] && ok "release agent is at most 5 MiB (budget)" ||
        fail "release agent is $size bytes, over the 5 MiB budget"
else
    fail "cargo build --release -p fleet-agent"
    printf '%s\n' "$out" | tail -n 15 | sed 's/^/      | /'
    finish
fi
if ! out=$(cargo build --locked -p fleet --bin fleet 2>&1); then
    fail "cargo build -p fleet"
    printf '%s\n' "$out" | tail -n 15 | sed 's/^/      | /'
    finish
fi
FLEET=$TARGET_DIR/debug/fleet
AGENT_VERSION=$("$AGENT" --version)

# The fleet the image is tested against. Made before provisioning, so its secrets exist on
# the build machine while the image is built, as they would on an operator's laptop.
PORT=$(free_port)
MASTER_PORT=$(free_port)
WEB_PORT=$(free_port)
FD=$WORK/fleet
"$FLEET" --dir "$FD" init --name ami-test --listen "127.0.0.1:$PORT" --locust "$HOST_LOCUST" >/dev/null 2>"$WORK/init.err" ||
    { fail "fleet init: $(cat "$WORK/init.err")"; finish; }

phase "packer"
PLACEHOLDER=$WORK/placeholder-agent
: >"$PLACEHOLDER"
noaws=(env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN -u AWS_PROFILE
    -u AWS_REGION -u AWS_DEFAULT_REGION AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_CONFIG_FILE=/dev/null)
check "packer validate packer/fleet-agent.pkr.hcl (x86_64; offline, no AWS credentials)" \
    unshare -n "${noaws[@]}" packer validate -var arch=x86_64 -var "agent_binary=$AGENT" packer/fleet-agent.pkr.hcl
# Validation only stats the file provisioner's source: an empty stand-in serves for arm64.
check "packer validate packer/fleet-agent.pkr.hcl (arm64, region eu-west-1; offline)" \
    unshare -n "${noaws[@]}" packer validate -var arch=arm64 -var region=eu-west-1 \
    -var "agent_binary=$PLACEHOLDER" packer/fleet-agent.pkr.hcl
out=$(packer validate -var arch=sparc -var "agent_binary=$AGENT" packer/fleet-agent.pkr.hcl 2>&1)
[ $? -ne 0 ] && grep -q "arch must be x86_64 or arm64" <<<"$out" &&
    ok "packer validate refuses arch=sparc (variable validation)" ||
    fail "packer validate accepted arch=sparc: $out"
read -r pk_major pk_minor < <(packer version | sed -n 's/^Packer v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
if [ "$pk_major" -eq 1 ] && [ "$pk_minor" -lt 7 ]; then
    # Why there are two files: Packer 1.6 rejects the block newer Packer needs, and only it.
    out=$(unshare -n "${noaws[@]}" packer validate -var "agent_binary=$AGENT" packer/ 2>&1)
    if grep -q 'on packer/plugins.pkr.hcl' <<<"$out" && ! grep -q 'fleet-agent.pkr.hcl' <<<"$out"; then
        ok "packer $pk_major.$pk_minor on packer/ objects only to plugins.pkr.hcl (Packer >= 1.7 only)"
    else
        fail "packer validate packer/ failed for another reason than plugins.pkr.hcl"
        printf '%s\n' "$out" | sed 's/^/      | /'
    fi
else
    check "packer init + validate packer/ (Packer $pk_major.$pk_minor)" \
        bash -c "packer init packer/ && packer validate -var agent_binary=$AGENT packer/"
fi
check "packer/build.sh --validate (picks the template for this Packer; offline)" \
    unshare -n "${noaws[@]}" packer/build.sh --validate --agent-binary "$AGENT"
out=$(packer/build.sh --validate --arch arm64 --agent-binary "$AGENT" 2>&1)
[ $? -ne 0 ] && grep -q "not an arm64 ELF" <<<"$out" &&
    ok "packer/build.sh refuses an x86_64 agent for an arm64 image" ||
    fail "packer/build.sh took an x86_64 agent for arm64: $out"

# set-ami.py on manifests shaped like the post-processor's, against fleet's own config parser.
cp "$FD/fleet.toml" "$WORK/fleet.toml.orig"
cat >"$WORK/manifest1.json" <<'EOF'
{"builds": [{"name": "fleet", "builder_type": "amazon-ebs", "build_time": 1700000000,
  "files": null, "artifact_id": "us-east-1:ami-0123456789abcdef0", "packer_run_uuid": "r1",
  "custom_data": {"arch": "x86_64", "locust_version": "2.47.0"}}], "last_run_uuid": "r1"}
EOF
cat >"$WORK/manifest2.json" <<'EOF'
{"builds": [{"name": "fleet", "builder_type": "amazon-ebs", "build_time": 1700000000,
  "files": null, "artifact_id": "us-east-1:ami-0123456789abcdef0", "packer_run_uuid": "r1"},
 {"name": "fleet", "builder_type": "amazon-ebs", "build_time": 1700000500, "files": null,
  "artifact_id": "us-east-1:ami-0aaaaaaaaaaaaaaa1,eu-west-1:ami-0bbbbbbbbbbbbbbb2",
  "packer_run_uuid": "r2"}], "last_run_uuid": "r2"}
EOF
set_ami_ok() {
    python3 packer/set-ami.py "$WORK/manifest1.json" "$FD/fleet.toml" &&
        grep -qx 'ami = "ami-0123456789abcdef0"' "$FD/fleet.toml" &&
        python3 packer/set-ami.py "$WORK/manifest2.json" "$FD/fleet.toml" --region eu-west-1 &&
        [ "$(grep -c '^ami = ' "$FD/fleet.toml")" = 1 ] &&
        grep -qx 'ami = "ami-0bbbbbbbbbbbbbbb2"' "$FD/fleet.toml" &&
        grep -q '^# fleet configuration' "$FD/fleet.toml" &&
        ! python3 packer/set-ami.py "$WORK/manifest2.json" "$FD/fleet.toml" --region ap-south-1 &&
        "$FLEET" --dir "$FD" user-data >/dev/null
}
check "set-ami.py writes [ec2] ami from the manifest (last run, per region); fleet reads the result" set_ami_ok
# The wrapper end to end, with a Packer whose `build` writes the manifest an amazon-ebs build
# would instead of calling AWS: the arguments it passes, the region it picks, fleet.toml.
wrapper_ok() {
    local bin=$WORK/stub-bin d=$WORK/fleet-build real
    real=$(command -v packer)
    mkdir -p "$bin" "$d"
    printf '# my fleet\nname = "x"\n\n[ec2]\nregion = "eu-north-1"\ninstance_types = ["c6i.large"]\n' >"$d/fleet.toml"
    cat >"$bin/packer" <<STUB
#!/bin/sh
[ "\$1" = build ] || exec "$real" "\$@"
echo "\$@" >"$WORK/stub-build-args"
for a in "\$@"; do case \$a in manifest=*) m=\${a#manifest=} ;; esac; done
printf '{"builds": [{"name": "fleet", "builder_type": "amazon-ebs", "artifact_id": "eu-north-1:ami-0feedfacefeedface", "packer_run_uuid": "u"}], "last_run_uuid": "u"}' >"\$m"
STUB
    chmod +x "$bin/packer"
    PATH=$bin:$PATH packer/build.sh --fleet-dir "$d" || return 1
    local args a
    args=$(cat "$WORK/stub-build-args")
    for a in "arch=x86_64" "region=eu-north-1" "locust_version=$LOCUST_VERSION" \
        "agent_binary=$TARGET_DIR/release/fleet-agent" "packer/fleet-agent.pkr.hcl"; do
        grep -qF -- "$a" <<<"$args" || { echo "packer build was not given $a: $args"; return 1; }
    done
    python3 -c 'import sys, tomllib; e = tomllib.load(open(sys.argv[1], "rb"))["ec2"]; sys.exit(not (e["ami"] == "ami-0feedfacefeedface" and e["region"] == "eu-north-1"))' "$d/fleet.toml" &&
        head -1 "$d/fleet.toml" | grep -q '^# my fleet' && [ -f "$d/packer-manifest.json" ]
}
if [ "$pk_major" -eq 1 ] && [ "$pk_minor" -lt 7 ]; then
    check "packer/build.sh (Packer's build stubbed): builds the agent, passes arch, region, locust, binary; sets ec2.ami" wrapper_ok
fi

phase "debootstrap root filesystem"
MIRROR=$(python3 tests/ami/apt_mirror.py "$SUITE")
ARCH=$(dpkg --print-architecture)
PKGS=$(
    {
        echo systemd systemd-sysv dbus
        sed 's/#.*//' ami/packages.txt
    } | tr -s ' \n' '\n' | sed '/^$/d' | sort -u | paste -sd, -
)
KEY=$(printf '%s\n' "$SUITE" "$ARCH" "$MIRROR" minbase "$PKGS" "$(debootstrap --version)" v1 | sha256sum | cut -c1-12)
TARBALL=$CACHE/rootfs-$SUITE-$ARCH-$KEY.tar.zst
mkdir -p "$CACHE/pip"
t0=$SECONDS
(
    flock 9
    if [ ! -f "$TARBALL" ]; then
        echo "      building $TARBALL: debootstrap --variant=minbase --include=$PKGS $SUITE $MIRROR"
        # Under the lock, any debootstrap directory left is from a run that was killed.
        rm -rf "$CACHE"/debootstrap.*
        tmp=$(mktemp -d "$CACHE/debootstrap.XXXXXX")
        # debootstrap mounts /proc and /sys in the target: a private namespace takes them away
        # even if the run is killed.
        if ! unshare -m --propagation private -- debootstrap --variant=minbase --include="$PKGS" \
            "$SUITE" "$tmp" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
            tail -n 20 "$WORK/debootstrap.log" | sed 's/^/      | /'
            rm -rf "$tmp"
            exit 1
        fi
        # The stand-in for a cloud base image: nothing of this host in it.
        chmod 0755 "$tmp"
        : >"$tmp/etc/resolv.conf"
        echo debian >"$tmp/etc/hostname"
        rm -rf "$tmp/var/cache/apt/archives/"*.deb "$tmp/var/lib/apt/lists/"*_Packages
        tar --numeric-owner --xattrs --xattrs-include='*' -C "$tmp" -I 'zstd -T0 -3' -cf "$TARBALL.tmp" . &&
            mv "$TARBALL.tmp" "$TARBALL"
        rc=$?
        rm -rf "$tmp"
        # Roots made for another key (package list, mirror, debootstrap) are of no further use.
        find "$CACHE" -maxdepth 1 -name "rootfs-$SUITE-$ARCH-*.tar.zst" ! -name "$(basename "$TARBALL")" -delete
        exit $rc
    fi
) 9>"$CACHE/.lock"
if [ $? -ne 0 ] || [ ! -f "$TARBALL" ]; then
    fail "debootstrap $SUITE ($MIRROR)"
    finish
fi
built=$((SECONDS - t0))
mkdir -p "$RFS"
t0=$SECONDS
if tar --numeric-owner --xattrs --xattrs-include='*' -C "$RFS" -I zstd -xf "$TARBALL" && chmod 0755 "$RFS"; then
    ok "root filesystem: $SUITE $ARCH minbase + $PKGS (cache $(basename "$TARBALL"), $(du -sh "$TARBALL" | cut -f1); made in ${built} s, extracted in $((SECONDS - t0)) s)"
else
    fail "extract $TARBALL"
    finish
fi
BASE_KB=$(du -sk "$RFS" | cut -f1)
base_machine_id=$(cat "$RFS/etc/machine-id")

phase "provisioning (ami/provision.sh, ami/cleanup.sh under chroot)"
# Staged as Packer's file provisioners upload them: ami/ into /tmp/fleet-ami, the agent beside it.
mkdir -p "$RFS/tmp/fleet-ami"
cp -a ami/. "$RFS/tmp/fleet-ami/"
cp "$AGENT" "$RFS/tmp/fleet-ami/fleet-agent"
PIP_ENV=(PIP_CACHE_DIR=/tmp/fleet-ami/pip-cache PIP_DISABLE_PIP_VERSION_CHECK=1)
# This machine may reach PyPI through a TLS proxy whose CA only the host trusts: pip in the
# root gets that bundle for the build, in /tmp/fleet-ami, which cleanup.sh removes.
host_cert=${PIP_CERT:-$(pip3 config get global.cert 2>/dev/null || true)}
if [ -n "$host_cert" ] && [ -f "$host_cert" ]; then
    cp "$host_cert" "$RFS/tmp/fleet-ami/build-ca.pem"
    PIP_ENV+=(PIP_CERT=/tmp/fleet-ami/build-ca.pem)
fi
[ -z "${PIP_INDEX_URL:-}" ] || PIP_ENV+=("PIP_INDEX_URL=$PIP_INDEX_URL")
t0=$SECONDS
if in_root --pip bash /tmp/fleet-ami/provision.sh /tmp/fleet-ami/fleet-agent >"$WORK/provision.log" 2>&1; then
    ok "provision.sh ($((SECONDS - t0)) s)"
    sed 's/^/      | /' "$WORK/provision.log" | grep -v 'Created symlink'
else
    fail "provision.sh"
    tail -n 30 "$WORK/provision.log" | sed 's/^/      | /'
    finish
fi
t0=$SECONDS
if in_root --pip bash /tmp/fleet-ami/provision.sh /tmp/fleet-ami/fleet-agent >"$WORK/provision2.log" 2>&1 &&
    grep -q "venv already has locust $LOCUST_VERSION" "$WORK/provision2.log"; then
    ok "provision.sh again: upgrades in place, keeps the venv ($((SECONDS - t0)) s)"
else
    fail "provision.sh again"
    tail -n 20 "$WORK/provision2.log" | sed 's/^/      | /'
fi
# Locust came from the hash-pinned lock, exactly: every package pip froze in the venv is pinned
# there at that version, and a lock with one wrong hash is refused (in a scratch venv).
lock_pins() { sed -n 's/^\([A-Za-z0-9._-]*\)==\([^ ]*\).*/\1==\2/p' "$1" | tr 'A-Z_.' 'a-z--' | sort; }
venv_pins() { in_root /opt/fleet/venv/bin/pip freeze --disable-pip-version-check | tr 'A-Z_.' 'a-z--' | sort; }
if grep -q "hash-pinned" "$WORK/provision.log" && [ "$(lock_pins ami/locust-requirements.txt)" = "$(venv_pins)" ]; then
    ok "the venv holds exactly ami/locust-requirements.txt ($(lock_pins ami/locust-requirements.txt | wc -l) packages, installed with --require-hashes)"
else
    fail "the venv differs from ami/locust-requirements.txt: $(diff <(lock_pins ami/locust-requirements.txt) <(venv_pins) | tr '\n' ' ')"
fi
python3 - ami/locust-requirements.txt "$RFS/tmp/fleet-ami/tampered.txt" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
# Every hash of the locust entry replaced: pip must refuse the locust files it downloads.
entry = re.search(r"^locust==.*?(?=^\S)", text, re.S | re.M).group(0)
open(sys.argv[2], "w").write(text.replace(entry, re.sub(r"sha256:[0-9a-f]{64}", "sha256:" + "0" * 64, entry)))
PY
if in_root --pip bash -c 'python3 -m venv /tmp/fleet-ami/hashcheck && /tmp/fleet-ami/hashcheck/bin/pip install --quiet --no-input --prefer-binary --require-hashes -r /tmp/fleet-ami/tampered.txt' >"$WORK/tampered.log" 2>&1; then
    fail "pip installed from a lock with a wrong hash for locust"
elif grep -q "DO NOT MATCH THE HASHES" "$WORK/tampered.log"; then
    ok "a lock with a wrong hash for locust is refused by pip"
else
    fail "the tampered lock failed for another reason: $(tail -n 3 "$WORK/tampered.log" | tr '\n' ' ')"
fi
check "cleanup.sh" in_root bash /tmp/fleet-ami/cleanup.sh
PROV_KB=$(du -sk "$RFS" | cut -f1)

phase "the provisioned image"
line=$(in_root --user fleet-agent /usr/local/bin/fleet-agent --version 2>&1)
[ "$line" = "$AGENT_VERSION" ] && ok "fleet-agent --version as user fleet-agent: $line" ||
    fail "fleet-agent --version: $line"
line=$(in_root --user fleet-agent /opt/fleet/venv/bin/locust --version 2>&1)
[[ $line == "locust $LOCUST_VERSION "* ]] && ok "locust --version from /opt/fleet/venv as user fleet-agent: $line" ||
    fail "locust --version: $line"
if in_root --user fleet-agent /usr/bin/touch /opt/fleet/venv/probe >/dev/null 2>&1 ||
    in_root --user fleet-agent /usr/bin/touch /etc/fleet/probe >/dev/null 2>&1 ||
    in_root --user fleet-agent /bin/sh -c 'echo x >>/usr/local/bin/fleet-agent' >/dev/null 2>&1; then
    fail "user fleet-agent could write into the venv, /etc/fleet or the binary"
else
    ok "user fleet-agent cannot write the venv, /etc/fleet or the binary"
fi
modes_ok() {
    local bad=0 p want got
    while read -r p want; do
        got=$(stat -c '%u:%g %a' "$RFS$p" 2>/dev/null || echo missing)
        [ "$got" = "$want" ] || {
            echo "$p: $got, want $want"
            bad=1
        }
    done <<'EOF'
/usr/local/bin/fleet-agent 0:0 755
/etc/fleet 0:0 755
/etc/fleet/agent.toml 0:0 644
/etc/systemd/system/fleet-agent.service 0:0 644
/etc/systemd/system/fleet-poweroff.path 0:0 644
/etc/systemd/system/fleet-poweroff.service 0:0 644
/opt/fleet 0:0 755
/opt/fleet/venv 0:0 755
/opt/fleet/venv/bin/locust 0:0 755
/opt/fleet/image-info.txt 0:0 644
EOF
    local loose
    loose=$(find "$RFS/opt/fleet" ! -type l \( ! -uid 0 -o ! -gid 0 -o -perm /022 \) | head -5)
    [ -z "$loose" ] || {
        echo "not root-owned or writable by others: $loose"
        bad=1
    }
    return $bad
}
check "owners and modes: binary, config, units, venv (root, nothing writable by others)" modes_ok
user_ok() {
    local pw sh
    pw=$(grep '^fleet-agent:' "$RFS/etc/passwd") || { echo "no user fleet-agent"; return 1; }
    IFS=: read -r _ _ uid gid _ home sh <<<"$pw"
    [ "$uid" -lt 1000 ] && [ "$home" = /var/lib/fleet-agent ] && [ "$sh" = /usr/sbin/nologin ] ||
        { echo "$pw"; return 1; }
    grep -q "^fleet-agent:[!*]" "$RFS/etc/shadow" || { echo "fleet-agent has a password"; return 1; }
    grep -q "^fleet-agent:x:$gid:" "$RFS/etc/group" || { echo "no group fleet-agent"; return 1; }
    local member
    member=$(awk -F: '$4 ~ /(^|,)fleet-agent(,|$)/ { print $1 }' "$RFS/etc/group")
    [ -z "$member" ] || { echo "fleet-agent is a member of $member"; return 1; }
}
check "user fleet-agent: system uid, no login shell, no password, no other group" user_ok
check "fleet-agent.service and fleet-poweroff.path are enabled (multi-user.target)" bash -c "
    [ \"\$(systemctl --root='$RFS' is-enabled fleet-agent.service)\" = enabled ] &&
    [ \"\$(systemctl --root='$RFS' is-enabled fleet-poweroff.path)\" = enabled ]"
out=$(in_root systemd-analyze verify /etc/systemd/system/fleet-agent.service \
    /etc/systemd/system/fleet-poweroff.path /etc/systemd/system/fleet-poweroff.service 2>&1)
[ $? -eq 0 ] && [ -z "$out" ] && ok "systemd-analyze verify: the three units, no warning" ||
    { fail "systemd-analyze verify"; printf '%s\n' "$out" | sed 's/^/      | /'; }
out=$(in_root systemd-analyze security --offline=true --no-pager /etc/systemd/system/fleet-agent.service 2>&1)
score=$(sed -n 's/.*Overall exposure level for fleet-agent.service: \([0-9.]*\).*/\1/p' <<<"$out")
if [ -n "$score" ] && awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }'; then
    ok "systemd-analyze security fleet-agent.service: exposure $score (at most 2.0)"
else
    fail "systemd-analyze security: exposure '${score:-?}'"
    grep '✗' <<<"$out" | sed 's/^/      | /'
fi
unit_ok() {
    local u=$RFS/etc/systemd/system/fleet-agent.service d
    for d in User=fleet-agent NoNewPrivileges=yes ProtectSystem=strict Restart=always \
        StateDirectory=fleet-agent RuntimeDirectory=fleet-agent LimitNOFILE=65536 TasksMax=4096 \
        MemoryMax=90% KillMode=mixed TimeoutStopSec=30s ExecStart=/usr/local/bin/fleet-agent; do
        grep -qx "$d" "$u" || { echo "missing $d"; return 1; }
    done
    grep -qx 'PathExists=/run/fleet-agent/poweroff' "$RFS/etc/systemd/system/fleet-poweroff.path" &&
        grep -qx 'ExecStart=/usr/bin/systemctl --no-block --no-wall poweroff' "$RFS/etc/systemd/system/fleet-poweroff.service"
}
check "unit settings: user, hardening, limits, restart, power-off path" unit_ok
check "/etc/fleet/agent.toml: only imds, locust, state_dir, poweroff_command (no fleet, no secret)" \
    python3 tests/ami/check_agent_toml.py "$RFS"
out=$(in_root --user fleet-agent /usr/local/bin/fleet-agent --user-data-file /dev/null 2>&1)
rc=$?
[ $rc -eq 64 ] && grep -q "controller" <<<"$out" && ! grep -q "agent.toml" <<<"$out" &&
    ok "the agent reads the baked config and wants user-data for the rest (exit 64: ${out#fleet-agent: })" ||
    fail "fleet-agent with the baked config and empty user-data: exit $rc: $out"
hygiene_ok() {
    local bad=0
    [ ! -e "$RFS/tmp/fleet-ami" ] || { echo "/tmp/fleet-ami is still there"; bad=1; }
    [ -z "$(ls -A "$RFS/tmp")" ] || { echo "/tmp is not empty: $(ls -A "$RFS/tmp")"; bad=1; }
    [ ! -s "$RFS/etc/machine-id" ] || { echo "/etc/machine-id is not empty"; bad=1; }
    [ -n "$base_machine_id" ] || { echo "(the base had no machine-id)"; }
    [ ! -e "$RFS/var/lib/fleet-agent" ] || { echo "/var/lib/fleet-agent exists"; bad=1; }
    [ ! -e "$RFS/root/.cache/pip" ] || { echo "/root/.cache/pip exists"; bad=1; }
    ! ls "$RFS"/etc/ssh/ssh_host_* >/dev/null 2>&1 || { echo "SSH host keys"; bad=1; }
    [ ! -s "$RFS/etc/resolv.conf" ] || { echo "the host's resolv.conf leaked"; bad=1; }
    [ -z "$(find "$RFS/var/lib/apt/lists" -maxdepth 1 -type f ! -name lock 2>/dev/null)" ] || { echo "apt lists left"; bad=1; }
    return $bad
}
check "hygiene: no upload, pip cache, build CA, machine-id, state, host keys or apt lists left" hygiene_ok
out=$(python3 certs/scan-image.py "$RFS" --fleet-dir "$FD" 2>&1)
if [ $? -eq 0 ]; then
    ok "no secret in the image: $(tail -n 1 <<<"$out" | sed 's/^scan-image: //')"
    grep '^allowed' <<<"$out" | sed 's/^/      /' | sed 's/allowed: //; s/^\(      \/opt\/fleet\/venv\/lib\/python3[^/]*\/site-packages\/\)/      site-packages\//'
else
    fail "secrets in the image"
    grep -v '^allowed' <<<"$out" | sed 's/^/      | /'
fi
# The scanner must find what it is for: plant the fleet's secrets in a scratch root.
scanner_finds() {
    local s=$WORK/planted site=opt/fleet/venv/lib/python3.11/site-packages
    rm -rf "$s"
    mkdir -p "$s/etc/fleet" "$s/root" "$s/var/lib/x" "$s/etc/ssh"
    cp "$FD/certs/ca.key" "$s/root/backup.pem"
    cp "$FD/secrets/signing.pk8" "$s/var/lib/x/key"
    printf 'controller = "https://x"\ntoken = "%s"\n' "$(cat "$FD/secrets/agent.token")" >"$s/etc/fleet/agent.toml"
    sed 's/BEGIN PRIVATE KEY/BEGIN OPENSSH PRIVATE KEY/' "$FD/certs/server.key" >"$s/etc/ssh/ssh_host_ed25519_key"
    # gevent's published test keys, one of them changed: that one is no longer published.
    local site gt=
    site=$(cd "$RFS" && ls -d opt/fleet/venv/lib/python3*/site-packages | head -1)
    if [ -d "$RFS/$site/gevent/tests" ]; then
        gt=$site/gevent/tests
        mkdir -p "$s/$site/gevent"
        cp -a "$RFS/$site"/gevent-*.dist-info "$s/$site/"
        cp -a "$RFS/$gt" "$s/$site/gevent/"
        echo "# changed" >>"$s/$gt/server.key"
    fi
    local out
    out=$(python3 certs/scan-image.py "$s" --fleet-dir "$FD")
    [ $? -eq 1 ] || return 1
    for f in /root/backup.pem /var/lib/x/key /etc/fleet/agent.toml /etc/ssh/ssh_host_ed25519_key \
        ${gt:+/$gt/server.key}; do
        grep -q "^SECRET: $f:" <<<"$out" || { echo "missed $f"; echo "$out"; return 1; }
    done
    [ -z "$gt" ] || grep -q "^allowed: /$gt/keycert.pem" <<<"$out" || { echo "$out"; return 1; }
    rm -rf "$s"
}
check "the scanner finds planted keys, tokens and a changed published file" scanner_finds
check "certs/audit.sh on the test fleet and its user-data" bash -c \
    "'$FLEET' --dir '$FD' user-data >'$WORK/ud-check.toml' && certs/audit.sh '$FD' --user-data '$WORK/ud-check.toml'"
venv_kb=$(du -sk "$RFS/opt/fleet/venv" | cut -f1)
note "sizes: root $((BASE_KB / 1024)) MiB before, $((PROV_KB / 1024)) MiB after provisioning; venv $((venv_kb / 1024)) MiB; agent $(($(stat -c %s "$RFS/usr/local/bin/fleet-agent") / 1024)) KiB"

phase "boot with systemd-nspawn"
boot() {
    # The controller: master and UI on their own ports; the nodes' settings go into user-data.
    python3 tests/ami/fleet_toml.py "$FD/fleet.toml" "$MASTER_PORT" "$WEB_PORT" "$LIFETIME_S"
    "$FLEET" --dir "$FD" user-data >"$WORK/user-data.toml" || { fail "fleet user-data"; return; }
    setsid "$FLEET" --dir "$FD" serve >"$WORK/serve.log" 2>&1 </dev/null &
    SERVE_PID=$!
    if ! wait_until 30 curl -sf --cacert "$FD/certs/ca.pem" "https://127.0.0.1:$PORT/healthz"; then
        fail "fleet serve did not come up"
        tail -n 10 "$WORK/serve.log" | sed 's/^/      | /'
        return
    fi
    setsid python3 tests/support/imds.py --user-data "$WORK/user-data.toml" --instance-id "$INSTANCE_ID" \
        >"$WORK/imds.out" 2>"$WORK/imds.log" </dev/null &
    IMDS_PID=$!
    wait_until 10 grep -q listening "$WORK/imds.out" || { fail "imds.py did not start"; return; }
    local imds_url
    imds_url=$(sed -n 's/^listening on //p' "$WORK/imds.out")
    # The test copy only: IMDS is the emulator on the host's loopback, which the container
    # shares (no private network).
    mkdir -p "$RFS/etc/systemd/system/fleet-agent.service.d"
    printf '[Service]\nEnvironment=AWS_EC2_METADATA_SERVICE_ENDPOINT=%s\n' "$imds_url" \
        >"$RFS/etc/systemd/system/fleet-agent.service.d/test-imds.conf"

    # Without systemd as PID 1 on the host there is no machined to register with and no scope
    # to create: the container's cgroup is made under ours (--keep-unit --register=no). nspawn
    # also wants /run/systemd/nspawn on a tmpfs: one is mounted in a private namespace.
    # Raising the hard limit needs CAP_SYS_RESOURCE, which a sandbox may have dropped; the
    # container's systemd then caps LimitNOFILE= at what it inherited.
    NOFILE=$(bash -c 'ulimit -Hn 1048576 2>/dev/null; ulimit -Hn')
    [ "$NOFILE" = unlimited ] || [ "$NOFILE" -gt 65536 ] && NOFILE=65536
    [ "$NOFILE" = 65536 ] || note "this machine caps open files at $NOFILE (no CAP_SYS_RESOURCE): the workers get $NOFILE, not the unit's 65536"
    local nspawn_flags=(--boot --console=pipe --quiet --machine=fleet-ami-test -D "$RFS")
    [ -d /run/systemd/system ] || nspawn_flags+=(--register=no --keep-unit)
    mkdir -p /run/systemd/nspawn
    local boot_t0=$SECONDS
    (
        # PID 1 of an EC2 instance has a high hard limit on open files, so LimitNOFILE=65536
        # applies there. Raise ours as far as this machine allows (see NOFILE below).
        ulimit -Hn 1048576 2>/dev/null
        ulimit -Sn "$(ulimit -Hn)"
        exec unshare -m --propagation private -- sh -c \
            'mount -t tmpfs tmpfs /run/systemd/nspawn && exec systemd-nspawn "$@"' nspawn "${nspawn_flags[@]}"
    ) >"$WORK/nspawn.log" 2>&1 </dev/null &
    NSPAWN_PID=$!
    # The container's PID 1 is nspawn's child.
    local leader='' state=''
    for _ in $(seq 1 120); do
        kill -0 $NSPAWN_PID 2>/dev/null || break
        leader=$(pgrep -P $NSPAWN_PID -x systemd | head -1)
        if [ -n "$leader" ]; then
            state=$(nsenter -t "$leader" -m -u -i -n -p -- /usr/bin/systemctl is-system-running 2>/dev/null)
            case $state in running | degraded) break ;; esac
        fi
        sleep 0.5
    done
    case $state in
        running | degraded) ;;
        *)
            local why
            why=$(grep -v '^$' "$WORK/nspawn.log" | tail -n 8)
            stop_pid "$NSPAWN_PID" 10
            NSPAWN_PID=
            if [ "${FLEET_AMI_REQUIRE_BOOT:-0}" = 1 ]; then
                fail "systemd-nspawn --boot did not reach running (state '${state:-none}')"
            else
                skip "boot: systemd-nspawn could not boot the root here (state '${state:-none}'); nspawn said:"
            fi
            printf '%s\n' "${why:-(nothing)}" | sed 's/^/      | /'
            return
            ;;
    esac
    E=(nsenter -t "$leader" -m -u -i -n -p --)
    ok "systemd-nspawn --boot: the root boots ($state in $((SECONDS - boot_t0)) s; host cgroups: $(stat -fc %T /sys/fs/cgroup))"
    [ "$state" = degraded ] && note "failed units: $("${E[@]}" systemctl --failed --plain --no-legend | awk '{print $1}' | paste -sd' ')"

    # The agent: started by its unit, user-data from the emulator, heartbeats to the controller.
    local api=(curl -sf --cacert "$FD/certs/ca.pem" -H "Authorization: Bearer $(cat "$FD/secrets/operator.token")")
    local nworkers
    nworkers=$("${E[@]}" /usr/bin/nproc)
    # joined [SINCE]: the node reports a running bundle with all its workers running, from an
    # agent started after SECONDS=SINCE (its uptime), in a heartbeat younger than 5 s.
    joined() {
        "${api[@]}" "https://127.0.0.1:$PORT/api/nodes" |
            python3 tests/ami/nodes.py joined "$INSTANCE_ID" "$nworkers" $((SECONDS - ${1:-0} + 1))
    }
    if wait_until 60 joined; then
        local hb
        hb=$("${api[@]}" "https://127.0.0.1:$PORT/api/nodes" | python3 tests/ami/nodes.py describe "$INSTANCE_ID")
        ok "the agent joined the controller $((SECONDS - boot_t0)) s after boot: $hb"
    else
        fail "the agent did not join within 60 s"
        "${api[@]}" "https://127.0.0.1:$PORT/api/nodes" | head -c 600 | sed 's/^/      | /'
        echo
        "${E[@]}" journalctl -u fleet-agent -b --no-pager 2>&1 | tail -n 20 | sed 's/^/      | /'
    fi
    grep -q "PUT /latest/api/token -> 200" "$WORK/imds.log" &&
        grep -q "GET /latest/user-data -> 200" "$WORK/imds.log" &&
        grep -q "GET /latest/meta-data/instance-id -> 200" "$WORK/imds.log" &&
        "${E[@]}" journalctl -u fleet-agent -b --no-pager | grep -q "instance $INSTANCE_ID: [0-9]* bytes of user-data from IMDS $imds_url" &&
        ok "user-data over IMDSv2 from the host's emulator ($(grep -c . "$WORK/imds.log") requests: token, user-data, instance-id)" ||
        { fail "IMDSv2 exchange"; sed 's/^/      | /' "$WORK/imds.log"; }
    master_workers() {
        local n
        n=$("${api[@]}" "https://127.0.0.1:$PORT/locust/stats/requests" |
            python3 -c 'import json,sys; print(sum(1 for w in json.load(sys.stdin).get("workers", []) if w.get("state") != "missing"))')
        [ "$n" = "$nworkers" ]
    }
    wait_until 30 master_workers && ok "the Locust master counts $nworkers workers from the node (one per vCPU)" ||
        fail "the Locust master does not see $nworkers workers"

    # What the unit put around the agent, as the running system reports it.
    local show
    show=$("${E[@]}" systemctl show fleet-agent -p User -p NoNewPrivileges -p ProtectSystem -p Restart \
        -p KillMode -p LimitNOFILE -p TasksMax -p MemoryMax -p TimeoutStopUSec -p ActiveState -p NRestarts | sort | paste -sd' ')
    [[ $show == *"ActiveState=active"* && $show == *"NRestarts=0"* && $show == *"NoNewPrivileges=yes"* &&
        $show == *"ProtectSystem=strict"* && $show == *"User=fleet-agent"* && $show == *"LimitNOFILE=65536"* &&
        $show == *"TasksMax=4096"* && $show == *"KillMode=mixed"* && $show == *"TimeoutStopUSec=30s"* ]] &&
        ok "systemctl show fleet-agent: $show" || fail "systemctl show fleet-agent: $show"
    local main uid
    main=$("${E[@]}" systemctl show -p MainPID --value fleet-agent)
    uid=$(grep '^fleet-agent:' "$RFS/etc/passwd" | cut -d: -f3)
    procs_ok() {
        local p kids
        kids=$("${E[@]}" cat "/proc/$main/task/$main/children")
        [ -n "$kids" ] || { echo "no workers under the agent"; return 1; }
        for p in $main $kids; do
            local st
            st=$("${E[@]}" cat "/proc/$p/status")
            grep -q "^Uid:[[:space:]]*${uid}[[:space:]]" <<<"$st" &&
                grep -q "^NoNewPrivs:[[:space:]]*1" <<<"$st" &&
                grep -q "^CapEff:[[:space:]]*0*$" <<<"$st" &&
                grep -q "^Seccomp:[[:space:]]*2" <<<"$st" || { echo "pid $p: $st"; return 1; }
            "${E[@]}" cat "/proc/$p/cgroup" | grep -q "fleet-agent.service" || { echo "pid $p not in the unit's cgroup"; return 1; }
        done
        for p in $kids; do
            "${E[@]}" cat "/proc/$p/limits" | grep -q "^Max open files *$NOFILE *$NOFILE " || { echo "pid $p: $("${E[@]}" grep 'open files' "/proc/$p/limits")"; return 1; }
            "${E[@]}" cat "/proc/$p/cmdline" | tr '\0' ' ' | grep -q "^/opt/fleet/venv/bin/python3 /opt/fleet/venv/bin/locust -f /var/lib/fleet-agent/bundles/" ||
                { echo "pid $p: $("${E[@]}" cat "/proc/$p/cmdline" | tr '\0' ' ')"; return 1; }
        done
    }
    check "agent and workers: user fleet-agent, NoNewPrivs, no capabilities, seccomp, in the unit's cgroup, $NOFILE files" procs_ok
    rss() { "${E[@]}" sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$1/status"; }
    local k rss_line="agent $(($(rss "$main") / 1024)) MiB, workers"
    for k in $("${E[@]}" cat "/proc/$main/task/$main/children"); do rss_line+=" $(($(rss "$k") / 1024)) MiB"; done
    note "RSS: $rss_line"
    sandbox_ok() {
        # Root entering the agent's mount namespace meets the same read-only system it does.
        local out
        out=$("${E[@]}" /usr/bin/nsenter -t "$main" -m -- /usr/bin/touch /etc/fleet/probe 2>&1) && return 1
        grep -q "Read-only file system" <<<"$out" || { echo "$out"; return 1; }
        "${E[@]}" /usr/bin/nsenter -t "$main" -m -- /usr/bin/touch /var/lib/fleet-agent/.probe || return 1
        "${E[@]}" rm -f /var/lib/fleet-agent/.probe
        [ "$("${E[@]}" stat -c '%U %a' /var/lib/fleet-agent)" = "fleet-agent 700" ] || return 1
        [ "$("${E[@]}" stat -c '%U %a' /run/fleet-agent)" = "fleet-agent 700" ]
    }
    check "ProtectSystem=strict in effect (/etc read-only to the agent); state and run dirs fleet-agent 0700" sandbox_ok
    "${E[@]}" systemctl is-active -q fleet-poweroff.path &&
        ok "fleet-poweroff.path is active, watching /run/fleet-agent/poweroff" || fail "fleet-poweroff.path is not active"
    "${E[@]}" journalctl -u fleet-agent -b --no-pager -o cat | grep -m 4 -e '^20.*fleet-agent:' | sed 's/^/      | /'

    # A clean stop (what a shutdown does): the agent stops its workers itself, within its
    # stop_grace_ms, well inside TimeoutStopSec, and exits 0.
    local restart_t0=$SECONDS
    if "${E[@]}" systemctl restart fleet-agent &&
        [ "$("${E[@]}" journalctl -u fleet-agent -b --no-pager -o cat | grep -c 'SIGTERM: stopping workers')" = 1 ] &&
        ! "${E[@]}" journalctl -u fleet-agent -b --no-pager | grep -q -e 'timed out' -e 'Killing process' &&
        "${E[@]}" journalctl -u fleet-agent -b --no-pager | grep -q 'fleet-agent.service: Deactivated successfully' &&
        [ $((SECONDS - restart_t0)) -lt 10 ] && wait_until 60 joined "$restart_t0"; then
        ok "systemctl restart fleet-agent: the agent stops its workers on SIGTERM, exits 0, and rejoins ($((SECONDS - restart_t0)) s)"
    else
        fail "systemctl restart fleet-agent"
        "${E[@]}" journalctl -u fleet-agent -b --no-pager | tail -n 15 | sed 's/^/      | /'
    fi
    main=$("${E[@]}" systemctl show -p MainPID --value fleet-agent)

    # Restart=always: a killed agent comes back; systemd removes the workers it left behind.
    local old_kids
    old_kids=$("${E[@]}" cat "/proc/$main/task/$main/children")
    "${E[@]}" systemctl kill --kill-who=main --signal=SIGKILL fleet-agent
    restarted() {
        local m
        m=$("${E[@]}" systemctl show -p MainPID --value fleet-agent)
        [ "$m" != 0 ] && [ "$m" != "$main" ] &&
            [ "$("${E[@]}" systemctl show -p NRestarts --value fleet-agent)" = 1 ] &&
            "${E[@]}" systemctl is-active -q fleet-agent
    }
    orphans_gone() {
        local p
        for p in $old_kids; do "${E[@]}" test ! -d "/proc/$p" || return 1; done
    }
    local kill_t=$SECONDS
    if wait_until 30 restarted && orphans_gone && wait_until 60 joined "$kill_t"; then
        ok "SIGKILL to the agent: its workers are killed, the unit restarts it (NRestarts=1) and it rejoins in $((SECONDS - kill_t)) s"
    else
        fail "after SIGKILL: $("${E[@]}" systemctl show fleet-agent -p ActiveState -p NRestarts -p MainPID | paste -sd' '); old workers $old_kids"
    fi

    # Max lifetime: the agent stops its workers and touches the request; the root path unit
    # powers the container off, and systemd-nspawn exits.
    local waited=$((LIFETIME_S + 60)) rc=
    for _ in $(seq 1 $((waited * 2))); do
        kill -0 $NSPAWN_PID 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 $NSPAWN_PID 2>/dev/null; then
        fail "the node did not power off within $waited s (max_lifetime_s = $LIFETIME_S)"
        "${E[@]}" journalctl -b --no-pager | tail -n 20 | sed 's/^/      | /'
        stop_pid "$NSPAWN_PID" 20
        NSPAWN_PID=
        return
    fi
    wait $NSPAWN_PID
    rc=$?
    NSPAWN_PID=
    local j
    journalctl -D "$RFS/var/log/journal" --no-pager -o short-monotonic >"$WORK/journal.txt" 2>/dev/null
    j=$(cat "$WORK/journal.txt")
    lifetime_ok() {
        grep -q "max lifetime reached: stopping workers and powering off" <<<"$j" &&
            grep -q "Starting fleet-poweroff.service" <<<"$j" &&
            grep -q "Reached target poweroff.target" <<<"$j" || return 1
        # The request came at the lifetime, not before: agent start to request, in the journal.
        python3 tests/ami/lifetime.py "$LIFETIME_S" "$WORK/journal.txt"
    }
    if [ "$rc" -eq 0 ] && out=$(lifetime_ok); then
        ok "max_lifetime_s=$LIFETIME_S powered the node off through fleet-poweroff.path ($out; nspawn exit 0)"
        grep -e "max lifetime reached" -e "Starting fleet-poweroff" -e "Finished fleet-poweroff" \
            -e "fleet-poweroff.service: Deactivated" -e "power off now" -e "Reached target poweroff.target" <<<"$j" |
            sed 's/^/      | /'
    else
        fail "power-off at max lifetime (nspawn exit $rc)"
        tail -n 30 <<<"$j" | sed 's/^/      | /'
    fi
}
boot_t=$SECONDS
if command -v systemd-nspawn >/dev/null; then
    boot
else
    skip "boot: no systemd-nspawn"
fi
note "boot phase: $((SECONDS - boot_t)) s"

stop_pid "$SERVE_PID" 15
SERVE_PID=
stop_pid "$IMDS_PID" 5
IMDS_PID=
if grep -q " $WORK" /proc/mounts; then
    fail "mounts left under $WORK"
elif pgrep -f "systemd-nspawn.*$WORK" >/dev/null; then
    fail "a container still runs on $RFS"
else
    ok "no mount left behind, no container running"
fi
[ $skipped -eq 0 ] || note "$skipped check(s) skipped"
note "total: ${SECONDS} s"
finish
