#!/usr/bin/env bash
# Self-test of tests/support: moto_server + ec2_emulator.py + boot_harness.py, loopback only.
# Usage: tests/support/selftest.sh [-k]   (-k keeps the temp dir with all logs)
# Env: PYTHON (default <repo>/.venv/bin/python), MOTO_SERVER (default <repo>/.venv/bin/moto_server)
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
MOTO_SERVER=${MOTO_SERVER:-$ROOT/.venv/bin/moto_server}
KEEP=0
[ "${1:-}" = "-k" ] && KEEP=1
TMP=$(mktemp -d /tmp/fleet-support-selftest.XXXXXX)
PIDS=()
RESULTS=$TMP/results.txt
: > "$RESULTS"

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  if [ "$KEEP" = 1 ]; then echo "selftest: logs kept in $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

ok()   { echo "ok - $*" | tee -a "$RESULTS"; }
fail() { echo "FAIL - $*" | tee -a "$RESULTS"; }

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# first stdout line of a starting process: wait_line FILE
wait_line() {
  for _ in $(seq 1 200); do
    if [ -s "$1" ]; then head -n1 "$1"; return 0; fi
    sleep 0.05
  done
  return 1
}

# --- moto -------------------------------------------------------------------------------------
MOTO_PORT=$(free_port)
MOTO=http://127.0.0.1:$MOTO_PORT
"$MOTO_SERVER" -H 127.0.0.1 -p "$MOTO_PORT" > "$TMP/moto.log" 2>&1 &
PIDS+=($!)
"$PY" - "$MOTO" <<'EOF' || { echo "selftest: moto_server did not start" >&2; cat "$TMP/moto.log" >&2; exit 1; }
import sys, time, urllib.request
for _ in range(300):
    try:
        urllib.request.urlopen(sys.argv[1] + "/moto-api/", timeout=1); sys.exit(0)
    except Exception as e:
        if hasattr(e, "code"): sys.exit(0)
        time.sleep(0.05)
sys.exit(1)
EOF

# --- emulator ---------------------------------------------------------------------------------
"$PY" "$HERE/ec2_emulator.py" --listen 127.0.0.1:0 --upstream "$MOTO" --time-scale 1 \
  > "$TMP/emulator.out" 2> "$TMP/emulator.err" &
PIDS+=($!)
LINE=$(wait_line "$TMP/emulator.out") || { echo "selftest: emulator did not start" >&2; cat "$TMP/emulator.err" >&2; exit 1; }
case "$LINE" in "listening on http://127.0.0.1:"*) ok "emulator prints its URL first ($LINE)";; *) fail "emulator first line: $LINE";; esac
EMU=${LINE#listening on }

# --- boot harness with a fake agent -----------------------------------------------------------
AGENT=$TMP/fake-agent
printf '#!/bin/sh\nexec "%s" "%s" "$@"\n' "$PY" "$HERE/fake_agent.py" > "$AGENT"
chmod +x "$AGENT"
"$PY" "$HERE/boot_harness.py" --moto "$MOTO" --fleet selftest --agent "$AGENT" \
  --workdir "$TMP/boot" --poll 0.2 --agent-setting 'controller = "https://127.0.0.1:9"' \
  > "$TMP/harness.out" 2> "$TMP/harness.err" &
HARNESS_PID=$!
PIDS+=($HARNESS_PID)
LINE=$(wait_line "$TMP/harness.out") || { echo "selftest: boot harness did not start" >&2; cat "$TMP/harness.err" >&2; exit 1; }
case "$LINE" in "imds on http://127.0.0.1:"*) ok "harness prints its IMDS URL first ($LINE)";; *) fail "harness first line: $LINE";; esac
IMDS=${LINE#imds on }

# --- API checks (python + boto3) ----------------------------------------------------------------
"$PY" - "$EMU" "$MOTO" "$IMDS" "$TMP/boot" <<'EOF' | tee -a "$RESULTS"
import json, os, sys, time, traceback, urllib.request, urllib.error
import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

EMU, MOTO, IMDS, BOOT = sys.argv[1:5]
creds = dict(region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
noretry = Config(retries={"total_max_attempts": 1})
ec2 = boto3.client("ec2", endpoint_url=EMU, config=noretry, **creds)      # through the emulator
raw = boto3.client("ec2", endpoint_url=MOTO, config=noretry, **creds)     # moto directly
AMI = "ami-12c6146b"


def ctl(path, body=None):
    req = urllib.request.Request(EMU + path, method="GET" if body is None else "POST",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=30))


def moto_count(**filters):
    f = [{"Name": k, "Values": v} for k, v in filters.items()]
    pages = raw.get_paginator("describe_instances").paginate(Filters=f)
    return sum(len(r["Instances"]) for p in pages for r in p["Reservations"])


def code_of(fn):
    try:
        fn()
        return "ok", 200
    except ClientError as e:
        return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]


