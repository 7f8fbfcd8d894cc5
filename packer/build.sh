#!/usr/bin/env bash
# Builds the fleet node AMI and points fleet.toml at it (docs/ami.md).
#
#   packer/build.sh [--arch x86_64|arm64] [--region R] [--fleet-dir DIR] [--agent-binary PATH]
#                   [--locust-version V] [--validate] [-- PACKER_ARGS...]
#
# 1. builds fleet-agent in release mode for the architecture (cargo; arm64 cross-compiles to
#    aarch64-unknown-linux-gnu), unless --agent-binary names one already built;
# 2. runs Packer on packer/ (Packer >= 1.7: `packer init` first) or, with Packer 1.6, on
#    packer/fleet-agent.pkr.hcl alone (docs/ami.md, "Packer versions");
# 3. writes the AMI id from Packer's manifest into DIR/fleet.toml as `[ec2] ami`.
# --validate stops after `packer validate` (no AWS call, no build). PACKER_ARGS go to Packer,
# e.g. -- -var ami_regions='["eu-west-1"]' -var subnet_id=subnet-0abc.
# AWS credentials come from the standard chain (AWS_PROFILE, environment, SSO, instance role).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PACKER_DIR=$ROOT/packer

die() {
    echo "build.sh: $*" >&2
    exit 1
}
say() { echo "build.sh: $*"; }

arch=x86_64
region=
fleet_dir=${FLEET_DIR:-.}
agent_binary=
locust_version=$(sed -n 's/^locust==\([^[:space:]]*\).*/\1/p' "$ROOT/requirements.txt")
validate=0
packer_args=()
while [ $# -gt 0 ]; do
    case $1 in
        --arch) arch=${2:?--arch needs a value}; shift 2 ;;
        --region) region=${2:?--region needs a value}; shift 2 ;;
        --fleet-dir) fleet_dir=${2:?--fleet-dir needs a value}; shift 2 ;;
        --agent-binary) agent_binary=${2:?--agent-binary needs a value}; shift 2 ;;
        --locust-version) locust_version=${2:?--locust-version needs a value}; shift 2 ;;
        --validate) validate=1; shift ;;
        --) shift; packer_args=("$@"); break ;;
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
case $arch in
    x86_64) rust_target=x86_64-unknown-linux-gnu elf_machine=3e00 ;;
    arm64) rust_target=aarch64-unknown-linux-gnu elf_machine=b700 ;;
    *) die "--arch must be x86_64 or arm64, not '$arch'" ;;
esac
[ -n "$locust_version" ] || die "no locust version in requirements.txt; pass --locust-version"
command -v packer >/dev/null || die "packer is not installed (Debian: apt-get install packer; or https://developer.hashicorp.com/packer/install)"

fleet_toml=$fleet_dir/fleet.toml
if [ $validate -eq 0 ]; then
    [ -f "$fleet_toml" ] || die "no $fleet_toml: run fleet init first or pass --fleet-dir"
    if [ -z "$region" ]; then
        region=$(python3 -c 'import sys,tomllib; print(tomllib.load(open(sys.argv[1],"rb")).get("ec2",{}).get("region",""))' "$fleet_toml" 2>/dev/null || true)
    fi
fi
region=${region:-${AWS_REGION:-${AWS_DEFAULT_REGION:-}}}

# 1. The agent.
if [ -z "$agent_binary" ]; then
    target_dir=${CARGO_TARGET_DIR:-$ROOT/target}
    case $target_dir in /*) ;; *) target_dir=$ROOT/$target_dir ;; esac
    if [ $validate -eq 1 ]; then
        # Validation only needs a file there; do not spend a release build on it.
        agent_binary=$(mktemp)
        trap 'rm -f "$agent_binary"' EXIT
    elif [ "$(uname -m)" = "$(echo $rust_target | cut -d- -f1)" ]; then
        say "cargo build --release -p fleet-agent"
        (cd "$ROOT" && cargo build --release --locked -p fleet-agent)
        agent_binary=$target_dir/release/fleet-agent
    else
        linker_var=CARGO_TARGET_$(echo $rust_target | tr 'a-z-' 'A-Z_')_LINKER
        if [ -z "${!linker_var:-}" ]; then
            command -v aarch64-linux-gnu-gcc >/dev/null ||
                die "cross-compiling to $rust_target needs a linker: apt-get install gcc-aarch64-linux-gnu && rustup target add $rust_target (or build on an arm64 machine and pass --agent-binary)"
            export "$linker_var=aarch64-linux-gnu-gcc"
        fi
        say "cargo build --release -p fleet-agent --target $rust_target"
        (cd "$ROOT" && cargo build --release --locked -p fleet-agent --target "$rust_target")
        agent_binary=$target_dir/$rust_target/release/fleet-agent
    fi
fi
[ -f "$agent_binary" ] || die "no agent binary at $agent_binary"
if [ -s "$agent_binary" ]; then
    machine=$(od -An -tx1 -j18 -N2 "$agent_binary" | tr -d ' \n')
    [ "$machine" = "$elf_machine" ] || die "$agent_binary is not an $arch ELF binary"
fi

# 2. Packer. 1.6 reads the template file alone; newer ones the directory, plugins included.
version=$(packer version | sed -n 's/^Packer v\([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p' | head -1)
read -r major minor <<<"${version:-0 0}"
vars=(-var "arch=$arch" -var "agent_binary=$agent_binary" -var "locust_version=$locust_version")
[ -z "$region" ] || vars+=(-var "region=$region")
if [ "$major" -eq 1 ] && [ "$minor" -lt 7 ]; then
    template=$PACKER_DIR/fleet-agent.pkr.hcl
else
    template=$PACKER_DIR
    # Installs the amazon plugin named in plugins.pkr.hcl (once; needs the network).
    packer init "$PACKER_DIR"
fi

if [ $validate -eq 1 ]; then
    packer validate "${vars[@]}" "${packer_args[@]}" "$template"
    say "valid: $template ($(packer version | head -1))"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say "packer build $template (arch $arch, region ${region:-us-east-1 (template default)}, locust $locust_version)"
packer build "${vars[@]}" -var "manifest=$work/manifest.json" "${packer_args[@]}" "$template"

# 3. fleet.toml.
python3 "$PACKER_DIR/set-ami.py" "$work/manifest.json" "$fleet_toml" ${region:+--region "$region"}
cp "$work/manifest.json" "$fleet_dir/packer-manifest.json"
say "done; the manifest is in $fleet_dir/packer-manifest.json"
