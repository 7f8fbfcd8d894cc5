// The dashboard's Spec view (docs/protocol.md, "Editing the spec"): the current version's
// files, an editor (CodeMirror 5, vendored), Save through `PUT /api/spec/file` with the version
// the file was loaded from, a diff of two versions from the history, and roll back.
//
// Loaded by dashboard.html before its own script. The dashboard hands every `/api/spec` it
// gets (event stream or polling) to this view as a `fleet:spec` event on `document`. Every
// value from the controller is written as text, never as HTML.
"use strict";
(function () {
  const $ = id => document.getElementById(id);
  const DASH = "\u2014";
  const short = sha => (typeof sha === "string" ? sha.slice(0, 12) : "");
  function text(el, v) {
    const s = v === null || v === undefined ? "" : String(v);
    if (el.textContent !== s) el.textContent = s;
  }
  function show(el, on) { el.classList.toggle("hidden", !on); }

  // ---- state: everything the view shows is rendered from these -----------------------------

  const S = {
    spec: null,          // the last /api/spec
    tree: null,          // /api/spec/files of the version the tree shows
    path: null,          // the open file
    base: null,          // the sequence the open file was loaded from (what Save sends)
    loadedSha: null,     // that version's bundle sha256
    clean: "",           // the open file's text as loaded (or last saved)
    editable: false,
    saving: false,
    conflict: null,      // a 409's body: {error, current}
    refusal: null,       // a 422's body from this page's last change: {error, refused}
    status: "",
    historyKey: null,
  };
  let cm = null;

  async function call(method, url, body, type) {
    const init = { method, cache: "no-store", credentials: "same-origin", headers: {} };
    if (body !== undefined) {
      init.body = body;
      init.headers["Content-Type"] = type;
    }
    const r = await fetch(url, init);
    const raw = await r.text();
    let json = null;
    try { json = JSON.parse(raw); } catch (e) { /* not JSON */ }
    return { status: r.status, headers: r.headers, json, raw };
  }
  const errorOf = r => (r.json && r.json.error) || r.raw.trim() || "HTTP " + r.status;

  function dirty() { return !!cm && S.editable && cm.getValue() !== S.clean; }

  // ---- the view: shown for #spec -------------------------------------------------------------

  function route() {
    const spec = location.hash === "#spec";
    document.body.dataset.view = spec ? "spec" : "overview";
    if (!spec) return;
    ensureEditor();
    cm.refresh();
    // First shown, or a version was published while another view was open.
    const cur = S.spec && S.spec.current;
    if (!S.tree || (cur && cur.sha256 !== S.loadedSha && !dirty())) refreshSpec().then(() => loadTree(true));
  }

  function ensureEditor() {
    if (cm) return;
    cm = window.CodeMirror($("spec-editor"), {
      value: "",
      mode: "python",
      lineNumbers: true,
      indentUnit: 4,
      readOnly: true,
      extraKeys: { "Ctrl-S": () => save(), "Cmd-S": () => save(), Tab: c => c.execCommand("insertSoftTab") },
    });
    cm.on("changes", renderBar);
  }

  async function refreshSpec() {
    const r = await call("GET", "/api/spec");
    if (r.status === 200 && r.json) onSpec(r.json);
  }

  // ---- the tree -----------------------------------------------------------------------------

  // Lists the current version's files; then opens the locustfile (`openDefault`, or when no
  // file is open), or the open file again at that version (when it is still there).
  async function loadTree(openDefault, reopen = true) {
    const r = await call("GET", "/api/spec/files?version=current");
    if (r.status !== 200) {
      S.tree = null;
      setStatus("cannot list the spec's files: " + errorOf(r));
      renderTree();
      return;
    }
    S.tree = r.json;
    renderTree();
    const files = S.tree.files.filter(f => f.kind === "file");
    const keep = S.path && files.some(f => f.path === S.path);
    if (keep && !reopen) return;
    if (keep) return openFile(S.path);
    if (!openDefault && S.path) return;
    const lf = S.spec && S.spec.rules ? S.spec.rules.locustfile : "locustfile.py";
    const first = files.find(f => f.path === lf) || files.find(f => f.path.endsWith(".py")) || files[0];
    if (first) await openFile(first.path);
  }

  function renderTree() {
    const t = S.tree;
    const v = t && t.version;
    text($("spec-files-version"), v ? "#" + v.sequence + " " + short(t.sha256) : "");
    const items = ((t && t.files) || []).map(f => {
      const li = document.createElement("li");
      const depth = f.path.split("/").length - 1;
      const name = f.path.split("/").pop();
      li.style.paddingLeft = depth * 14 + "px";
      li.dataset.path = f.path;
      li.dataset.kind = f.kind;
      if (f.kind === "dir") {
        li.textContent = name + "/";
        li.className = "dir";
      } else {
        const b = document.createElement("button");
        b.type = "button";
        b.textContent = name;
        b.title = f.path + " (" + f.size + " bytes" + (f.executable ? ", executable" : "") + (f.text ? "" : ", binary") + ")";
        li.appendChild(b);
        if (f.path === S.path) li.className = "open";
      }
      return li;
    });
    $("spec-tree").replaceChildren(...items);
  }

  $("spec-tree").addEventListener("click", e => {
    const li = e.target.closest("li[data-kind=file]");
    if (!li || li.dataset.path === S.path) return;
    if (dirty() && !window.confirm("Discard your changes to " + S.path + "?")) return;
    openFile(li.dataset.path);
  });

  // ---- the editor ---------------------------------------------------------------------------

  async function openFile(path) {
    const seq = S.tree && S.tree.version ? S.tree.version.sequence : "current";
    const r = await call("GET", "/api/spec/file?version=" + seq + "&path=" + encodeURIComponent(path));
    if (r.status !== 200) {
      setStatus("cannot open " + path + ": " + errorOf(r));
      return;
    }
    const isText = (r.headers.get("content-type") || "").startsWith("text/");
    S.path = path;
    S.base = Number(r.headers.get("x-fleet-sequence"));
    S.loadedSha = r.headers.get("x-fleet-sha256");
    S.editable = isText;
    S.clean = isText ? r.raw : "";
    S.conflict = null;
    S.refusal = null;
    cm.setOption("mode", /\.pyi?$/.test(path) ? "python" : null);
    cm.setOption("readOnly", !isText);
    cm.setValue(isText ? r.raw : "(a binary file: it cannot be edited here)");
    cm.clearHistory();
    setStatus("");
    renderTree();
    renderBar();
    renderProblem();
  }

  async function save() {
    if (!dirty() || S.saving) return;
    S.saving = true;
    renderBar();
    const body = cm.getValue();
    const path = S.path;
    try {
      const r = await call("PUT", "/api/spec/file?path=" + encodeURIComponent(path) + "&base=" + S.base, body, "text/plain; charset=utf-8");
      if (r.status === 200 && r.json) {
        const v = r.json.published;
        S.base = v.sequence;
        S.loadedSha = v.sha256;
        S.clean = body;
        S.conflict = null;
        S.refusal = null;
        loadTree(false, false);
        setStatus(r.json.changed ? "published #" + v.sequence + " (" + short(v.sha256) + ")" : "no change: #" + v.sequence + " already has this content");
      } else if (r.status === 409) {
        S.conflict = r.json || { error: errorOf(r) };
        setStatus("not saved: the spec changed since you opened it");
      } else if (r.status === 422 && r.json && r.json.refused) {
        S.refusal = r.json;
        setStatus("not published: the validation gate refused it");
      } else {
        setStatus("not saved: " + errorOf(r));
      }
    } catch (e) {
      setStatus("not saved: cannot reach the controller (" + e.message + ")");
    } finally {
      S.saving = false;
      renderBar();
      renderProblem();
    }
  }

  // Reload the open file at the current version (discarding an edit).
  async function reload() {
    S.conflict = null;
    S.refusal = null;
    await refreshSpec();
    await loadTree(false);
  }

  $("spec-save").addEventListener("click", save);
  $("spec-revert").addEventListener("click", () => {
    if (!dirty()) return;
    cm.setValue(S.clean);
    S.refusal = null;
    setStatus("");
    renderProblem();
  });
  $("spec-reload").addEventListener("click", reload);

  function setStatus(s) { S.status = s; text($("spec-status"), s); }

  function renderBar() {
    if (!cm) return;
    text($("spec-path"), S.path || DASH);
    const base = $("spec-base");
    text(base, S.base ? "based on #" + S.base : "");
    base.dataset.base = S.base || "";
    const d = dirty();
    document.body.classList.toggle("spec-dirty", d);
    $("spec-save").disabled = !d || S.saving;
    $("spec-revert").disabled = !d || S.saving;
    renderNotice();
  }

  // Above the editor: a refused save's 409, or a version published since the file was loaded.
  function renderNotice() {
    const cur = S.spec && S.spec.current;
    let msg = "";
    if (S.conflict) {
      const c = S.conflict.current;
      msg = S.conflict.error + (c ? " (now #" + c.sequence + ", " + short(c.sha256) + ")" : "") + ". Reload discards your edit.";
    } else if (cur && S.loadedSha && cur.sha256 !== S.loadedSha && !S.saving && dirty()) {
      msg = "Version #" + cur.sequence + " (" + (cur.origin || "?") + ") was published since you opened this file: Save will be refused. Copy your change, then reload.";
    }
    text($("spec-notice-text"), msg);
    show($("spec-notice"), !!msg);
  }

  // Beside the editor: the validation gate's refusal (this page's save or rollback, or the last
  // one the controller knows of, such as an edit on disk) and the last spec error.
  function renderProblem() {
    const own = S.refusal && S.refusal.refused;
    const r = own || (S.spec && S.spec.refused) || null;
    const last = S.spec && S.spec.last_error;
    const lastShown = last && !(r && last.includes(r.reason)) ? last : "";
    text($("spec-refused-reason"), r ? r.reason : "");
    text($("spec-refused-meta"), r ? (own ? "Your change" : "A change (" + (r.origin || "?") + ")") +
      " was refused by the validation gate" + (r.at ? " at " + r.at : "") + "; nothing was published and the nodes keep #" +
      (S.spec && S.spec.current ? S.spec.current.sequence : "?") + "." : "");
    text($("spec-refused-output"), r && r.output ? r.output.join("\n") : "");
    show($("spec-refused-output"), !!(r && r.output && r.output.length));
    text($("spec-last-error"), lastShown ? "last spec error: " + lastShown : "");
    show($("spec-last-error"), !!lastShown);
    show($("spec-problem"), !!(r || lastShown));
    $("spec-problem").dataset.origin = r ? (own ? "this page" : r.origin || "") : "";
  }

  // ---- versions: diff and roll back ---------------------------------------------------------

  function renderHistory() {
    const hist = (S.spec && S.spec.history) || [];
    const key = JSON.stringify(hist);
    if (key === S.historyKey) return;
    S.historyKey = key;
    const picked = name => { const el = document.querySelector("input[name=" + name + "]:checked"); return el ? el.value : null; };
    const from = picked("spec-diff-from") || (hist[1] ? String(hist[1].sequence) : null);
    const to = picked("spec-diff-to") || (hist[0] ? String(hist[0].sequence) : null);
    const cur = S.spec && S.spec.current ? S.spec.current.sha256 : null;
    const rows = hist.map(v => {
      const tr = document.createElement("tr");
      tr.dataset.sequence = String(v.sequence);
      tr.dataset.sha = v.sha256;
      const cell = () => tr.appendChild(document.createElement("td"));
      for (const [name, want] of [["spec-diff-from", from], ["spec-diff-to", to]]) {
        const input = document.createElement("input");
        input.type = "radio";
        input.name = name;
        input.value = String(v.sequence);
        input.checked = input.value === want;
        input.setAttribute("aria-label", (name.endsWith("from") ? "diff from #" : "diff to #") + v.sequence);
        cell().appendChild(input);
      }
      text(cell(), "#" + v.sequence);
      const sha = cell();
      sha.className = "mono";
      sha.title = v.sha256;
      text(sha, short(v.sha256));
      text(cell(), v.origin || "");
      text(cell(), v.created);
      const b = document.createElement("button");
      b.type = "button";
      b.className = "rollback";
      b.textContent = v.sha256 === cur ? "current content" : "roll back to this version";
      b.disabled = v.sha256 === cur;
      cell().appendChild(b);
      return tr;
    });
    $("spec-history").tBodies[0].replaceChildren(...rows);
  }

  function pickedPair() {
    const get = name => { const el = document.querySelector("input[name=" + name + "]:checked"); return el ? el.value : null; };
    return [get("spec-diff-from"), get("spec-diff-to")];
  }

  async function showDiff() {
    const [from, to] = pickedPair();
    const out = $("spec-diff");
    if (!from || !to) {
      text($("spec-versions-status"), "pick two versions: one in the from column, one in the to column");
      return;
    }
    const r = await call("GET", "/api/spec/diff?from=" + encodeURIComponent(from) + "&to=" + encodeURIComponent(to));
    if (r.status !== 200 || !r.json) {
      text($("spec-versions-status"), "cannot diff #" + from + " and #" + to + ": " + errorOf(r));
      return;
    }
    text($("spec-versions-status"), "");
    out.dataset.from = from;
    out.dataset.to = to;
    const head = document.createElement("p");
    head.className = "muted";
    head.textContent = "#" + from + " \u2192 #" + to + ": " + (r.json.files.length ? r.json.files.length + " file(s) differ" : "no difference");
    const files = r.json.files.map(f => {
      const div = document.createElement("div");
      div.className = "diff-file";
      div.dataset.path = f.path;
      div.dataset.change = f.change;
      const h = document.createElement("div");
      h.className = "diff-head";
      h.textContent = f.path + " (" + f.change + ")";
      const pre = document.createElement("pre");
      pre.className = "diff";
      for (const line of f.diff.replace(/\n$/, "").split("\n")) {
        const span = document.createElement("span");
        span.className = diffClass(line);
        span.textContent = line;
        pre.appendChild(span);
      }
      div.append(h, pre);
      return div;
    });
    out.replaceChildren(head, ...files);
  }

  function diffClass(line) {
    if (line.startsWith("+++") || line.startsWith("---") || /^(old|new) mode /.test(line) || line.startsWith("Binary files")) return "meta";
    if (line.startsWith("@@")) return "hunk";
    if (line.startsWith("+")) return "add";
    if (line.startsWith("-")) return "del";
    return "ctx";
  }

  async function rollback(seq) {
    if (!window.confirm("Roll back to version #" + seq + "? Its content is published again as a new version, and every node switches to it.")) return;
    const st = $("spec-versions-status");
    text(st, "rolling back to #" + seq + " ...");
    const r = await call("POST", "/api/spec/rollback", JSON.stringify({ sequence: Number(seq) }), "application/json");
    if (r.status === 200 && r.json) {
      const v = r.json.published;
      text(st, r.json.changed ? "rolled back to #" + seq + ": published #" + v.sequence + " (" + short(v.sha256) + ")" : "#" + seq + " has the current content: nothing published");
    } else if (r.status === 422 && r.json && r.json.refused) {
      S.refusal = r.json;
      renderProblem();
      text(st, "not rolled back: the validation gate refused #" + seq + " (see beside the editor)");
    } else {
      text(st, "not rolled back: " + errorOf(r));
    }
  }

  $("spec-diff-show").addEventListener("click", showDiff);
  $("spec-history").addEventListener("change", e => { if (e.target.matches("input[type=radio]")) showDiff(); });
  $("spec-history").addEventListener("click", e => {
    const b = e.target.closest("button.rollback");
    if (b && !b.disabled) rollback(b.closest("tr").dataset.sequence);
  });

  // ---- from the dashboard: each /api/spec -----------------------------------------------------

  function onSpec(spec) {
    const before = S.spec && S.spec.current ? S.spec.current.sha256 : null;
    S.spec = spec;
    const now = spec && spec.current ? spec.current.sha256 : null;
    renderHistory();
    renderProblem();
    renderNotice();
    if (!cm || document.body.dataset.view !== "spec") return;
    // A new version: follow it when nothing would be lost (a save from this page is already on it).
    if (now && now !== before && !S.saving && !dirty() && now !== S.loadedSha) loadTree(false);
  }

  document.addEventListener("fleet:spec", e => onSpec(e.detail));
  window.addEventListener("hashchange", route);
  route();
})();