def check(name, cond, detail=""):
    print(("ok - %s" if cond else "FAIL - %s") % name + ("" if cond else ": %s" % (detail,)),
          flush=True)
    return cond


def run(**kw):
    kw.setdefault("ImageId", AMI)
    return ec2.run_instances(**kw)


def section(name, fn):
    try:
        fn()
    except Exception:
        check(name + " (crashed)", False, traceback.format_exc().replace("\n", " | "))


def a_throttling():
    ctl("/_emulator/reset", {})
    check("health", ctl("/_emulator/health") == {"ok": True})
    # 7 calls in quick succession: each one goes out right after the previous one was sent
    # (moto's own latency, which varies a lot on a loaded machine, does not spread them out)
    import threading
    clients = [boto3.client("ec2", endpoint_url=EMU, config=noretry, **creds) for _ in range(7)]
    sent = [threading.Event() for _ in range(7)]
    res = [None] * 7

    def one(i):
        if i:
            sent[i - 1].wait(30)
            time.sleep(0.005)
        clients[i].meta.events.register("before-send.ec2.RunInstances", lambda **kw: sent[i].set())
        res[i] = code_of(lambda: clients[i].run_instances(ImageId=AMI, MinCount=1, MaxCount=1))
        sent[i].set()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check("(a) 5 RunInstances pass at burst 5", [r[0] for r in res[:5]] == ["ok"] * 5, res)
    check("(a) 6th and 7th RunInstances throttled with 503 RequestLimitExceeded",
          res[5:] == [("RequestLimitExceeded", 503)] * 2, res)
    st = ctl("/_emulator/stats")
    check("(a) stats count 7 calls, 2 throttled, 5 launched",
          st["calls"].get("RunInstances") == 7 and st["throttled"].get("RunInstances") == 2
          and st["instances_launched"] == 5, {k: v for k, v in st.items() if k != "log"})
    check("(a) stats log outcomes", sorted(e[2] for e in st["log"] if e[1] == "RunInstances")
          == ["ok"] * 5 + ["throttled"] * 2, st["log"])
    # refill is scaled by time_scale: at 100x, 2/s becomes 200/s
    ctl("/_emulator/config", {"time_scale": 100})
    time.sleep(0.05)
    check("(a) refill scaled by time_scale", code_of(lambda: run(MinCount=1, MaxCount=1))[0] == "ok")
    # DescribeInstances without filter/pagination has its own bucket
    ctl("/_emulator/config", {"time_scale": 1, "request_buckets": {
        "DescribeInstancesUnfiltered": {"tokens": 0, "refill": 0}}})
    check("(a) unfiltered DescribeInstances uses its own bucket",
          code_of(lambda: ec2.describe_instances())[0] == "RequestLimitExceeded"
          and code_of(lambda: ec2.describe_instances(MaxResults=5))[0] == "ok")
    # resource bucket: fewer instance tokens than MinCount -> throttled
    ctl("/_emulator/config", {"request_buckets": {"RunInstances": {"tokens": 5}},
                              "resource_buckets": {"RunInstances": {"tokens": 2, "refill": 0}}})
    check("(a) instance bucket below MinCount throttles",
          code_of(lambda: run(MinCount=3, MaxCount=3))[0] == "RequestLimitExceeded")
    r = run(MinCount=1, MaxCount=3)
    check("(a) instance bucket caps MaxCount (partial)", len(r["Instances"]) == 2, len(r["Instances"]))


def setup_subnets():
    ctl("/_emulator/reset", {})
    # plenty of request tokens for the rest of the API checks
    ctl("/_emulator/config", {"request_buckets": {"RunInstances": {"burst": 1000, "refill": 1000, "tokens": 1000}}})
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    return [ec2.create_subnet(VpcId=vpc, CidrBlock="10.20.%d.0/24" % i)["Subnet"]
            for i in (1, 2, 3)]


