#!/usr/bin/env bash
# Checks a fleet directory's PKI and secrets as `fleet init` lays them out (certs/README.md):
# the files exist, secrets are 0600 in 0700 directories, the server certificate chains to the
# CA and matches its key, and the verify key is the public half of the signing key. Prints what
# an operator needs to know (fingerprints, names, validity) and, with --user-data FILE, checks
# that a `fleet user-data` document carries this fleet's CA, token and verify key.
#
#   certs/audit.sh [FLEET_DIR] [--user-data FILE]
#
# Exits 1 if any check fails. Needs openssl.
set -euo pipefail

dir=${FLEET_DIR:-.}
user_data=
while [ $# -gt 0 ]; do
    case $1 in
        --user-data) user_data=${2:?--user-data needs a file}; shift 2 ;;
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) dir=$1; shift ;;
    esac
done
command -v openssl >/dev/null || { echo "audit: needs openssl" >&2; exit 1; }
[ -f "$dir/fleet.toml" ] || { echo "audit: $dir has no fleet.toml (run fleet init)" >&2; exit 1; }

bad=0
ok() { echo "ok    $*"; }
no() {
    echo "FAIL  $*"
    bad=$((bad + 1))
}
mode_of() { stat -c %a "$1"; }

for d in certs secrets; do
    if [ ! -d "$dir/$d" ]; then
        no "$d/ is missing"
    elif [ "$(mode_of "$dir/$d")" = 700 ]; then
        ok "$d/ is 0700"
    else
        no "$d/ is $(mode_of "$dir/$d"), not 0700"
    fi
done
for f in certs/ca.key certs/server.key secrets/signing.pk8 secrets/agent.token \
    secrets/operator.token secrets/ui.hash; do
    if [ ! -f "$dir/$f" ]; then
        no "$f is missing (fleet init makes it)"
    elif [ "$(mode_of "$dir/$f")" = 600 ]; then
        ok "$f is 0600 (secret)"
    else
        no "$f is $(mode_of "$dir/$f"), not 0600: it is a secret"
    fi
done
for f in certs/ca.pem certs/server.pem verify.key; do
    [ -f "$dir/$f" ] && ok "$f is there (public)" || no "$f is missing"
done

ca=$dir/certs/ca.pem
server=$dir/certs/server.pem
if [ -f "$ca" ] && [ -f "$server" ]; then
    if openssl verify -CAfile "$ca" "$server" >/dev/null 2>&1; then
        ok "server.pem is signed by ca.pem"
    else
        no "server.pem does not verify against ca.pem"
    fi
    pub() { openssl pkey -pubout -outform DER 2>/dev/null | sha256sum | cut -d' ' -f1; }
    if [ -f "$dir/certs/server.key" ] &&
        [ "$(openssl x509 -in "$server" -pubkey -noout | openssl pkey -pubin -pubout -outform DER | sha256sum | cut -d' ' -f1)" = "$(pub <"$dir/certs/server.key")" ]; then
        ok "server.key matches server.pem"
    else
        no "server.key does not match server.pem"
    fi
    echo "      CA        $(openssl x509 -in "$ca" -noout -subject -enddate | tr '\n' ' ')"
    echo "      CA sha256 $(openssl x509 -in "$ca" -noout -fingerprint -sha256 | cut -d= -f2)"
    echo "      server    $(openssl x509 -in "$server" -noout -ext subjectAltName 2>/dev/null | tail -n +2 | tr -d ' ')"
fi
if [ -f "$dir/secrets/signing.pk8" ] && [ -f "$dir/verify.key" ]; then
    # ring writes a PKCS#8 v2 document (83 bytes) that ends with the raw 32-byte public key,
    # the value verify.key holds in base64. (OpenSSL 3.0 cannot read v2 documents.)
    derived=
    if [ "$(stat -c %s "$dir/secrets/signing.pk8")" = 83 ]; then
        derived=$(tail -c 32 "$dir/secrets/signing.pk8" | base64)
    fi
    if [ -n "$derived" ] && [ "$derived" = "$(tr -d '[:space:]' <"$dir/verify.key")" ]; then
        ok "verify.key is the public half of secrets/signing.pk8"
    else
        no "verify.key does not match secrets/signing.pk8"
    fi
fi

if [ -n "$user_data" ]; then
    python3 - "$dir" "$user_data" <<'EOF' || bad=$((bad + 1))
import sys, tomllib
d, path = sys.argv[1:]
ud = tomllib.load(open(path, "rb"))
want = {
    "ca_pem": open(d + "/certs/ca.pem").read().strip(),
    "token": open(d + "/secrets/agent.token").read().strip(),
    "verify_key": open(d + "/verify.key").read().strip(),
}
failed = 0
for k, v in want.items():
    if str(ud.get(k, "")).strip() == v:
        print("ok    user-data %s is this fleet's" % k)
    else:
        print("FAIL  user-data %s is not this fleet's (rotated? run fleet user-data again)" % k)
        failed = 1
for k in ("ca_file", "token_file"):
    if k in ud:
        print("FAIL  user-data sets %s: the file would have to be in the image" % k)
        failed = 1
sys.exit(failed)
EOF
fi

echo "audit: $dir: $bad problem(s)"
[ $bad -eq 0 ]
