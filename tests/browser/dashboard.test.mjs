// Real-browser tests of the controller's web UI: Debian's Chromium driven by playwright-core
// against a local swarm of the real binaries (like tests/src/lib.rs): `fleet serve` with a
// managed Locust master, two local agents with one Locust worker each, the sample target, and
// a 2-user test. See README.md in this directory.
//
//   cargo build --workspace --bins && node --test tests/browser/
//
// Env: CARGO_TARGET_DIR (binaries in $CARGO_TARGET_DIR/debug, default target/), FLEET_TEST_LOCUST
// (default .venv/bin/locust), FLEET_TEST_CHROMIUM (default /usr/bin/chromium), FLEET_TEST_KEEP
// (keep the fleet directory). Screenshots go to tests/artifacts/browser/.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import https from 'node:https';
import path from 'node:path';
import { api, cleanup, currentSpec, guarded, locustfile, NODES, S, shot, SHOTS, sleep, startSwarm, USERS, waitFor, writeSpec } from './swarm.mjs';

const SHOT = {
  unauthorized: path.join(SHOTS, 'unauthorized.png'),
  before: path.join(SHOTS, 'dashboard-before.png'),
  after: path.join(SHOTS, 'dashboard-after.png'),
  locust: path.join(SHOTS, 'locust.png'),
  fleet: path.join(SHOTS, 'dashboard-fleet.png'),
};
// Test 5: stub agents (heartbeats posted with the agent token) on top of the real ones.
const FAKE = { current: 200, lagging: 60, retrying: 25, refused: 15 };

// In-page reads of the dashboard's DOM contract.
const readDash = () => {
  const q = (s) => document.querySelector(s);
  const rows = [...document.querySelectorAll('#nodes tbody tr[data-node]')];
  return {
    ready: document.body.dataset.ready === '1',
    conn: q('#conn')?.textContent.trim() ?? null,
    seq: q('#spec-seq')?.textContent.trim() ?? null,
    shaText: q('#spec-sha')?.textContent.trim() ?? null,
    sha: q('#spec-sha')?.dataset.sha ?? null,
    history: [...document.querySelectorAll('#history li[data-sha]')].map((li) => li.dataset.sha),
    rows: rows.map((r) => ({
      node: r.dataset.node,
      sha: r.dataset.sha,
      cellSha: r.querySelector('td.sha')?.textContent.trim() ?? null,
      lag: r.classList.contains('lag'),
    })),
    lagging: q('#lagging-count')?.textContent.trim() ?? null,
    locust: {
      state: q('#locust-state')?.textContent.trim() ?? null,
      users: q('#locust-users')?.textContent.trim() ?? null,
      rps: q('#locust-rps')?.textContent.trim() ?? null,
      fail: q('#locust-fail')?.textContent.trim() ?? null,
      // The test's rows: [method, name, requests] per `tr`, the Aggregated row last.
      rows: [...document.querySelectorAll('#locust-rows-body tr')].map((r) => [
        r.dataset.method, r.dataset.name, Number(r.children[2]?.textContent ?? NaN)]),
    },
  };
};
const firstNumber = (s) => {
  const m = /-?\d+(\.\d+)?/.exec(s ?? '');
  return m ? Number(m[0]) : NaN;
};

// ---------------------------------------------------------------------------------------------
// The tests (run in order, sharing the swarm and the open dashboard page)