def b_capacity():
    subnets = setup_subnets()
    a = subnets[0]["SubnetId"]
    ctl("/_emulator/config", {"capacity": {a: {"*": 3}}})
    r = run(MinCount=1, MaxCount=5, SubnetId=a, InstanceType="t3.micro")
    check("(b) capacity 3, MinCount=1 MaxCount=5 launches 3 (partial)", len(r["Instances"]) == 3,
          len(r["Instances"]))
    check("(b) moto holds exactly 3 instances in subnet-a", moto_count(**{"subnet-id": [a]}) == 3)
    code, status = code_of(lambda: run(MinCount=1, MaxCount=5, SubnetId=a, InstanceType="t3.micro"))
    check("(b) second call gets 500 InsufficientInstanceCapacity",
          (code, status) == ("InsufficientInstanceCapacity", 500), (code, status))
    try:
        run(MinCount=1, MaxCount=1, SubnetId=a, InstanceType="t3.micro")
    except ClientError as e:
        msg = e.response["Error"]["Message"]
        check("(b) message names the type and the subnet's AZ",
              "t3.micro" in msg and subnets[0]["AvailabilityZone"] in msg, msg)
    b = subnets[1]["SubnetId"]
    ctl("/_emulator/config", {"insufficient": [[b, "t3.*"]]})
    check("(b) insufficient list fails a pool always",
          code_of(lambda: run(MinCount=1, MaxCount=1, SubnetId=b, InstanceType="t3.large"))[0]
          == "InsufficientInstanceCapacity"
          and code_of(lambda: run(MinCount=1, MaxCount=1, SubnetId=b, InstanceType="m5.large"))[0] == "ok")
    st = ctl("/_emulator/stats")
    check("(b) stats: 1 partial fulfilment, >= 3 capacity errors",
          st["partial_fulfilments"] == 1 and st["capacity_errors"] >= 3,
          {k: v for k, v in st.items() if k != "log"})
    # CreateFleet instant across pools: first pool always fails, second has 2, third the rest
    c = subnets[2]["SubnetId"]
    lt = ec2.create_launch_template(LaunchTemplateName="selftest", LaunchTemplateData={
        "ImageId": AMI, "InstanceType": "t3.micro"})["LaunchTemplate"]["LaunchTemplateId"]
    ctl("/_emulator/config", {"capacity": {a: {"*": 2}}, "insufficient": [[b, "*"]]})
    before = moto_count()
    r = ec2.create_fleet(Type="instant", TargetCapacitySpecification={
        "TotalTargetCapacity": 5, "DefaultTargetCapacityType": "on-demand"},
        LaunchTemplateConfigs=[{"LaunchTemplateSpecification": {"LaunchTemplateId": lt, "Version": "$Latest"},
                                "Overrides": [{"SubnetId": b}, {"SubnetId": a}, {"SubnetId": c}]}])
    per = {}
    for i in r["Instances"]:
        s = i["LaunchTemplateAndOverrides"]["Overrides"]["SubnetId"]
        per[s] = per.get(s, 0) + len(i["InstanceIds"])
    check("(b) CreateFleet instant spreads over pools with capacity",
          per == {a: 2, c: 3} and moto_count() - before == 5, per)
    check("(b) CreateFleet reports the failing pool in Errors",
          [e["ErrorCode"] for e in r.get("Errors", [])] == ["InsufficientInstanceCapacity"], r.get("Errors"))


def c_idempotency():
    setup_subnets()
    before = moto_count()
    r1 = run(MinCount=2, MaxCount=2, ClientToken="selftest-token-1")
    r2 = run(MinCount=2, MaxCount=2, ClientToken="selftest-token-1")
    ids1 = sorted(i["InstanceId"] for i in r1["Instances"])
    ids2 = sorted(i["InstanceId"] for i in r2["Instances"])
    check("(c) same ClientToken twice returns the same instances", ids1 == ids2, (ids1, ids2))
    check("(c) same ClientToken twice launches once", moto_count() - before == 2, moto_count() - before)
    check("(c) reused token with other parameters -> IdempotentParameterMismatch",
          code_of(lambda: run(MinCount=3, MaxCount=3, ClientToken="selftest-token-1"))[0]
          == "IdempotentParameterMismatch")
    st = ctl("/_emulator/stats")
    check("(c) stats: 1 idempotent replay, 2 launched",
          st["idempotent_replays"] == 1 and st["instances_launched"] == 2,
          {k: v for k, v in st.items() if k != "log"})


