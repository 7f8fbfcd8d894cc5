//! The EC2 test setup (docs/ec2.md, "How it is tested"): `moto_server` on loopback, the project's
//! throttling emulator in front of it (tests/support/ec2_emulator.py), and the boot harness
//! that starts a `fleet-agent` with an IMDS emulator for every instance moto reports
//! (tests/support/boot_harness.py). The CLI under test reaches AWS only through the emulator.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{bin, free_port, workspace_root, Fleet};

pub const REGION: &str = "us-east-1";

fn venv(name: &str) -> PathBuf {
    let p = workspace_root().join(".venv/bin").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run ./run.sh setup first",
        p.display()
    );
    p
}

fn support(name: &str) -> PathBuf {
    workspace_root().join("tests/support").join(name)
}

fn kill(child: &mut Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(15) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// One HTTP/1.1 request over a fresh plain TCP connection; returns status and body.
pub fn http(method: &str, url: &str, body: Option<&str>) -> (u16, String) {
    let rest = url.strip_prefix("http://").expect("http url");
    let (hostport, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut s = std::net::TcpStream::connect(hostport).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

pub struct Moto {
    child: Child,
    pub url: String,
}

impl Moto {
    pub fn start() -> Moto {
        let port = free_port();
        let child = Command::new(venv("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server");
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "moto_server did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Runs a boto3 snippet against moto (directly); `ec2` and `asg` are clients. Returns stdout.
    pub fn boto(&self, code: &str) -> String {
        let script = format!(
            "import boto3, json, sys\nkw = dict(endpoint_url={url:?}, region_name={REGION:?}, aws_access_key_id='testing', aws_secret_access_key='testing')\nec2 = boto3.client('ec2', **kw)\nasg = boto3.client('autoscaling', **kw)\n{code}\n",
            url = self.url
        );
        let out = Command::new(venv("python"))
            .arg("-c")
            .arg(&script)
            .output()
            .expect("python");
        assert!(
            out.status.success(),
            "boto3 snippet failed: {}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A VPC with one subnet per AZ in `azs`; returns the subnet ids in order and an AMI id.
    pub fn network(&self, azs: &[&str]) -> (Vec<String>, String) {
        let out = self.boto(&format!(
            "vpc = ec2.create_vpc(CidrBlock='10.0.0.0/16')['Vpc']['VpcId']\nsubnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f'10.0.{{i * 16}}.0/20', AvailabilityZone=az)['Subnet']['SubnetId'] for i, az in enumerate({azs:?})]\nami = ec2.describe_images(Owners=['amazon'])['Images'][0]['ImageId']\nprint(json.dumps([subnets, ami]))"
        ));
        serde_json::from_str(out.trim()).expect("network json")
    }

    /// Instances tagged with the fleet's name, by state.
    pub fn instances(&self, fleet: &str) -> Vec<(String, String)> {
        let out = self.boto(&format!(
            "r = []\nfor page in ec2.get_paginator('describe_instances').paginate(Filters=[{{'Name': 'tag:fleet', 'Values': [{fleet:?}]}}]):\n    for res in page['Reservations']:\n        for i in res['Instances']:\n            r.append([i['InstanceId'], i['State']['Name']])\nprint(json.dumps(r))"
        ));
        serde_json::from_str(out.trim()).expect("instances json")
    }

    /// An instance made behind fleet's back, with these tags, in `subnet`; stopped if asked.
    pub fn run_tagged(&self, subnet: &str, ami: &str, tags: &[(&str, &str)], stop: bool) -> String {
        let tags: Vec<serde_json::Value> = tags
            .iter()
            .map(|(k, v)| serde_json::json!({"Key": k, "Value": v}))
            .collect();
        let tags = serde_json::to_string(&tags).unwrap();
        let out = self.boto(&format!(
            "i = ec2.run_instances(ImageId={ami:?}, MinCount=1, MaxCount=1, SubnetId={subnet:?}, TagSpecifications=[{{'ResourceType': 'instance', 'Tags': json.loads({tags:?})}}])['Instances'][0]['InstanceId']\nif {stop}:\n    ec2.stop_instances(InstanceIds=[i])\nprint(i)",
            stop = if stop { "True" } else { "False" },
        ));
        out.trim().to_string()
    }

    /// The state of each of these instances, in order.
    pub fn states(&self, ids: &[String]) -> Vec<String> {
        let out = self.boto(&format!(
            "ids = {ids:?}\nr = {{}}\nfor res in ec2.describe_instances(InstanceIds=ids)['Reservations']:\n    for i in res['Instances']:\n        r[i['InstanceId']] = i['State']['Name']\nprint(json.dumps([r[i] for i in ids]))"
        ));
        serde_json::from_str(out.trim()).expect("states json")
    }

    pub fn live_instances(&self, fleet: &str) -> Vec<String> {
        self.instances(fleet)
            .into_iter()
            .filter(|(_, s)| s == "pending" || s == "running")
            .map(|(id, _)| id)
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// Reads the first stdout line of a support tool (its address) and keeps draining the rest.
fn first_line(child: &mut Child, prefix: &str) -> String {
    let out = child.stdout.take().expect("stdout");
    let mut r = BufReader::new(out);
    let mut line = String::new();
    r.read_line(&mut line).expect("first line");
    std::thread::spawn(move || {
        let mut sink = String::new();
        while r.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    line.trim()
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .trim()
        .to_string()
}

pub struct Emulator {
    child: Child,
    pub url: String,
}

impl Emulator {
    pub fn start(moto: &Moto, time_scale: f64, log: &Path) -> Emulator {
        let log = std::fs::File::create(log).unwrap();
        let mut child = Command::new(venv("python"))
            .arg(support("ec2_emulator.py"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                &moto.url,
                "--time-scale",
                &time_scale.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("ec2_emulator.py");
        let url = first_line(&mut child, "listening on");
        Emulator { child, url }
    }

    pub fn config(&self, json: serde_json::Value) -> serde_json::Value {
        let (s, b) = http(
            "POST",
            &format!("{}/_emulator/config", self.url),
            Some(&json.to_string()),
        );
        assert_eq!(s, 200, "emulator config: {b}");
        serde_json::from_str(&b).unwrap_or_default()
    }

    pub fn stats(&self) -> serde_json::Value {
        let (s, b) = http("GET", &format!("{}/_emulator/stats", self.url), None);
        assert_eq!(s, 200, "emulator stats: {b}");
        serde_json::from_str(&b).unwrap()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

pub struct BootHarness {
    child: Child,
    pub dir: PathBuf,
}

impl BootHarness {
    /// Boots an agent for every instance of `fleet` that moto reports, with a stub worker.
    pub fn start(moto: &Moto, fleet: &str, dir: &Path) -> BootHarness {
        std::fs::create_dir_all(dir).unwrap();
        let log = std::fs::File::create(dir.join("harness.log")).unwrap();
        let mut child = Command::new(venv("python"))
            .arg(support("boot_harness.py"))
            .args(["--moto", &moto.url, "--fleet", fleet, "--region", REGION])
            .arg("--agent")
            .arg(bin("fleet-agent"))
            .arg("--workdir")
            .arg(dir)
            .args(["--imds-listen", "127.0.0.1:0", "--poll", "0.5"])
            .args(["--agent-setting", "worker_command = [\"sleep\", \"3600\"]"])
            .args(["--agent-setting", "heartbeat_ms = 2000"])
            .args(["--agent-setting", "join_grace_ms = 100"])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("boot_harness.py");
        first_line(&mut child, "imds on");
        BootHarness {
            child,
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for BootHarness {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A fleet directory pointed at the emulator, with the harness booting its instances.
/// Fields drop in order: the agents first, then the controller, the emulator, moto.
pub struct Ec2Fleet {
    pub harness: Option<BootHarness>,
    pub fleet: Fleet,
    pub emulator: Emulator,
    pub moto: Moto,
    pub subnets: Vec<String>,
    pub ami: String,
}

impl Ec2Fleet {
    /// `time_scale` speeds up the emulator's buckets and the launcher's own pacing alike.
    pub fn new(time_scale: f64, boot: bool) -> Ec2Fleet {
        let moto = Moto::start();
        let (subnets, ami) = moto.network(&["us-east-1a", "us-east-1b", "us-east-1c"]);
        let mut fleet = Fleet::new(crate::Options {
            managed_master: false,
            worker_command: Some(vec!["sleep".into(), "3600".into()]),
            ..crate::Options::default()
        });
        let emulator = Emulator::start(&moto, time_scale, &fleet.path().join("emulator.log"));
        let mut text = std::fs::read_to_string(fleet.path().join("fleet.toml")).unwrap();
        text.push_str(&format!(
            "\n[ec2]\nregion = {REGION:?}\nendpoint_url = {:?}\nami = {ami:?}\ninstance_types = [\"c6i.large\", \"c5.large\"]\nsubnets = {subnets:?}\ntime_scale = {time_scale:?}\n\n[scale]\nmax_nodes = 1000\n",
            emulator.url
        ));
        std::fs::write(fleet.path().join("fleet.toml"), text).unwrap();
        fleet.start_serve();
        let harness = boot.then(|| BootHarness::start(&moto, "e2e", &fleet.path().join("boot")));
        Ec2Fleet {
            fleet,
            moto,
            emulator,
            harness,
            subnets,
            ami,
        }
    }

    /// The fleet's id, as `fleet init` wrote it into fleet.toml.
    pub fn fleet_id(&self) -> String {
        let t: toml::Table = std::fs::read_to_string(self.fleet.path().join("fleet.toml"))
            .unwrap()
            .parse()
            .unwrap();
        t["id"].as_str().expect("fleet.toml has an id").to_string()
    }

    /// Runs the CLI with test credentials (the standard env-var chain).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_env(
            args,
            &[
                ("AWS_ACCESS_KEY_ID", "testing"),
                ("AWS_SECRET_ACCESS_KEY", "testing"),
            ],
        )
    }

    pub fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut c = Command::new(bin("fleet"));
        c.arg("--dir").arg(self.fleet.path()).args(args);
        for k in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
        ] {
            c.env_remove(k);
        }
        // No ~/.aws of the machine's user may leak in.
        c.env("AWS_CONFIG_FILE", "/nonexistent/aws-config").env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-credentials",
        );
        c.env("AWS_EC2_METADATA_DISABLED", "true");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("fleet")
    }

    /// `fleet scale --backend B --nodes N --output json`, asserting success.
    pub fn scale(&self, backend: &str, n: usize, wait_s: u64) -> serde_json::Value {
        let out = self.cli(&[
            "--output",
            "json",
            "scale",
            "--backend",
            backend,
            "--nodes",
            &n.to_string(),
            "--wait",
            &wait_s.to_string(),
        ]);
        assert!(
            out.status.success(),
            "scale {backend} {n}: {}\nserve log tail: {}",
            String::from_utf8_lossy(&out.stderr),
            tail(&self.fleet.serve_log(), 20)
        );
        serde_json::from_slice(&out.stdout).expect("scale json")
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
