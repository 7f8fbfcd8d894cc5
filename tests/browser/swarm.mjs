// The swarm the browser tests run against, one per test file (each file runs in its own
// process): `fleet serve` with a managed Locust master, two local agents with one Locust
// worker each, the sample target, a 2-user test, and Chromium. See README.md in this directory.

import assert from 'node:assert/strict';
import { execFile, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import https from 'node:https';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const TARGET_DIR = path.resolve(ROOT, process.env.CARGO_TARGET_DIR || 'target');
export const FLEET = path.join(TARGET_DIR, 'debug', 'fleet');
export const AGENT = path.join(TARGET_DIR, 'debug', 'fleet-agent');
export const LOCUST = path.resolve(ROOT, process.env.FLEET_TEST_LOCUST || '.venv/bin/locust');
export const CHROMIUM = process.env.FLEET_TEST_CHROMIUM || '/usr/bin/chromium';
export const SHOTS = path.join(ROOT, 'tests/artifacts/browser');
// The flags this closed network needs (the machine notes): without the background-networking
// ones Chromium keeps dialling Google's hosts and gets refused.
export const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];
export const NODES = 2;
export const USERS = 2;

// ---------------------------------------------------------------------------------------------
// Helpers

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

export async function waitPort(port, ms, what) {
  const t = Date.now();
  for (;;) {
    const ok = await new Promise((resolve) => {
      const c = net.connect({ host: '127.0.0.1', port }, () => {
        c.destroy();
        resolve(true);
      });
      c.on('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() - t > ms) throw new Error(`${what} did not listen on ${port} within ${ms} ms`);
    await sleep(50);
  }
}

/** Polls `f` every 200 ms until it returns a truthy value, or throws naming `what`. */
export async function waitFor(what, ms, f) {
  const t = Date.now();
  let last;
  for (;;) {
    try {
      const v = await f();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() - t > ms) {
      throw new Error(`timed out after ${ms} ms waiting for ${what}${last ? `: ${last.message}` : ''}`);
    }
    await sleep(200);
  }
}

/** Runs the `fleet` CLI on the fleet directory; rejects on a non-zero exit. */
export function fleet(args, { timeout = 90_000 } = {}) {
  return new Promise((resolve, reject) => {
    execFile(FLEET, args, { timeout, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`fleet ${args.join(' ')}: ${err.message}\n${stderr}`));
      else resolve(stdout);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// The swarm: one per run of this file

export const S = {
  dir: null,
  url: null,
  password: null,
  operatorToken: null,
  ca: null,
  target: null,
  targetUrl: null,
  serve: null,
  browser: null,
  good: null, // the browser context with the right password
  dash: null, // the dashboard page, kept open from test 2 to test 3
  dashReady: false,
  failed: false,
  cleaned: false,
};

/** A request through the controller with the operator token (the CLI's credential): a GET, or
 * `method` with `send` as the body (`type` its Content-Type). */
export function api(p, { method = 'GET', send = null, type = 'text/plain; charset=utf-8' } = {}) {
  return new Promise((resolve, reject) => {
    const headers = { Authorization: `Bearer ${S.operatorToken}` };
    if (send !== null) Object.assign(headers, { 'Content-Type': type, 'Content-Length': Buffer.byteLength(send) });
    const req = https.request(`${S.url}${p}`, { method, ca: S.ca, headers, timeout: 30_000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => (body += d));
      res.on('end', () => {
        let json = null;
        try {
          json = JSON.parse(body);
        } catch {}
        resolve({ status: res.statusCode, json, body });
      });
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
    req.end(send ?? undefined);
  });
}

export async function currentSpec() {
  const r = await api('/api/spec');
  return r.status === 200 ? r.json.current : null;
}

export function locustfile(cls, tasks) {
  let s =
    `from locust import FastHttpUser, constant, task\n\n\nclass ${cls}(FastHttpUser):\n` +
    `    host = "${S.targetUrl}"\n    wait_time = constant(0.2)\n`;
  for (const [name, p] of tasks) {
    s += `\n    @task\n    def ${name}(self):\n        self.client.get("${p}")\n`;
  }
  return s;
}

/** Replaces the locustfile as editors do: written beside it, then renamed over it. */
export function writeSpec(text) {
  const tmp = path.join(S.dir, 'spec/.locustfile.py.tmp');
  fs.writeFileSync(tmp, text);
  fs.renameSync(tmp, path.join(S.dir, 'spec/locustfile.py'));
}

/** Sets `key = value` in `[section]` of a TOML text (replacing the line or adding it). */
export function tomlSet(text, section, key, value) {
  const lines = text.split('\n');
  const start = lines.findIndex((l) => l.trim() === `[${section}]`);
  if (start < 0) return `${text.trimEnd()}\n\n[${section}]\n${key} = ${value}\n`;
  let end = lines.findIndex((l, i) => i > start && /^\s*\[/.test(l));
  if (end < 0) end = lines.length;
  const at = lines.findIndex((l, i) => i > start && i < end && new RegExp(`^\\s*${key}\\s*=`).test(l));
  if (at >= 0) lines[at] = `${key} = ${value}`;
  else lines.splice(start + 1, 0, `${key} = ${value}`);
  return lines.join('\n');
}

/** Starts the swarm; `shots` are this file's screenshots, removed first so that no picture from
 * an earlier run stands in for one of this run. */
export async function startSwarm({ shots = [] } = {}) {
  for (const [p, what] of [
    [FLEET, 'the fleet binary (cargo build --workspace --bins)'],
    [AGENT, 'the fleet-agent binary (cargo build --workspace --bins)'],
    [LOCUST, 'locust (./run.sh setup, or set FLEET_TEST_LOCUST)'],
    [CHROMIUM, "Debian's chromium (apt-get install chromium, or ./run.sh setup)"],
  ]) {
    assert.ok(fs.existsSync(p), `${p} is missing: ${what}`);
  }
  for (const f of shots) fs.rmSync(f, { force: true });
  S.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fleet-browser-'));
  const port = await freePort();
  const [masterPort, webPort, targetPort] = [await freePort(), await freePort(), await freePort()];
  S.url = `https://127.0.0.1:${port}`;

  const init = JSON.parse(
    await fleet(['--dir', S.dir, '--output', 'json', 'init', '--name', 'browser', '--listen',
      `127.0.0.1:${port}`, '--locust', LOCUST]),
  );
  S.password = init.password;
  assert.ok(S.password, 'fleet init printed no password');
  S.operatorToken = fs.readFileSync(path.join(S.dir, 'secrets/operator.token'), 'utf8').trim();
  S.ca = fs.readFileSync(path.join(S.dir, 'certs/ca.pem'));

  const cfgPath = path.join(S.dir, 'fleet.toml');
  let cfg = fs.readFileSync(cfgPath, 'utf8');
  cfg = tomlSet(cfg, 'controller', 'debounce_ms', '100');
  cfg = tomlSet(cfg, 'master', 'port', String(masterPort));
  cfg = tomlSet(cfg, 'master', 'web_url', JSON.stringify(`http://127.0.0.1:${webPort}/locust`));
  cfg = tomlSet(cfg, 'local', 'workers', '1');
  cfg = tomlSet(cfg, 'local', 'agent_bin', JSON.stringify(AGENT));
  // Fast feedback, as in tests/src/lib.rs; the defaults suit real fleets.
  cfg = tomlSet(cfg, 'local', 'agent_settings', '{ heartbeat_ms = 1000 }');
  fs.writeFileSync(cfgPath, cfg);

  S.target = spawn(FLEET, ['target', '--listen', `127.0.0.1:${targetPort}`], { stdio: 'ignore' });
  S.targetUrl = `http://127.0.0.1:${targetPort}`;
  await waitPort(targetPort, 10_000, 'fleet target');
  S.firstPath = '/alpha';
  writeSpec(locustfile('Web', [['alpha', S.firstPath]]));

  const log = fs.openSync(path.join(S.dir, 'serve.log'), 'a');
  S.serve = spawn(FLEET, ['--dir', S.dir, 'serve'], { stdio: ['ignore', log, log] });
  fs.closeSync(log);
  await waitPort(port, 20_000, 'fleet serve');
  const first = await waitFor('the first publication', 20_000, currentSpec);

  await fleet(['--dir', S.dir, 'scale', '--nodes', String(NODES), '--wait', '60']);
  await waitFor(`${NODES} agents running ${first.sha256.slice(0, 12)}`, 30_000, async () => {
    const r = await api('/api/nodes');
    return r.status === 200 && r.json.length === NODES &&
      r.json.every((n) => n.running?.sha256 === first.sha256 && n.workers.every((w) => w.state === 'running'));
  });
  await waitFor(`${NODES} workers at the Locust master`, 30_000, async () => {
    const r = await api('/locust/stats/requests');
    return r.status === 200 && r.json.worker_count === NODES;
  });
  await fleet(['--dir', S.dir, 'swarm', '--users', String(USERS), '--spawn-rate', String(USERS)]);

  fs.mkdirSync(SHOTS, { recursive: true });
  S.browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
}

export async function stopChild(child, what, ms = 15_000) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  const t = setTimeout(() => {
    console.log(`${what} did not stop within ${ms} ms: SIGKILL`);
    child.kill('SIGKILL');
  }, ms);
  await exited;
  clearTimeout(t);
}

/** The managed master's pid, if `fleet serve` left one behind (state/master.json). */
function masterPid() {
  try {
    return JSON.parse(fs.readFileSync(path.join(S.dir, 'state/master.json'), 'utf8')).pid || null;
  } catch {
    return null;
  }
}

function tail(file, n = 40) {
  try {
    return fs.readFileSync(file, 'utf8').trimEnd().split('\n').slice(-n).join('\n');
  } catch {
    return '(none)';
  }
}

/** Pids of the local agents `fleet scale` started in this fleet directory. */
function agentPids() {
  const local = S.dir && path.join(S.dir, 'local');
  if (!local || !fs.existsSync(local)) return [];
  return fs.readdirSync(local).flatMap((id) => {
    try {
      return [Number(fs.readFileSync(path.join(local, id, 'agent.pid'), 'utf8').trim())].filter((p) => p > 0);
    } catch {
      return [];
    }
  });
}

function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

export async function cleanup() {
  if (S.cleaned) return;
  S.cleaned = true;
  if (S.browser) await S.browser.close().catch(() => {});
  const agents = agentPids();
  if (S.dir && fs.existsSync(path.join(S.dir, 'fleet.toml'))) {
    await fleet(['--dir', S.dir, 'down'], { timeout: 30_000 }).catch((e) => console.log(`${e.message}`));
  }
  for (const pid of agents.filter(alive)) {
    console.log(`agent ${pid} outlived fleet down: SIGKILL`);
    try {
      process.kill(pid, 'SIGKILL');
    } catch {}
  }
  await stopChild(S.serve, 'fleet serve');
  // A master orphaned by a controller that did not stop cleanly: its process group.
  const pid = S.dir && masterPid();
  if (pid) {
    try {
      process.kill(-pid, 'SIGKILL');
    } catch {}
  }
  await stopChild(S.target, 'fleet target', 5_000);
  if (S.failed && S.dir) {
    console.log(`serve.log (last lines):\n${tail(path.join(S.dir, 'serve.log'))}`);
    console.log(`state/master.log (last lines):\n${tail(path.join(S.dir, 'state/master.log'), 20)}`);
  }
  if (S.dir) {
    if (process.env.FLEET_TEST_KEEP) console.log(`keeping ${S.dir}`);
    else fs.rmSync(S.dir, { recursive: true, force: true });
  }
  const shots = fs.existsSync(SHOTS) ? fs.readdirSync(SHOTS).filter((f) => f.endsWith('.png')) : [];
  console.log(`screenshots in ${SHOTS}: ${shots.join(', ') || '(none)'}`);
}

// If the runner is interrupted, `after` does not run: stop what we started, synchronously.
process.once('exit', () => {
  if (S.cleaned) return;
  if (S.dir) spawnSync(FLEET, ['--dir', S.dir, 'down'], { timeout: 20_000, stdio: 'ignore' });
  for (const c of [S.serve, S.target]) {
    if (c && c.exitCode === null && c.signalCode === null) c.kill('SIGTERM');
  }
  if (S.dir && !process.env.FLEET_TEST_KEEP) {
    // `fleet serve` may still be writing into it as it stops: best effort.
    try {
      fs.rmSync(S.dir, { recursive: true, force: true, maxRetries: 3 });
    } catch {}
  }
});
for (const sig of ['SIGINT', 'SIGTERM']) process.once(sig, () => process.exit(130));

/** Marks the run failed (so `after` prints the logs) when `f` throws. */
export function guarded(f) {
  return async (t) => {
    try {
      await f(t);
    } catch (e) {
      S.failed = true;
      throw e;
    }
  };
}

export async function shot(page, file) {
  await page.screenshot({ path: file, fullPage: true }).catch((e) => console.log(`screenshot ${file}: ${e.message}`));
}