def d_lost():
    setup_subnets()
    ctl("/_emulator/config", {"lose_responses": 1})
    before = moto_count()
    code, status = code_of(lambda: run(MinCount=2, MaxCount=2, ClientToken="selftest-lost-1"))
    check("(d) lost response answers 500 InternalError", (code, status) == ("InternalError", 500),
          (code, status))
    check("(d) ... but moto launched", moto_count() - before == 2)
    r = run(MinCount=2, MaxCount=2, ClientToken="selftest-lost-1")
    check("(d) retry with the same token gets the instances", len(r["Instances"]) == 2)
    check("(d) total launched unchanged by the retry", moto_count() - before == 2,
          moto_count() - before)
    # the SDK's own retries reuse the token: with retries on, the caller never sees the loss
    ctl("/_emulator/config", {"lose_responses": 1})
    ec2r = boto3.client("ec2", endpoint_url=EMU, config=Config(retries={"mode": "standard", "max_attempts": 3}), **creds)
    r = ec2r.run_instances(ImageId=AMI, MinCount=1, MaxCount=1)  # botocore fills ClientToken
    check("(d) SDK retry after a lost response launches exactly once",
          len(r["Instances"]) == 1 and moto_count() - before == 3, moto_count() - before)
    st = ctl("/_emulator/stats")
    check("(d) stats: 2 lost responses, 2 replays",
          st["lost_responses"] == 2 and st["idempotent_replays"] == 2,
          {k: v for k, v in st.items() if k != "log"})
    check("(d) log has outcome lost then replay",
          [e[2] for e in st["log"] if e[1] == "RunInstances"] == ["lost", "replay", "lost", "replay"],
          st["log"])


def e_reset():
    ctl("/_emulator/config", {"time_scale": 7, "lose_responses": 3, "capacity": {"*": {"*": 1}},
                              "resource_buckets": {"RunInstances": {"tokens": 0}}})
    cfg = ctl("/_emulator/reset", {})
    st = ctl("/_emulator/stats")
    check("(e) reset restores defaults",
          cfg["time_scale"] == 1 and cfg["lose_responses"] == 0 and cfg["capacity"] is None
          and cfg["insufficient"] == []
          and cfg["request_buckets"]["RunInstances"] == {"burst": 5, "refill": 2, "tokens": 5}
          and cfg["resource_buckets"]["RunInstances"]["tokens"] == 1000, cfg)
    check("(e) reset zeroes stats",
          st["calls"] == {} and st["log"] == [] and st["instances_launched"] == 0, st)
    check("(e) reset clears moto", moto_count() == 0, moto_count())
    r1 = run(MinCount=1, MaxCount=1, ClientToken="selftest-token-1")
    check("(e) reset clears the token cache", ctl("/_emulator/stats")["idempotent_replays"] == 0
          and len(r1["Instances"]) == 1)
    ctl("/_emulator/reset", {})


