// The dashboard's Spec view in Chromium, against its own swarm (swarm.mjs): open the spec, edit
// a task's URL path in the editor and save (the master's stats and the agents follow), a syntax
// error refused beside the editor with nothing published, a refused edit on disk shown there
// too, a diff of two versions, a roll back, and a stale save refused. See README.md.
//
//   cargo build --workspace --bins && node --test tests/browser/

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { api, cleanup, currentSpec, guarded, locustfile, NODES, S, shot, SHOTS, startSwarm, waitFor, writeSpec } from './swarm.mjs';

const SHOT = {
  open: path.join(SHOTS, 'spec-open.png'),
  refused: path.join(SHOTS, 'spec-refused.png'),
  diff: path.join(SHOTS, 'spec-diff.png'),
  conflict: path.join(SHOTS, 'spec-conflict.png'),
};
// How long the fleet may take to run a saved spec (the agents' long poll, the download, the
// workers' and the master's restart, the test started again): "within seconds".
const FOLLOW_MS = 45_000;

// In-page reads of the Spec view.
const readView = () => {
  const q = (s) => document.querySelector(s);
  const cm = q('#spec-editor .CodeMirror')?.CodeMirror;
  const visible = (s) => !!q(s) && !q(s).classList.contains('hidden') && q(s).offsetParent !== null;
  return {
    view: document.body.dataset.view,
    path: q('#spec-path')?.textContent ?? null,
    base: Number(q('#spec-base')?.dataset.base || 0),
    value: cm ? cm.getValue() : null,
    status: q('#spec-status')?.textContent ?? '',
    saveEnabled: q('#spec-save') ? !q('#spec-save').disabled : false,
    notice: visible('#spec-notice') ? q('#spec-notice-text').textContent : null,
    problem: visible('#spec-problem') ? {
      reason: q('#spec-refused-reason').textContent,
      output: q('#spec-refused-output').textContent,
      origin: q('#spec-problem').dataset.origin,
      lastError: visible('#spec-last-error') ? q('#spec-last-error').textContent : null,
    } : null,
    history: [...document.querySelectorAll('#spec-history tbody tr')].map((tr) => Number(tr.dataset.sequence)),
    versionsStatus: q('#spec-versions-status')?.textContent ?? '',
  };
};

/** Selects `from` in the open file's text (its first occurrence) and types `to` over it, as a
 * person does: the editor's own selection, then keystrokes. */
async function typeOver(page, from, to) {
  const found = await page.evaluate((from) => {
    const cm = document.querySelector('#spec-editor .CodeMirror').CodeMirror;
    const lines = cm.getValue().split('\n');
    const line = lines.findIndex((l) => l.includes(from));
    if (line < 0) return false;
    const ch = lines[line].indexOf(from);
    cm.focus();
    cm.setSelection({ line, ch }, { line, ch: ch + from.length });
    return true;
  }, from);
  assert.ok(found, `${from} is not in the editor`);
  await page.keyboard.type(to);
}

async function view(page, what, ms, ok) {
  let last = null;
  return waitFor(what, ms, async () => {
    last = await page.evaluate(readView);
    return ok(last) ? last : null;
  }).catch((e) => {
    throw new Error(`${e.message}\nview: ${JSON.stringify(last)}`);
  });
}

