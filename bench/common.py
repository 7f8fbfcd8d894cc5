"""Shared helpers for the benchmarks: a throw-away fleet directory driven through the real CLI.

Everything runs on 127.0.0.1. Binaries come from target/release (built by the bench scripts);
FLEET_BENCH_PROFILE=debug selects target/debug (and a dev build) to try a script out quickly.
"""
import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
PROFILE = os.environ.get("FLEET_BENCH_PROFILE", "release")
REL = os.path.join(TARGET, PROFILE)
LOCUST = os.path.join(ROOT, ".venv", "bin", "locust")


def build_release():
    """Builds the binaries the scripts run: the release build, or a dev build for PROFILE=debug."""
    profile = [] if PROFILE == "debug" else ["--release"]
    subprocess.run(["cargo", "build", *profile, "--bins", "--locked"], cwd=ROOT, check=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


TICK = os.sysconf("SC_CLK_TCK")


def pinned(core):
    """A preexec_fn: the child gets the hard open-files limit and runs on `core` only."""
    def before_exec():
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        os.sched_setaffinity(0, {core})
    return before_exec


def cpu_s(pid):
    """The CPU seconds (user + system) process `pid` has used."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def rss(pid):
    """Process `pid`'s resident memory in bytes (0 when /proc does not say)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def machine():
    cpu = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(open("/proc/meminfo").readline().split()[1]) // 1024 // 1024
    return f"{os.cpu_count()} cores ({cpu}), {mem} GiB"


def pct(values, p):
    v = sorted(values)
    if not v:
        return float("nan")
    k = min(len(v) - 1, max(0, int(round(p / 100 * (len(v) - 1)))))
    return v[k]


class Fleet:
    """A fleet directory in a temp dir, `fleet serve` running on free ports."""

    def __init__(self, managed_master=False, worker_command=None, workers=1, agent_settings=None, controller=None, extra_toml=""):
        self.tmp = tempfile.TemporaryDirectory(prefix="fleet-bench-")
        self.dir = self.tmp.name
        self.port = free_port()
        self.master_port, self.web_port = free_port(), free_port()
        out = self.cli("--output", "json", "init", "--name", "bench", "--listen", f"127.0.0.1:{self.port}", "--locust", LOCUST)
        self.password = json.loads(out)["password"]
        cfg = os.path.join(self.dir, "fleet.toml")
        text = open(cfg).read()
        text = text.replace("managed = true", f"managed = {'true' if managed_master else 'false'}")
        text = text.replace("port = 5557", f"port = {self.master_port}")
        text = text.replace("http://127.0.0.1:8089/locust", f"http://127.0.0.1:{self.web_port}/locust")
        text = text.replace("workers = 1", f"workers = {workers}\nagent_bin = \"{os.path.join(REL, 'fleet-agent')}\"")
        if worker_command:
            text += "worker_command = " + json.dumps(worker_command) + "\n"
        settings = dict(agent_settings or {})
        text += "\n[local.agent_settings]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
        for k, v in (controller or {}).items():
            text = text.replace("[controller]\n", f"[controller]\n{k} = {json.dumps(v)}\n")
        text += extra_toml
        open(cfg, "w").write(text)
        self.ctx = ssl.create_default_context(cafile=os.path.join(self.dir, "certs", "ca.pem"))
        self.token = open(os.path.join(self.dir, "secrets", "operator.token")).read().strip()
        self.serve = None

    def cli(self, *args, check=True):
        r = subprocess.run([os.path.join(REL, "fleet"), "--dir", self.dir, *args], capture_output=True, text=True)
        if check and r.returncode != 0:
            raise SystemExit(f"fleet {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def start(self, preexec_fn=None, soft_nofile=None):
        """Starts `fleet serve`. `preexec_fn` runs in the child before exec (limits, affinity);
        `soft_nofile` starts it under that soft open-files limit, as a login shell would."""
        log = open(os.path.join(self.dir, "serve.log"), "a")

        def before_exec():
            if soft_nofile:
                import resource
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft_nofile, hard))
            if preexec_fn:
                preexec_fn()

        self.serve = subprocess.Popen([os.path.join(REL, "fleet"), "--dir", self.dir, "serve"], stdout=log, stderr=log,
                                      preexec_fn=before_exec)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("fleet serve did not start")

    def api(self, path):
        req = urllib.request.Request(f"https://127.0.0.1:{self.port}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, context=self.ctx, timeout=30) as r:
            return json.loads(r.read())

    def current_sha(self):
        cur = self.api("/api/spec").get("current")
        return cur and cur["sha256"]

    def wait(self, what, fn, timeout=120, every=0.02):
        t = time.time()
        while time.time() - t < timeout:
            v = fn()
            if v:
                return v
            time.sleep(every)
        raise SystemExit(f"timed out waiting for {what}")

    def write_spec(self, text):
        p = os.path.join(self.dir, "spec", "locustfile.py")
        tmp = p + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        t = time.time()
        os.rename(tmp, p)
        return t

    def close(self):
        self.cli("down", check=False)
        if self.serve:
            self.serve.send_signal(signal.SIGTERM)
            try:
                self.serve.wait(15)
            except subprocess.TimeoutExpired:
                self.serve.kill()
        self.tmp.cleanup()