def imds(method, path, headers=None):
    req = urllib.request.Request(IMDS + path, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(cond, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    return cond()


def f_harness():
    ctl("/_emulator/reset", {})
    tags = [{"ResourceType": "instance", "Tags": [{"Key": "fleet", "Value": "selftest"}]}]
    r = run(MinCount=3, MaxCount=3, UserData="controller = \"https://10.0.0.1:8443\"\n# node data\n",
            TagSpecifications=tags)
    run(MinCount=1, MaxCount=1, UserData="not ours")  # untagged: must not boot
    ids = sorted(i["InstanceId"] for i in r["Instances"])

    def identities():
        out = {}
        for i in ids:
            p = os.path.join(BOOT, i, "state", "identity.json")
            if os.path.exists(p):
                out[i] = json.load(open(p))
        return out if len(out) == 3 else None

    got = wait_for(identities) or {}
    check("(f) 3 fake agents booted and wrote their identity", sorted(got) == ids, sorted(got))
    check("(f) each agent read its own instance id over IMDSv2",
          all(got[i]["instance_id"] == i for i in got), got)
    check("(f) each agent read the user-data",
          all(got[i]["user_data"] == "controller = \"https://10.0.0.1:8443\"\n# node data\n" for i in got), got)
    check("(f) only fleet-tagged instances boot",
          sorted(d for d in os.listdir(BOOT) if d.startswith("i-")) == ids, os.listdir(BOOT))
    toml = open(os.path.join(BOOT, ids[0], "agent.toml")).read()
    check("(f) agent.toml has state_dir and the --agent-setting line",
          toml == 'state_dir = "%s"\ncontroller = "https://127.0.0.1:9"\n' % os.path.join(BOOT, ids[0], "state"), toml)
    hj = json.load(open(os.path.join(BOOT, "harness.json")))
    check("(f) harness.json lists the running agents with pids",
          sorted(hj["instances"]) == ids and all(hj["instances"][i]["pid"] and hj["instances"][i]["state"] == "running"
                                                 for i in ids) and hj["imds"] == IMDS, hj)
    # IMDS rules
    i0 = ids[0]
    check("(f) IMDS token PUT without TTL -> 400", imds("PUT", "/%s/latest/api/token" % i0)[0] == 400)
    st, tok = imds("PUT", "/%s/latest/api/token" % i0, {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    tok = tok.decode()
    check("(f) IMDS GET without token -> 401", imds("GET", "/%s/latest/meta-data/instance-id" % i0)[0] == 401)
    check("(f) IMDS token of another instance -> 401",
          imds("GET", "/%s/latest/meta-data/instance-id" % ids[1], {"X-aws-ec2-metadata-token": tok})[0] == 401)
    h = {"X-aws-ec2-metadata-token": tok}
    inst = raw.describe_instances(InstanceIds=[i0])["Reservations"][0]["Instances"][0]
    check("(f) IMDS meta-data items",
          imds("GET", "/%s/latest/meta-data/instance-id" % i0, h) == (200, i0.encode())
          and imds("GET", "/%s/latest/meta-data/instance-type" % i0, h) == (200, inst["InstanceType"].encode())
          and imds("GET", "/%s/latest/meta-data/placement/availability-zone" % i0, h)
          == (200, inst["Placement"]["AvailabilityZone"].encode())
          and imds("GET", "/%s/latest/meta-data/local-ipv4" % i0, h) == (200, inst["PrivateIpAddress"].encode())
          and imds("GET", "/%s/latest/meta-data/ami-id" % i0, h)[0] == 404)
    check("(f) IMDS unknown instance -> 404",
          imds("PUT", "/i-00000000000000000/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})[0] == 404)
    # terminate one: its agent gets SIGTERM, the others keep running
    ec2.terminate_instances(InstanceIds=[i0])
    sig = wait_for(lambda: os.path.exists(os.path.join(BOOT, i0, "state", "sigterm")), 15)
    check("(f) terminating an instance SIGTERMs its agent", sig)

    def agent_state():
        hj = json.load(open(os.path.join(BOOT, "harness.json")))
        return hj["instances"][i0]["agent"] == "exited" and hj
    hj = wait_for(agent_state, 15) or json.load(open(os.path.join(BOOT, "harness.json")))
    check("(f) harness.json shows it terminated and exited",
          hj["instances"][i0]["state"] == "terminated" and hj["instances"][i0]["agent"] == "exited"
          and all(hj["instances"][i]["agent"] == "running" for i in ids[1:]), hj)
    check("(f) other agents untouched",
          not any(os.path.exists(os.path.join(BOOT, i, "state", "sigterm")) for i in ids[1:]))


for name, fn in [("(a)", a_throttling), ("(b)", b_capacity), ("(c)", c_idempotency),
                 ("(d)", d_lost), ("(e)", e_reset), ("(f)", f_harness)]:
    section(name, fn)
EOF
[ "${PIPESTATUS[0]}" = 0 ] || fail "API check script exited non-zero"

# --- harness shutdown: SIGTERM -> agents SIGTERMed, exit 0 -------------------------------------
kill -TERM "$HARNESS_PID"
wait "$HARNESS_PID"; RC=$?
[ "$RC" = 0 ] && ok "harness exits 0 on SIGTERM" || fail "harness exit code $RC on SIGTERM"
N_TERM=$(ls "$TMP"/boot/i-*/state/sigterm 2>/dev/null | wc -l)
[ "$N_TERM" = 3 ] && ok "harness shutdown SIGTERMed every agent (3 sigterm files)" || fail "sigterm files after shutdown: $N_TERM"
if "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if all(v["agent"] in ("exited","killed") for v in d["instances"].values()) else 1)' "$TMP/boot/harness.json"; then
  ok "harness.json final state: no agent left running"
else
  fail "harness.json final state: $(cat "$TMP/boot/harness.json")"
fi

PASSED=$(grep -c '^ok - ' "$RESULTS")
FAILED=$(grep -c '^FAIL - ' "$RESULTS")
if [ "$FAILED" != 0 ]; then
  echo "--- emulator stderr (tail)"; tail -n 30 "$TMP/emulator.err"
  echo "--- harness stderr (tail)"; tail -n 30 "$TMP/harness.err"
fi
echo "selftest: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ] && [ "$PASSED" -gt 0 ]