describe('the Spec view in Chromium', { timeout: 300_000 }, () => {
  before(guarded(() => startSwarm({ shots: Object.values(SHOT) })), { timeout: 120_000 });
  after(cleanup, { timeout: 60_000 });

  const T = { page: null, first: null, edited: null };

  test('1. the Spec view lists the files and opens the locustfile with line numbers and Python highlighting', { timeout: 30_000 }, guarded(async () => {
    const ctx = await S.browser.newContext({
      ignoreHTTPSErrors: true,
      httpCredentials: { username: 'fleet', password: S.password },
      viewport: { width: 1400, height: 1000 },
    });
    const page = (T.page = await ctx.newPage());
    T.problems = [];
    // Refused saves are answered 409 and 422 on purpose, and Chromium logs each answer that is
    // not a success: those lines are left out; a script error or a blocked file (CSP) is not.
    page.on('console', (m) => {
      if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) T.problems.push(m.text());
    });
    page.on('response', (r) => {
      const p = new URL(r.url()).pathname;
      if (p.startsWith('/ui/') && r.status() !== 200) T.problems.push(`${p}: HTTP ${r.status()}`);
    });
    page.on('pageerror', (e) => T.problems.push(e.message));
    const elsewhere = [];
    page.on('request', (r) => {
      if (new URL(r.url()).origin !== S.url) elsewhere.push(r.url());
    });
    const assets = [];
    page.on('response', (r) => {
      if (new URL(r.url()).pathname.startsWith('/ui/')) assets.push(r);
    });
    T.first = await currentSpec();
    try {
      await page.goto(`${S.url}/`);
      await page.waitForFunction(() => document.body.dataset.ready === '1', null, { timeout: 15_000 });
      await page.click('#view-spec');
      const v = await view(page, 'the locustfile open in the editor', 15_000,
        (v) => v.view === 'spec' && v.path === 'locustfile.py' && v.value?.includes(S.firstPath));
      assert.equal(v.base, T.first.sequence, 'based on the current version');
      assert.equal(v.saveEnabled, false, 'nothing to save yet');
      assert.deepEqual(await page.$$eval('#spec-tree li[data-kind=file]', (l) => l.map((li) => li.dataset.path)), ['locustfile.py']);
      const lines = v.value.split('\n').length;
      const numbers = await page.$$eval('#spec-editor .CodeMirror-linenumber', (l) => l.map((e) => e.textContent));
      assert.ok(numbers.includes('1') && numbers.includes(String(lines)), `line numbers 1..${lines}: ${numbers}`);
      const keywords = await page.$$eval('#spec-editor .cm-keyword', (l) => l.map((e) => e.textContent));
      for (const k of ['from', 'import', 'class', 'def']) assert.ok(keywords.includes(k), `${k} is not highlighted as a keyword: ${keywords}`);
      assert.ok(await page.$('#spec-editor .cm-string'), 'strings are highlighted');
      // The editor's files come from the controller, tagged, cached for long, with their types.
      const js = assets.find((r) => new URL(r.url()).pathname === '/ui/vendor/codemirror/codemirror.js');
      assert.ok(js, `codemirror.js was not loaded from /ui/: ${assets.map((r) => r.url())}`);
      assert.equal(js.status(), 200);
      assert.match((await js.allHeaders())['content-type'], /^text\/javascript/);
      assert.match((await js.allHeaders())['cache-control'], /max-age=31536000/);
      assert.deepEqual(elsewhere, [], 'the page fetched from another origin');
      assert.deepEqual(T.problems, [], 'errors in the page (a blocked script or style?)');
    } finally {
      await shot(page, SHOT.open);
    }
  }));

  test('2. a path changed in the editor and saved reaches the master and the agents within seconds', { timeout: 60_000 }, guarded(async () => {
    const page = T.page;
    assert.ok(page, 'test 1 did not open the page');
    await typeOver(page, S.firstPath, '/gamma');
    assert.ok((await page.evaluate(readView)).saveEnabled, 'Save is enabled after an edit');
    const t0 = Date.now();
    await page.click('#spec-save');
    const v = await view(page, 'the save published', 30_000, (v) => /^published #/.test(v.status));
    const saved = Date.now() - t0;
    const cur = await currentSpec();
    assert.notEqual(cur.sha256, T.first.sha256);
    assert.equal(cur.sequence, v.base, 'the editor is now based on what it published');
    assert.equal(cur.origin, 'edit locustfile.py');
    assert.ok(v.value.includes('self.client.get("/gamma")'));
    T.edited = cur;
    await waitFor('the tree showing the new version', 5_000, async () =>
      (await page.locator('#spec-files-version').textContent()).startsWith(`#${cur.sequence} `));
    await waitFor(`${NODES} agents running ${cur.sha256.slice(0, 12)}`, FOLLOW_MS, async () => {
      const r = await api('/api/nodes');
      return r.json?.length === NODES && r.json.every((n) => n.running?.sha256 === cur.sha256 && n.workers.every((w) => w.state === 'running'));
    });
    const agents = Date.now() - t0;
    let last = null;
    await waitFor('requests to /gamma in the master\'s /stats/requests', FOLLOW_MS, async () => {
      last = (await api('/locust/stats/requests')).json;
      return last?.stats?.some((x) => x.name === '/gamma' && x.num_requests > 0);
    }).catch((e) => {
      throw new Error(`${e.message}: ${JSON.stringify(last?.stats?.map((x) => `${x.name}:${x.num_requests}`))}`);
    });
    const master = Date.now() - t0;
    console.log(`save answered in ${saved} ms; both agents on the new sha after ${agents} ms; /gamma in the master's stats after ${master} ms`);
  }));

  test('3. a syntax error is refused beside the editor and nothing is published', { timeout: 40_000 }, guarded(async () => {
    const page = T.page;
    await page.evaluate(() => {
      const cm = document.querySelector('#spec-editor .CodeMirror').CodeMirror;
      cm.focus();
      cm.setCursor({ line: 0, ch: 0 });
    });
    await page.keyboard.type('def broken(:\n');
    await page.click('#spec-save');
    const v = await view(page, 'the refusal beside the editor', 30_000, (v) => v.problem && /not published/.test(v.status));
    assert.match(v.problem.reason, /SyntaxError/);
    assert.match(v.problem.output, /locustfile\.py/, 'Locust\'s output lines are shown');
    assert.equal(v.problem.origin, 'this page');
    const box = await page.locator('#spec-problem').boundingBox();
    const ed = await page.locator('#spec-editor').boundingBox();
    assert.ok(box && ed && box.x >= ed.x + ed.width - 1 && box.y < ed.y + ed.height, `the error is not beside the editor: ${JSON.stringify({ box, ed })}`);
    await shot(page, SHOT.refused);
    // Nothing published, now or a moment later; the agents keep their bundle.
    await new Promise((r) => setTimeout(r, 2_000));
    const spec = (await api('/api/spec')).json;
    assert.equal(spec.current.sequence, T.edited.sequence, 'the sequence moved');
    assert.equal(spec.current.sha256, T.edited.sha256);
    assert.match(spec.refused?.reason ?? '', /SyntaxError/);
    const nodes = (await api('/api/nodes')).json;
    assert.ok(nodes.every((n) => n.running?.sha256 === T.edited.sha256), 'an agent left the published bundle');
    assert.ok(v.value.startsWith('def broken(:'), 'the edit is kept in the editor');
    // Revert: the published text again, nothing to save.
    await page.click('#spec-revert');
    const back = await page.evaluate(readView);
    assert.ok(!back.value.includes('broken') && back.value.includes('/gamma'));
    assert.equal(back.saveEnabled, false);
  }));

  test('4. an edit on disk that the gate refuses shows in the Spec view', { timeout: 40_000 }, guarded(async () => {
    const page = T.page;
    writeSpec(locustfile('Web', [['gamma', '/gamma']]).replace('from locust import', 'from locust import nosuchname,'));
    const v = await view(page, 'the refused disk edit', 30_000,
      (v) => v.problem?.origin === 'directory' && /ImportError/.test(v.problem.reason));
    assert.match(v.problem.output, /nosuchname/);
    assert.equal((await currentSpec()).sequence, T.edited.sequence, 'the refused edit was published');
    // The directory back at the current content: the refusal goes away.
    writeSpec(locustfile('Web', [['alpha', '/gamma']]));
    await view(page, 'the refusal gone', 20_000, (v) => v.problem === null);
    assert.equal((await currentSpec()).sha256, T.edited.sha256);
  }));

  test('5. a diff of two versions from the history shows the path change, colored', { timeout: 20_000 }, guarded(async () => {
    const page = T.page;
    await view(page, 'both versions in the history', 10_000,
      (v) => v.history.includes(T.first.sequence) && v.history.includes(T.edited.sequence));
    await page.check(`input[name=spec-diff-from][value="${T.first.sequence}"]`);
    await page.check(`input[name=spec-diff-to][value="${T.edited.sequence}"]`);
    await page.click('#spec-diff-show');
    const file = page.locator('#spec-diff .diff-file[data-path="locustfile.py"]');
    await file.waitFor({ timeout: 10_000 });
    assert.equal(await page.locator('#spec-diff').getAttribute('data-from'), String(T.first.sequence));
    assert.equal(await file.getAttribute('data-change'), 'modified');
    const lines = await file.locator('pre.diff span').evaluateAll((l) => l.map((s) => [s.className, s.textContent, getComputedStyle(s).backgroundColor]));
    const del = lines.find(([c, t]) => c === 'del' && t.includes(`"${S.firstPath}"`));
    const add = lines.find(([c, t]) => c === 'add' && t.includes('"/gamma"'));
    assert.ok(del && add, `the path change is not in the diff: ${JSON.stringify(lines)}`);
    assert.notEqual(del[2], add[2], 'added and removed lines look the same');
    assert.ok(lines.some(([c]) => c === 'hunk'));
    await shot(page, SHOT.diff);
  }));

  test('6. roll back to the first version: a new sequence with the old sha', { timeout: 60_000 }, guarded(async () => {
    const page = T.page;
    page.once('dialog', (d) => d.accept());
    await page.click(`#spec-history tr[data-sequence="${T.first.sequence}"] button.rollback`);
    const cur = await waitFor('the rollback published', 20_000, async () => {
      const c = await currentSpec();
      return c && c.sequence > T.edited.sequence ? c : null;
    });
    assert.equal(cur.sha256, T.first.sha256, 'the rollback published other content');
    assert.equal(cur.origin, `rollback to ${T.first.sequence}`);
    // The editor, with no edit pending, follows.
    const v = await view(page, 'the editor on the rolled-back version', 15_000,
      (v) => v.base === cur.sequence && v.value.includes(`"${S.firstPath}"`) && /published #/.test(v.versionsStatus));
    assert.equal(v.history[0], cur.sequence);
    T.rolled = cur;
    await waitFor(`${NODES} agents back on ${cur.sha256.slice(0, 12)}`, FOLLOW_MS, async () => {
      const r = await api('/api/nodes');
      return r.json?.length === NODES && r.json.every((n) => n.running?.sha256 === cur.sha256);
    });
  }));

  test('7. a save based on a version someone replaced since is refused with the API\'s message, and reload shows theirs', { timeout: 60_000 }, guarded(async () => {
    const page = T.page;
    const base = (await page.evaluate(readView)).base;
    assert.equal(base, T.rolled.sequence);
    await typeOver(page, S.firstPath, '/delta');
    // Someone else publishes in between (the CLI's route, the operator token).
    const theirs = locustfile('Web', [['alpha', '/epsilon']]);
    const r = await api(`/api/spec/file?path=locustfile.py&base=${base}`, { method: 'PUT', send: theirs });
    assert.equal(r.status, 200, r.body);
    const published = r.json.published;
    await page.click('#spec-save');
    const v = await view(page, 'the stale save refused', 20_000, (v) => /not saved/.test(v.status) && v.notice);
    assert.match(v.notice, new RegExp(`the spec changed since version ${base}`));
    assert.ok(v.value.includes('/delta'), 'the edit is kept until reload');
    await shot(page, SHOT.conflict);
    assert.equal((await currentSpec()).sequence, published.sequence, 'the stale save published');
    await page.click('#spec-reload');
    const after = await view(page, 'the current version reloaded', 10_000, (v) => v.base === published.sequence && v.notice === null);
    assert.equal(after.value, theirs);
    assert.deepEqual(T.problems, [], 'errors in the page');
  }));
});