describe('fleet web UI in Chromium', { timeout: 240_000 }, () => {
  before(guarded(() => startSwarm({ shots: Object.values(SHOT) })), { timeout: 120_000 });
  after(cleanup, { timeout: 60_000 });

  test('1. a wrong or missing password gets 401 and no fleet data', { timeout: 30_000 }, guarded(async () => {
    const spec = await currentSpec();
    const nodes = (await api('/api/nodes')).json.map((n) => n.node_id);
    // Every refusal counts against the address's failure allowance (10 in a burst, shared with
    // the agents on loopback): each case costs the controller one or two refusals, no more.
    for (const [label, creds] of [
      ['wrong password', { username: 'fleet', password: `${S.password}x` }],
      ['no credentials', undefined],
    ]) {
      const ctx = await S.browser.newContext({ ignoreHTTPSErrors: true, httpCredentials: creds });
      const page = await ctx.newPage();
      await page.route('**/favicon.ico', (r) => r.abort());
      const docs = [];
      page.on('response', (r) => {
        if (r.request().isNavigationRequest()) docs.push(r);
      });
      try {
        let resp = null;
        let navError = null;
        try {
          resp = await page.goto(`${S.url}/`);
        } catch (e) {
          navError = e;
        }
        if (creds) {
          // Playwright answers the challenge with the wrong password once, then gives up and
          // Chromium shows the 401 body.
          assert.ifError(navError);
          assert.equal(resp.status(), 401, `${label}: status`);
        } else {
          // With nothing to answer the challenge with, headless Chromium (no login prompt)
          // either shows the 401 body or cancels the navigation.
          assert.ok(resp?.status() === 401 || /ERR_INVALID_AUTH_CREDENTIALS/.test(navError?.message),
            `${label}: expected 401 or ERR_INVALID_AUTH_CREDENTIALS, got ${resp?.status()} ${navError?.message ?? ''}`);
        }
        for (const r of docs) {
          assert.equal(r.status(), 401, `${label}: the response for ${r.url()}`);
          assert.match(r.headers()['www-authenticate'] ?? '', /^Basic realm="fleet"/, `${label}: challenge`);
        }
        // After a cancelled navigation Chromium is still putting up its error page.
        const html = await waitFor(`${label}: the page content`, 5_000, () => page.content());
        assert.equal(await page.locator('#nodes, #spec-sha, #spec-seq, #history, #locust-state').count(), 0, `${label}: dashboard elements`);
        assert.ok(!html.includes(spec.sha256.slice(0, 12)), `${label}: the page shows the spec sha`);
        for (const n of nodes) assert.ok(!html.includes(n), `${label}: the page shows node ${n}`);
        assert.ok(!html.includes(S.password), `${label}: the page shows the password`);
        if (resp) {
          assert.match(await page.evaluate(() => document.body?.innerText ?? ''), /credentials required/, `${label}: body`);
        }
        if (creds) await shot(page, SHOT.unauthorized);
        console.log(`${label}: ${resp ? `HTTP ${resp.status()}` : navError.message.split('\n')[0]}`);
      } finally {
        await ctx.close();
      }
    }
  }));

  test('2. with the password the dashboard lists both agents on the current sha', { timeout: 45_000 }, guarded(async () => {
    S.good = await S.browser.newContext({
      ignoreHTTPSErrors: true,
      httpCredentials: { username: 'fleet', password: S.password },
      viewport: { width: 1280, height: 900 },
    });
    const page = (S.dash = await S.good.newPage());
    S.navigations = 0;
    page.on('framenavigated', (f) => {
      if (f === page.mainFrame()) S.navigations++;
    });
    try {
      const resp = await page.goto(`${S.url}/`);
      assert.equal(resp.status(), 200);
      const spec = await currentSpec();
      const ids = (await api('/api/nodes')).json.map((n) => n.node_id).sort();
      assert.equal(ids.length, NODES);
      await page.waitForFunction(() => document.body.dataset.ready === '1', null, { timeout: 15_000 });
      S.dashReady = true;
      const d = await waitFor('both agents on the current sha, stream live', 15_000, async () => {
        const d = await page.evaluate(readDash);
        return d.conn === 'live' && d.sha === spec.sha256 && d.rows.length === NODES &&
          d.rows.every((r) => r.sha === d.sha) ? d : null;
      }).catch(async (e) => {
        throw new Error(`${e.message}\npage: ${JSON.stringify(await page.evaluate(readDash))}`);
      });
      assert.equal(d.shaText, spec.sha256.slice(0, 12), '#spec-sha shows the first 12 hex digits');
      assert.equal(firstNumber(d.seq), spec.sequence, '#spec-seq');
      assert.equal(d.history[0], spec.sha256, '#history starts with the current version');
      assert.deepEqual(d.rows.map((r) => r.node).sort(), ids, 'one row per agent');
      for (const r of d.rows) {
        assert.ok(r.cellSha && spec.sha256.startsWith(r.cellSha.replace(/…$/, '')), `td.sha of ${r.node}: ${r.cellSha}`);
        assert.equal(r.lag, false, `${r.node} is marked lagging`);
      }
      assert.equal(firstNumber(d.lagging), 0, '#lagging-count');
      // The test from `fleet swarm` shows up in the Locust block.
      await waitFor(`#locust-users at ${USERS} and #locust-state running`, 20_000, async () => {
        const l = (await page.evaluate(readDash)).locust;
        return firstNumber(l.users) === USERS && /running/i.test(l.state ?? '');
      });
      // Its rows are the controller's merged view: the same endpoints and counts as
      // /api/stats (read until both show the same, since both move with the test).
      await waitFor('the page\'s rows to equal /api/stats', 15_000, async () => {
        const mine = (await page.evaluate(readDash)).locust.rows;
        const api_ = (await api('/api/stats')).json.stats.map((r) => [r.method, r.name, r.num_requests]);
        return mine.length > 1 && mine.at(-1)[1] === 'Aggregated' && mine.at(-1)[2] > 0 &&
          JSON.stringify(mine) === JSON.stringify(api_);
      });
      await page.waitForTimeout(300);
    } finally {
      await shot(page, SHOT.before);
    }
  }));

  test('3. a spec edit reaches the open page and both rows without a reload', { timeout: 50_000 }, guarded(async () => {
    const old = await currentSpec();
    // Edit first, so the swarm (and /locust/ below) moves on even if the page cannot follow.
    const page = S.dash;
    let d0 = null;
    if (page && S.dashReady) {
      d0 = await page.evaluate(readDash);
      await page.evaluate(() => {
        window.__marker = 'before-edit';
      });
    }
    const navs = S.navigations;
    writeSpec(locustfile('Web', [['alpha', '/beta']]));
    const fresh = await waitFor('a new publication', 15_000, async () => {
      const c = await currentSpec();
      return c && c.sha256 !== old.sha256 ? c : null;
    });
    S.editedPath = '/beta';
    try {
      assert.ok(page && S.dashReady, 'the dashboard never rendered its first event chunk (test 2)');
      await page.waitForFunction((sha) => document.querySelector('#spec-sha')?.dataset.sha === sha,
        fresh.sha256, { timeout: 15_000 }).catch(async (e) => {
        throw new Error(`#spec-sha did not change to ${fresh.sha256}: ${e.message}\npage: ${JSON.stringify(await page.evaluate(readDash))}`);
      });
      const d = await waitFor('both rows on the new sha', 30_000, async () => {
        const d = await page.evaluate(readDash);
        return d.rows.length === NODES && d.rows.every((r) => r.sha === fresh.sha256 && !r.lag) ? d : null;
      }).catch(async (e) => {
        throw new Error(`${e.message}\npage: ${JSON.stringify(await page.evaluate(readDash))}`);
      });
      assert.equal(await page.evaluate(() => window.__marker), 'before-edit', 'the page was reloaded');
      assert.equal(S.navigations, navs, 'the page navigated');
      assert.equal(d.shaText, fresh.sha256.slice(0, 12));
      assert.ok(firstNumber(d.seq) > firstNumber(d0.seq), `#spec-seq went from ${d0.seq} to ${d.seq}`);
      assert.equal(firstNumber(d.seq), fresh.sequence);
      assert.equal(d.history[0], fresh.sha256, '#history starts with the new version');
      assert.ok(d.history.includes(old.sha256), '#history keeps the old version');
      assert.equal(d.history.length, d0.history.length + 1, '#history grew by one');
      assert.equal(d.conn, 'live');
      await waitFor('#lagging-count back at 0', 5_000, async () => firstNumber((await page.evaluate(readDash)).lagging) === 0);
      await page.waitForTimeout(300);
    } finally {
      if (page) await shot(page, SHOT.after);
    }
  }));

  test("4. /locust/ loads Locust's UI and its charts fetch stats through the proxy", { timeout: 50_000 }, guarded(async () => {
    const ctx = S.good ?? (await S.browser.newContext({
      ignoreHTTPSErrors: true,
      httpCredentials: { username: 'fleet', password: S.password },
    }));
    // Locust's UI polls stats/requests only while the state it last saw is spawning or
    // running. Right after the hot restart in test 3 the master can be briefly stopped (all
    // old workers quit) until the controller starts the test again, and a page loaded then
    // never polls again. So open it once the test runs the edited spec: the new generation of
    // workers, one per agent, with the test back at its users (README, "What happens on a
    // spec edit").
    const want = S.editedPath ?? S.firstPath;
    const settled = (b) => b && ['running', 'spawning'].includes(b.state) && b.worker_count === NODES &&
      b.user_count === USERS && b.stats?.some((x) => x.name === want && x.num_requests > 0);
    const brief = (b) => b && { state: b.state, worker_count: b.worker_count, user_count: b.user_count,
      stats: b.stats?.map((x) => `${x.name}:${x.num_requests}`) };
    let last = null;
    const fail = (e) => {
      throw new Error(`${e.message}\nlast seen: ${JSON.stringify(brief(last))}`);
    };
    const page = await ctx.newPage();
    const isStats = (r) => new URL(r.url()).pathname.startsWith('/locust/stats/requests');
    const feed = [];
    let fetched = 0;
    page.on('response', (r) => {
      if (isStats(r)) {
        feed.push(r);
        fetched++;
      }
    });
    try {
      await waitFor(`the master running ${USERS} users on ${NODES} workers with requests to ${want}`, 30_000, async () => {
        last = (await api('/locust/stats/requests')).json;
        return settled(last);
      }).catch(fail);
      const stats = page.waitForResponse((r) => isStats(r) && r.status() === 200, { timeout: 20_000 });
      stats.catch(() => {});
      const resp = await page.goto(`${S.url}/locust/`);
      assert.equal(resp.status(), 200);
      assert.equal(new URL(page.url()).pathname, '/locust/');
      await page.waitForSelector('#root > *', { timeout: 15_000 });
      await stats;
      // The charts keep fetching through the proxy and see what the master sees.
      last = null;
      await waitFor(`the UI's feed showing ${USERS} users on ${NODES} workers with requests to ${want}`, 15_000, async () => {
        for (const r of feed.splice(0)) {
          const b = r.status() === 200 ? await r.json().catch(() => null) : null;
          if (b) last = b;
          if (settled(b)) return true;
        }
        return false;
      }).catch(fail);
      // ... every 2 s, not only once when the page loads.
      const seen = fetched;
      await waitFor('another stats/requests fetch by the page', 6_000, () => fetched > seen);
      await page.waitForTimeout(300);
    } finally {
      if (page.url() === 'about:blank') await page.goto(`${S.url}/locust/`).catch(() => {});
      await shot(page, SHOT.locust);
      await page.close();
    }
  }));

  test(`5. with ${Object.values(FAKE).reduce((a, b) => a + b)} stub agents the summary counts them and a filter narrows the table`, { timeout: 60_000 }, guarded(async () => {
    const spec = (await api('/api/spec')).json;
    const cur = spec.current;
    const old = spec.history.find((v) => v.sha256 !== cur.sha256);
    assert.ok(old, 'test 3 left an older version in the history');
    const agentToken = fs.readFileSync(path.join(S.dir, 'secrets/agent.token'), 'utf8').trim();
    const keepAlive = new https.Agent({ keepAlive: true, maxSockets: 4, ca: S.ca });
    const post = (hb) => new Promise((resolve, reject) => {
      const body = JSON.stringify(hb);
      const req = https.request(`${S.url}/v1/heartbeat`, {
        method: 'POST', agent: keepAlive, timeout: 10_000,
        headers: { Authorization: `Bearer ${agentToken}`, 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) },
      }, (res) => {
        res.resume();
        res.on('end', () => (res.statusCode === 200 ? resolve() : reject(new Error(`heartbeat ${hb.node_id}: HTTP ${res.statusCode}`))));
      });
      req.on('timeout', () => req.destroy(new Error('timeout')));
      req.on('error', reject);
      req.end(body);
    });
    const fakes = [];
    for (const [standing, n] of Object.entries(FAKE)) {
      for (let i = 0; i < n; i++) {
        const onCurrent = standing === 'current';
        fakes.push({
          node_id: `stub-${standing}-${String(i).padStart(3, '0')}`,
          backend: 'local',
          agent_version: '0.0.0-stub',
          running: { sha256: onCurrent ? cur.sha256 : old.sha256, sequence: onCurrent ? cur.sequence : old.sequence, master_epoch: 1, since_ms: 1 },
          last_good: null,
          workers: [{ index: 0, pid: 1000 + i, state: 'running', restarts: 0, last_exit: null }],
          status: 'running',
          last_error: null,
          rejected: null,
          uptime_s: 10,
          update: standing === 'retrying' || standing === 'refused'
            ? { sequence: cur.sequence, sha256: cur.sha256, state: standing, attempts: 2, error: `${standing}: stub error ${i}` }
            : null,
        });
      }
    }
    const beat = async () => {
      for (let i = 0; i < fakes.length; i += 20) await Promise.all(fakes.slice(i, i + 20).map(post));
    };
    await beat();
    // Keep them from going silent (15 s) while the test runs.
    let beating = true;
    const loop = (async () => {
      while (beating) {
        await sleep(4_000);
        if (beating) await beat().catch((e) => console.log(`stub heartbeats: ${e.message}`));
      }
    })();
    const page = S.dash;
    try {
      assert.ok(page && S.dashReady, 'the dashboard never rendered (test 2)');
      const total = fakes.length + NODES;
      const counts = () => page.evaluate(() => Object.fromEntries(
        ['node-count', 'count-current', 'lagging-count', 'count-retrying', 'count-refused', 'count-silent']
          .map((id) => [id, Number(document.getElementById(id).textContent)])));
      const want = { 'node-count': total, 'count-current': FAKE.current + NODES, 'lagging-count': FAKE.lagging,
        'count-retrying': FAKE.retrying, 'count-refused': FAKE.refused, 'count-silent': 0 };
      await waitFor('the summary to count the stub agents', 15_000, async () =>
        JSON.stringify(await counts()) === JSON.stringify(want)).catch(async (e) => {
        throw new Error(`${e.message}: ${JSON.stringify(await counts())}`);
      });
      // By bundle: the current one and the old one.
      const bundles = await page.evaluate(() => [...document.querySelectorAll('#bundle-counts li[data-sha]')]
        .map((li) => [li.dataset.sha, Number(li.dataset.count)]));
      assert.deepEqual(Object.fromEntries(bundles), {
        [cur.sha256]: FAKE.current + NODES,
        [old.sha256]: FAKE.lagging + FAKE.retrying + FAKE.refused,
      });
      // The table shows one page, not every node.
      const rowCount = () => page.locator('#nodes tbody tr[data-node]').count();
      await waitFor('one page of 50 rows', 10_000, async () => (await rowCount()) === 50);
      assert.match(await page.locator('#page-info').textContent(), new RegExp(`of ${total}$`));

      // Filter by standing: only the refused stubs, with their reason.
      await page.selectOption('#f-standing', 'refused');
      await waitFor('only the refused rows', 10_000, async () => {
        const rows = await page.evaluate(() => [...document.querySelectorAll('#nodes tbody tr[data-node]')]
          .map((r) => [r.dataset.node, r.dataset.standing, r.querySelector('td.err').textContent]));
        return rows.length === FAKE.refused && rows.every(([id, st, err]) => id.startsWith('stub-refused-') &&
          st === 'refused' && err.startsWith('refused: stub error'));
      });
      assert.equal(await page.locator('#page-info').textContent(), `1–${FAKE.refused} of ${FAKE.refused}`);
      // Text on top of it: one row.
      await page.fill('#f-text', 'refused-007');
      await waitFor('one row for refused-007', 10_000, async () => {
        const ids = await page.evaluate(() => [...document.querySelectorAll('#nodes tbody tr[data-node]')].map((r) => r.dataset.node));
        return ids.length === 1 && ids[0] === 'stub-refused-007';
      });
      // A summary chip filters too: lagging, text cleared.
      await page.fill('#f-text', '');
      await page.click('.chip[data-standing="lagging"]');
      await waitFor('the lagging rows', 10_000, async () => {
        const rows = await page.evaluate(() => [...document.querySelectorAll('#nodes tbody tr[data-node]')].map((r) => r.dataset.standing));
        return rows.length === 50 && rows.every((st) => st === 'lagging');
      });
      assert.equal(await page.inputValue('#f-standing'), 'lagging');
      assert.match(await page.locator('#page-info').textContent(), new RegExp(`^1–50 of ${FAKE.lagging}$`));
      await page.click('#page-next');
      await waitFor('the second page of lagging rows', 10_000, async () =>
        (await page.locator('#page-info').textContent()) === `51–${FAKE.lagging} of ${FAKE.lagging}`);
      await page.waitForTimeout(300);
    } finally {
      beating = false;
      await loop;
      keepAlive.destroy();
      if (page) await shot(page, SHOT.fleet);
    }
  }));

  test('6. screenshots of every page are saved', guarded(async () => {
    for (const f of Object.values(SHOT)) {
      assert.ok(fs.existsSync(f), `${f} is missing`);
      const head = fs.readFileSync(f).subarray(0, 8);
      assert.deepEqual([...head], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a], `${f} is not a PNG`);
    }
    console.log(`screenshots: ${Object.values(SHOT).join(' ')}`);
  }));
});
