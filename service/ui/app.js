// The live page of dhub batches: plain JavaScript, no build step, no dependencies.
//
// Views (in the URL fragment): #/ pipelines, #/p/<pipeline> its batches, #/p/<pipeline>/<batch>
// one batch. The token is typed into the login form or given once as #token=<token>; either
// way it is kept in sessionStorage (this tab only) and the fragment is wiped from the location
// and the history at once. Every API call carries it in the Authorization header: the streams
// use fetch() rather than EventSource, which cannot set headers, so the token is never in a URL.
"use strict";

(() => {
  const API = "/api/v1";
  const TOKEN_KEY = "dhub.token";
  const LIST_LIMIT = 50;
  // The server sends a keep-alive comment every 15 s: a stream silent for longer than two of
  // them is dead even if the connection looks open (a proxy or a sleeping laptop), so reopen it.
  const SILENT_MS = 40000;
  const RETRY_MAX_MS = 10000;

  const $ = (id) => document.getElementById(id);
  const num = (n) => (typeof n === "bigint" ? n : Number(n)).toLocaleString("en-US");
  // A step's records over its partitions, as "1,234 records". Each offset is at most
  // 2**53 - 1 (exact as a number), their sum need not be: summed as a BigInt.
  const records = (offsets) => {
    const done = Object.values(offsets || {}).reduce((sum, n) =>
      sum + BigInt(Number.isInteger(n) ? n : Math.trunc(Number(n)) || 0), 0n);  // never throws
    return `${num(done)} ${done === 1n ? "record" : "records"}`;
  };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // In the reader's zone, named: the API's times are UTC, and a bare "11:21 PM" cannot be
  // told apart from the same clock time elsewhere (a screenshot passed to a colleague).
  function when(iso) {
    if (!iso) return "";
    const date = new Date(iso);
    return isNaN(date) ? iso : date.toLocaleString(undefined, { timeZoneName: "short" });
  }

  function badge(state, extra) {
    return el("span", { class: `badge ${state || "none"}`, dataset: { state: state || "none" } },
      extra || state || "none");
  }

  // --- token ---------------------------------------------------------------------------------
  const token = () => sessionStorage.getItem(TOKEN_KEY);

  // What an HTTP header can carry (as `dhub` checks): ASCII, spaces and tabs included. A
  // pasted curly quote would make every request throw, the page then "reconnecting" for ever.
  const UNCARRIABLE = "The token holds a character no HTTP header can carry (not ASCII, or a " +
    "control character): copy it again.";
  const carriable = (value) => /^[\x20-\x7e\t]+$/.test(value);

  // Takes a `#token=` link's token; answers why it was not taken, if it was not.
  function takeFragmentToken() {
    const match = /^#token=([^&]*)/.exec(location.hash);
    if (!match) return undefined;
    // Off the location bar and out of the history before anything else can read it.
    history.replaceState(null, "", location.pathname + location.search);
    let value;
    try {
      value = decodeURIComponent(match[1]).trim();
    } catch {
      return "The link's token was malformed (cut short?): sign in with the token itself.";
    }
    if (!value) return undefined;
    if (!carriable(value)) return UNCARRIABLE;
    sessionStorage.setItem(TOKEN_KEY, value);
    return undefined;
  }

  class SignedOut extends Error {}
  const MAY_NOT_READ = "This token may not read batches (it lacks the scope batches:read).";

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    render(message);
    return new SignedOut(message || "signed out");
  }

  // --- API calls -----------------------------------------------------------------------------
  function headers(extra) {
    return { Authorization: `Bearer ${token()}`, ...extra };
  }

  async function api(method, path, extra) {
    const response = await fetch(API + path, {
      method, headers: headers({ Accept: "application/json", ...extra }), cache: "no-store",
    });
    let body = null;
    try { body = await response.json(); } catch { /* an empty or non-JSON body */ }
    if (response.status === 401) throw signOut("The API refused the token (401): sign in again.");
    if (!response.ok) {
      const message = body && body.error ? body.error.message : response.statusText;
      throw Object.assign(new Error(`${method} ${path}: ${response.status} ${message}`),
                          { status: response.status, code: body && body.error && body.error.code });
    }
    return body;
  }

  // Runs a batch: one Idempotency-Key for the click, its retries included, so an answer lost
  // on the way back (the batch had started) brings back that batch's id, not an error while
  // it runs (and a second batch from the obvious second click). Retried: no answer, a 5xx
  // (the key was released) and 409 in_progress (the first attempt is still on its way).
  async function runBatch(path) {
    const key = [...crypto.getRandomValues(new Uint8Array(16))]
      .map((b) => b.toString(16).padStart(2, "0")).join("");  // randomUUID needs https
    for (let attempt = 0; ; attempt++) {
      try {
        return await api("POST", path, { "Idempotency-Key": key });
      } catch (err) {
        const again = !(err instanceof SignedOut) && attempt < 4 &&
          (err.status === undefined || err.status >= 500 || err.code === "in_progress");
        if (!again) throw err;
      }
      await new Promise((resolve) => setTimeout(resolve, 1000 * 2 ** attempt));
    }
  }

  // --- live status in the header ---------------------------------------------------------------
  function setLive(state) {
    const node = $("live");
    node.hidden = state === "none";  // a view without a stream
    const text = { on: "live", connecting: "connecting…", wait: "reconnecting…", off: "offline",
                   done: "final", none: "" }[state];
    node.className = `live ${{ done: "off", connecting: "wait" }[state] || state}`;
    node.textContent = text;
  }

  // A Server-Sent Events stream read with fetch(), reopened whenever it drops. `final` names
  // the events after which the server closes the stream for good (no reconnect then).
  // Resuming with Last-Event-ID makes the server send only what is newer than the last id.
  function openStream(path, { onEvent, onOpen, onMissing, onRefused, final = [], resume = false }) {
    let closed = false;
    let left = false;  // closed by its view, which is gone: the header is the next view's
    let controller = null;
    let retryTimer = null;
    let silentTimer = null;
    let attempt = 0;
    let lastId = null;

    const retry = () => {
      if (closed) return;
      setLive("wait");
      const delay = Math.min(RETRY_MAX_MS, 500 * 2 ** attempt++) * (0.75 + Math.random() / 2);
      retryTimer = setTimeout(connect, delay);
    };
    const armSilence = () => {
      clearTimeout(silentTimer);
      silentTimer = setTimeout(() => controller && controller.abort(), SILENT_MS);
    };

    async function connect() {
      if (closed) return;
      controller = new AbortController();
      const extra = { Accept: "text/event-stream" };
      if (resume && lastId) extra["Last-Event-ID"] = lastId;
      let response;
      try {
        response = await fetch(API + path, { headers: headers(extra), signal: controller.signal,
                                             cache: "no-store" });
      } catch {
        return retry();
      }
      if (closed) return;
      if (response.status === 401) { signOut("The API refused the token (401): sign in again."); return; }
      if (response.status === 404) { setLive("off"); if (onMissing) onMissing(); return; }
      if (response.status === 403) {  // retrying cannot help: the token lacks batches:read
        setLive("off");
        const why = MAY_NOT_READ;
        // Said in the view, which stays: a flash alone went after 12 s, leaving "Loading…".
        if (onRefused) onRefused(why);
        flash(why, "error");
        return;
      }
      // Any other refusal of the request itself (400: an id the API cannot take) is the same
      // on every retry: said, not retried as if the API were away ("reconnecting…" for ever).
      if (response.status >= 400 && response.status < 500 && ![408, 429].includes(response.status)) {
        let message = response.statusText;
        try { message = (await response.json()).error.message || message; } catch { /* not JSON */ }
        if (closed) return;
        setLive("off");
        const why = `The API refused this view's request (${response.status}): ${message}`;
        if (onRefused) onRefused(why);
        flash(why, "error");
        return;
      }
      if (!response.ok || !response.body) return retry();
      attempt = 0;
      setLive("on");
      if (onOpen) onOpen();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      armSilence();
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          armSilence();
          buffer += value.replace(/\r\n?/g, "\n");
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            const message = parseEvent(block);
            if (!message) continue;  // a comment (keep-alive)
            if (message.id !== null) lastId = message.id;
            if (final.includes(message.event)) closed = true;
            onEvent(message.event, message.data);
          }
        }
      } catch {
        // Dropped, cut off by the server, or aborted by the silence timer: reopen below.
      } finally {
        clearTimeout(silentTimer);
      }
      if (left) return;
      if (closed) setLive("done"); else retry();
    }

    setLive("connecting");
    connect();
    return {
      close() {
        closed = true;
        left = true;
        clearTimeout(retryTimer);
        clearTimeout(silentTimer);
        if (controller) controller.abort();
      },
    };
  }

  function parseEvent(block) {
    let event = "message";
    let id = null;
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "id") id = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length) return null;
    let parsed;
    try { parsed = JSON.parse(data.join("\n")); } catch { return null; }
    return { event, id, data: parsed };
  }

  // --- flash messages ----------------------------------------------------------------------------
  let flashTimer = null;
  function flash(content, kind) {
    const node = $("flash");
    node.replaceChildren(content);
    node.className = kind === "error" ? "error" : "";
    node.hidden = false;
    clearTimeout(flashTimer);
    flashTimer = setTimeout(() => { node.hidden = true; }, kind === "error" ? 12000 : 8000);
  }
  const failed = (error) => {
    if (!(error instanceof SignedOut)) flash(String(error.message || error), "error");
  };

  // --- the views ---------------------------------------------------------------------------------
  function crumbs(pipelineId, batchId) {
    const parts = [el("a", { href: "#/" }, "Pipelines")];
    if (pipelineId) {
      parts.push(el("span", { class: "sep" }, "›"),
        el("a", { href: `#/p/${encodeURIComponent(pipelineId)}` }, pipelineId));
    }
    if (batchId) parts.push(el("span", { class: "sep" }, "›"), el("span", { class: "mono" }, batchId));
    $("crumbs").replaceChildren(...parts);
  }

  function loginView(message) {
    crumbs();
    setLive("none");
    $("logout").hidden = true;
    const view = $("login-view").content.cloneNode(true);
    const form = view.querySelector("#login-form");
    const error = view.querySelector("#login-error");
    if (message) { error.textContent = message; error.hidden = false; }
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const value = form.elements.token.value.trim();
      if (!value) return;
      if (!carriable(value)) { error.textContent = UNCARRIABLE; error.hidden = false; return; }
      sessionStorage.setItem(TOKEN_KEY, value);
      try {
        await api("GET", "/pipelines/");  // proves the token before leaving the form
      } catch (err) {
        // Not proven: not kept, or the next load would count as signed in with it.
        sessionStorage.removeItem(TOKEN_KEY);
        if (!(err instanceof SignedOut)) { error.textContent = String(err.message); error.hidden = false; }
        return;
      }
      render();
    });
    $("main").replaceChildren(view);
    $("token").focus();
    return () => {};
  }

  function pipelinesView() {
    crumbs();
    setLive("none");
    const body = el("tbody", {}, el("tr", {}, el("td", { colspan: 4, class: "empty" }, "Loading…")));
    const load = async () => {
      const data = await api("GET", "/pipelines/");
      const items = Object.values(data.items || {}).sort((a, b) => a.id.localeCompare(b.id));
      if (!items.length) {
        body.replaceChildren(el("tr", {}, el("td", { colspan: 4, class: "empty" },
          "No pipeline registered yet (PUT /api/v1/pipelines/<id>).")));
        return;
      }
      body.replaceChildren(...items.map((p) => {
        const latest = (p.versions || []).find((v) => v.latest) || (p.versions || []).at(-1) || {};
        const href = `#/p/${encodeURIComponent(p.id)}`;
        return el("tr", { class: "link", dataset: { pipelineId: p.id }, onclick: () => { location.hash = href; } },
          el("td", {}, el("a", { href }, p.id)),
          el("td", {}, p.latest || latest.version || ""),
          el("td", {}, (latest.steps || []).map((s) => s.name).join(" → ")),
          el("td", { class: "muted mono" }, p.deployment || ""));
      }));
    };
    // A read that failed is said in the table, which stays ("Loading…" did, once the flash
    // had gone, though nothing was loading any more).
    const refresh = () => load().catch((err) => {
      failed(err);
      if (err instanceof SignedOut) return;
      body.replaceChildren(el("tr", {}, el("td", { colspan: 4, class: "empty error" },
        err.status === 403 ? MAY_NOT_READ : `The pipelines could not be read (${err.message}): Refresh to try again.`)));
    });
    $("main").replaceChildren(
      el("div", { class: "toolbar" }, el("h1", {}, "Pipelines"),
        el("button", { type: "button", onclick: refresh }, "Refresh")),
      el("table", { id: "pipelines" },
        el("thead", {}, el("tr", {}, el("th", {}, "Pipeline"), el("th", {}, "Latest version"),
          el("th", {}, "Steps"), el("th", {}, "Deployment"))),
        body));
    refresh();
    return () => {};
  }

  function stepSquares(steps) {
    return el("span", { class: "steps-mini" }, Object.entries(steps || {}).map(([name, step]) =>
      el("span", { class: step.state, title: `${name}: ${step.state}` })));
  }

  // A step's percent as shown, `digits` decimals, or null without one. Rounded down: 99.5 is
  // not "100". The API's has one decimal, so 9,996 of 10,000 records come as 100.0: while a
  // partition's offset is short of its total, 100 is not said.
  function percentText(step, digits) {
    const percent = step.progress && step.progress.percent;
    if (typeof percent !== "number") return null;
    const scale = 10 ** digits;
    let shown = Math.min(100, Math.floor(percent * scale + 1e-6) / scale);
    const offsets = step.offsets || {};
    const short = Object.entries(step.totals || {}).some(([part, total]) => (offsets[part] || 0) < total);
    if (short && shown >= 100) shown = 100 - 1 / scale;
    return `${shown.toFixed(digits)}%`;
  }

  // The step a batch is at (the running one, else the last one that started) and its records.
  function progressText(batch) {
    const steps = Object.entries((batch.state && batch.state.steps) || {});
    const started = steps.filter(([, s]) => s.state !== "none" && s.state !== "pending");
    const current = steps.find(([, s]) => s.state === "running") || started.at(-1);
    if (!current) return "";
    const [name, step] = current;
    const percent = percentText(step, 0) ? ` (${percentText(step, 0)})` : "";
    return `${name}: ${records(step.offsets)}${percent}`;
  }

  function batchesView(pipelineId) {
    crumbs(pipelineId);
    const batches = new Map();
    const body = el("tbody");
    const enc = encodeURIComponent(pipelineId);
    let scheduled = false;
    let closed = false;
    // Until the list answered once, an empty map says nothing ("No batch yet" would be
    // untrue while the API cannot read the list).
    let loaded = false;
    let refused = null;  // why the API will not list them (403), said in place of the rows
    // How many batches the reader asked to see: the newest page, one more per "older".
    let depth = LIST_LIMIT;
    // The API's token for the page after the rows shown; null: no older batch; undefined:
    // not known (before the first read, or after the oldest rows were let go): "older" then
    // reads the list again from the newest.
    let olderToken;
    // Each stream event's number by batch id, while a read of the list is in flight: what
    // the stream said after the read began is newer than the read's answer and wins over it.
    let events = 0;
    const stamps = new Map();
    let reading = 0;
    let syncs = 0;  // a newer resync (the stream reconnected again) makes an older one moot

    const shown = new Map();  // batch id -> its row: the tr, its cells, what each one shows
    const olderButton = el("button", { type: "button", id: "older", hidden: true,
                                       onclick: () => older().catch(failed) }, "Older batches");
    const draw = () => {
      scheduled = false;
      const rows = [...batches.values()].sort((a, b) =>
        String(b.created_at || "").localeCompare(String(a.created_at || "")) || b.id.localeCompare(a.id));
      for (const id of [...shown.keys()]) if (!batches.has(id)) shown.delete(id);
      olderButton.hidden = !loaded || olderToken === null || refused !== null;
      olderButton.disabled = reading > 0;
      if (refused) {
        body.replaceChildren(el("tr", {}, el("td", { colspan: 6, class: "empty error" }, refused)));
        return;
      }
      if (!rows.length) {
        body.replaceChildren(el("tr", {}, el("td", { colspan: 6, class: "empty" },
          loaded ? "No batch yet: press “Run batch”." : "Loading…")));
        return;
      }
      // Rows and cells are kept and only what changed is redrawn: rebuilt on every change
      // (several a second while a batch runs), a press and its release fell on different
      // nodes and the click that should open the batch was lost.
      const order = rows.map((b) => rowOf(b).tr);
      const current = [...body.children];
      if (order.length !== current.length || order.some((tr, n) => tr !== current[n])) {
        body.replaceChildren(...order);
      }
    };
    const rowOf = (b) => {
      let row = shown.get(b.id);
      if (!row) {
        const href = `#/p/${enc}/${encodeURIComponent(b.id)}`;
        const cells = [el("td", {}, el("a", { href, class: "mono" }, b.id)), el("td"), el("td"),
                       el("td", { class: "num" }), el("td"), el("td", { class: "muted" })];
        const tr = el("tr", { class: "link", dataset: { batchId: b.id },
                              onclick: () => { location.hash = href; } }, cells);
        row = { tr, cells, keys: [] };
        shown.set(b.id, row);
      }
      const state = b.state && b.state.state;
      const steps = (b.state && b.state.steps) || {};
      const parts = [
        [String(state), () => badge(state)],
        [Object.entries(steps).map(([n, st]) => `${n}:${st.state}`).join(" "), () => stepSquares(steps)],
        [progressText(b), (text) => text],
        [b.outcome || "", () => (b.outcome ? badge(b.outcome) : "")],
        [when(b.created_at), (text) => text],
      ];
      row.tr.dataset.state = state || "";
      parts.forEach(([key, make], n) => {
        if (row.keys[n] === key) return;
        row.keys[n] = key;
        row.cells[n + 1].replaceChildren(make(key));
      });
      return row;
    };
    // Changes arrive in bursts (every offset report): draw once per frame at most.
    const redraw = () => { if (!scheduled) { scheduled = true; requestAnimationFrame(draw); } };

    // One read of the list, pages followed from `from` (null: the newest) until `count`
    // batches or the last page. Answers the batches, the next token and the event number it
    // began at (what the stream said after that is newer than these answers).
    const read = async (from, count) => {
      reading += 1;
      redraw();
      const began = events;
      const seen = new Map();
      const told = new Set();  // ids the stream spoke of since the read began
      let next = from;
      try {
        do {
          const query = `?limit=${Math.min(1000, count - seen.size)}` +
            (next ? `&token=${encodeURIComponent(next)}` : "");
          const page = await api("GET", `/batches/${enc}/${query}`);
          for (const [id, batch] of Object.entries(page.items || {})) seen.set(id, batch);
          next = page.token;
        } while (next && seen.size < count && !closed);
      } finally {
        // Taken before the stamps go (once no read is left): after, none would be newer.
        for (const [id, n] of stamps) if (n > began) told.add(id);
        reading -= 1;
        if (!reading) stamps.clear();
        redraw();
      }
      return { seen, next, newer: (id) => told.has(id) };
    };

    // After each (re)connection: the stream starts with the newest page again but says
    // nothing of what changed or went while it was down, so the rows shown are checked
    // against a read of the list as deep as the reader had gone. Until it answers they stay
    // (the header says reconnecting): clearing them showed an empty list, "No batch yet".
    const resync = async () => {
      const mine = ++syncs;
      let answer;
      try {
        answer = await read(null, Math.max(depth, LIST_LIMIT));
      } catch (err) {
        if (!closed && mine === syncs) {
          failed(err);
          setTimeout(() => { if (!closed && mine === syncs) resync(); }, 3000);
        }
        return;
      }
      if (closed || mine !== syncs) return;
      const { seen, next, newer } = answer;
      for (const id of [...batches.keys()]) {
        // Not in the read and nothing said of it since: gone, or older than what was read.
        if (!seen.has(id) && !newer(id)) batches.delete(id);
      }
      for (const [id, batch] of seen) if (!newer(id)) batches.set(id, batch);
      olderToken = next;
      loaded = true;
      redraw();
    };

    const older = async () => {
      if (reading) return;
      if (olderToken) {
        const { seen, next, newer } = await read(olderToken, LIST_LIMIT);
        if (closed) return;
        for (const [id, batch] of seen) if (!newer(id) && !batches.has(id)) batches.set(id, batch);
        depth += LIST_LIMIT;
        olderToken = next;
        redraw();
      } else if (olderToken === undefined) {  // the newest rows are not a known page: read all
        depth = batches.size + LIST_LIMIT;
        await resync();
      }
    };

    const run = async (button) => {
      button.disabled = true;
      try {
        const answer = await runBatch(`/batches/${enc}`);
        const id = answer.item;
        flash(el("span", {}, "Started ",
          el("a", { href: `#/p/${enc}/${encodeURIComponent(id)}`, class: "mono" }, id), "."));
      } catch (err) { failed(err); } finally { button.disabled = false; }
    };

    $("main").replaceChildren(
      el("div", { class: "toolbar" }, el("h1", {}, pipelineId),
        el("button", { type: "button", class: "primary", id: "run",
                       onclick: (e) => run(e.currentTarget) }, "Run batch")),
      el("table", { id: "batches" },
        el("thead", {}, el("tr", {}, el("th", {}, "Batch"), el("th", {}, "State"),
          el("th", {}, "Steps"), el("th", {}, "Progress"), el("th", {}, "Outcome"),
          el("th", {}, "Created"))),
        body),
      el("div", { class: "more" }, olderButton));
    redraw();
    const stream = openStream(`/batches/${enc}/?limit=${LIST_LIMIT}`, {
      onOpen: () => { resync(); },
      onRefused: (why) => { refused = why; redraw(); },
      onMissing: () => {
        $("run").hidden = true;
        olderButton.remove();
        $("batches").replaceWith(el("p", { class: "card empty", id: "missing" },
          `Unknown pipeline ${pipelineId}: it was never registered. `,
          el("a", { href: "#/" }, "Back to the pipelines")));
      },
      onEvent: (event, data) => {
        if (reading) stamps.set(data.id, ++events);
        if (event === "batch") {
          batches.set(data.id, data);
          if (batches.size > depth + LIST_LIMIT) {  // keep the newest ones only
            const oldest = [...batches.values()].sort((a, b) =>
              String(a.created_at || "").localeCompare(String(b.created_at || "")))[0];
            batches.delete(oldest.id);
            // The rows no longer end at a page the token follows: "older" reads afresh.
            olderToken = undefined;
          }
        } else if (event === "deleted") {
          batches.delete(data.id);
        }
        redraw();
      },
    });
    return () => { closed = true; stream.close(); };
  }

  function partitionBar(step, partition, offset, moving) {
    const total = step.totals ? step.totals[partition] : undefined;
    // null: how far is unknown (no total). Only a success says the partition was done: a
    // failed step's, or one a stop cut short, is not drawn full (that read as done) nor
    // empty (that read as nothing done), and moves only while the step runs.
    let width = null;
    if (typeof total === "number" && total > 0) width = Math.min(100, (100 * offset) / total);
    else if (step.state === "success") width = 100;
    return { width, total, extent: width !== null ? "" : moving ? " indeterminate" : " unknown" };
  }

  function batchView(pipelineId, batchId) {
    crumbs(pipelineId, batchId);
    const enc = encodeURIComponent(pipelineId);
    const path = `/batches/${enc}/${encodeURIComponent(batchId)}`;
    const title = el("h1", { class: "mono" }, batchId);
    const stateSlot = el("span");
    const stopButton = el("button", { type: "button", id: "stop", disabled: true }, "Stop");
    const deleteButton = el("button", { type: "button", id: "delete", class: "danger" }, "Delete");
    const meta = el("dl", { class: "meta" });
    const stepsBox = el("div", { id: "steps" });
    const root = el("section", { id: "batch", dataset: { state: "" } },
      el("div", { class: "toolbar" }, title, stateSlot, stopButton, deleteButton),
      el("div", { class: "card" }, meta), stepsBox);
    $("main").replaceChildren(root);
    const stepNodes = new Map();

    stopButton.addEventListener("click", async () => {
      stopButton.disabled = true;
      try {
        await api("PUT", `${path}/stop`);
        flash("Stop requested: the batch reaches “stop” once the engine confirms.");
      } catch (err) { failed(err); stopButton.disabled = false; }
    });
    deleteButton.addEventListener("click", async () => {
      if (!window.confirm(`Delete ${batchId}? A running batch is stopped first. This cannot be undone.`)) return;
      deleteButton.disabled = true;
      try {
        await api("DELETE", path);
        flash(el("span", {}, "Deleted ", el("span", { class: "mono" }, batchId), "."));
        location.hash = `#/p/${enc}`;
      } catch (err) { failed(err); deleteButton.disabled = false; }
    });

    const stepNode = (name) => {
      let node = stepNodes.get(name);
      if (node) return node;
      const stateSlot = el("span");
      const summary = el("span", { class: "summary" });
      const overall = el("div", { class: "bar step-bar", hidden: true }, el("div", { class: "fill" }));
      const parts = el("div", { class: "partitions" });
      const placeholder = el("p", { class: "muted" });
      const card = el("section", { class: "card step", dataset: { step: name } },
        el("div", { class: "step-head" }, el("h2", {}, name), stateSlot, summary), overall, parts,
        placeholder);
      stepsBox.append(card);
      node = { card, stateSlot, summary, overall, parts, placeholder, rows: new Map() };
      stepNodes.set(name, node);
      return node;
    };

    const partitionRow = (node, partition) => {
      let row = node.rows.get(partition);
      if (row) return row;
      const fill = el("div", { class: "fill" });
      const bar = el("div", { class: "bar", role: "progressbar" }, fill);
      const count = el("span", { class: "count" });
      const line = el("div", { class: "partition", dataset: { partition } },
        el("span", { class: "mono" }, partition), bar, count);
      // Partitions in name order (partition_2 before partition_10).
      const after = [...node.rows.keys()].filter((p) => p.localeCompare(partition, undefined, { numeric: true }) > 0)
        .sort((a, b) => a.localeCompare(b, undefined, { numeric: true }))[0];
      node.parts.insertBefore(line, after ? node.rows.get(after).line : null);
      row = { line, bar, fill, count };
      node.rows.set(partition, row);
      return row;
    };

    const show = (batch) => {
      const state = batch.state ? batch.state.state : "none";
      root.dataset.state = state;
      stateSlot.replaceChildren(badge(state), " ", batch.outcome ? badge(batch.outcome) : "");
      stopButton.disabled = state === "stop";
      meta.replaceChildren(...[
        ["Pipeline", `${batch.pipeline_id || pipelineId} (version ${batch.pipeline_version || "?"})`],
        ["Deployment", batch.deployment], ["Created", when(batch.created_at)],
        ["Updated", when(batch.updated_at)], ["Outcome", batch.outcome],
        ["Reason", batch.reason], ["Flow run", batch.flow_run_id],
        // Its steps' records include the earlier batch's: say whose.
        ["Resumed from", batch.resumed_from && el("a", {
          href: `#/p/${enc}/${encodeURIComponent(batch.resumed_from)}`, class: "mono",
          dataset: { resumedFrom: batch.resumed_from } }, batch.resumed_from)],
      ].filter(([, v]) => v).flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
      const steps = (batch.state && batch.state.steps) || {};
      for (const [name, step] of Object.entries(steps)) {
        const node = stepNode(name);
        const moving = step.state === "running" && state !== "stop";
        node.card.dataset.state = step.state;
        const offsets = step.offsets || {};
        const progress = step.progress || null;
        const stalled = progress && progress.stalled;
        node.stateSlot.replaceChildren(badge(step.state), stalled ? " " : "", stalled ? badge("failed", "stalled") : "");
        const bits = [records(offsets)];
        if (percentText(step, 1)) bits.unshift(percentText(step, 1));
        if (progress && typeof progress.records_per_s === "number") bits.push(`${num(Math.round(progress.records_per_s))}/s`);
        if (progress && typeof progress.eta_s === "number" && moving) bits.push(`ETA ${Math.round(progress.eta_s)} s`);
        node.summary.textContent = bits.join(" · ");
        // The step's own bar, from progress.percent when the API computes it.
        node.overall.hidden = !percentText(step, 1);
        if (!node.overall.hidden) {
          node.overall.className = `bar step-bar ${step.state}`;
          node.overall.firstChild.style.width = percentText(step, 1);
        }
        for (const [partition, offset] of Object.entries(offsets)) {
          const row = partitionRow(node, partition);
          const { width, total, extent } = partitionBar(step, partition, offset, moving);
          row.line.dataset.offset = String(offset);
          row.bar.className = `bar ${step.state}${extent}`;
          row.bar.title = width === null ? "how far is unknown: the step reported no total" : "";
          row.fill.style.width = width === null ? "" : `${width}%`;
          if (width !== null) row.bar.setAttribute("aria-valuenow", String(Math.round(width)));
          else row.bar.removeAttribute("aria-valuenow");
          row.count.textContent = typeof total === "number" ? `${num(offset)} / ${num(total)}` : num(offset);
        }
        // A version may be lower than the last (a rebuild restores one: Redis is the truth),
        // so what it no longer has goes, rather than staying with its old records.
        for (const [partition, row] of [...node.rows]) {
          if (!Object.hasOwn(offsets, partition)) { row.line.remove(); node.rows.delete(partition); }
        }
        const waiting = !Object.keys(offsets).length;
        node.placeholder.hidden = !waiting;
        // "yet" only while records can still come: a step ended, or cut short by a stop of
        // its batch, reported none.
        node.placeholder.textContent = {
          none: "not started", pending: "not started", success: "done: no records reported",
          failed: "failed before reporting any record",
        }[step.state] || (moving ? "no records yet" : "no records reported");
      }
      for (const [name, node] of [...stepNodes]) {
        if (!Object.hasOwn(steps, name)) { node.card.remove(); stepNodes.delete(name); }
      }
    };

    const stream = openStream(path, {
      resume: true,
      final: ["end", "deleted"],
      onRefused: (why) => {
        stepsBox.replaceChildren(el("p", { class: "card empty error", id: "refused" }, why));
      },
      onMissing: () => {
        root.replaceChildren(el("p", { class: "card empty" }, "No such batch (deleted, or never existed). ",
          el("a", { href: `#/p/${enc}` }, "Back to the pipeline")));
      },
      onEvent: (event, data) => {
        if (event === "batch") show(data);
        else if (event === "deleted") {
          root.dataset.state = "deleted";
          stateSlot.replaceChildren(badge("deleted"));  // not its last state, shown for good
          stopButton.disabled = true;
          deleteButton.disabled = true;
          flash("This batch was deleted.", "error");
        }
      },
    });
    return () => stream.close();
  }

  // --- routing -------------------------------------------------------------------------------------
  let leave = () => {};

  function render(message) {
    leave();
    leave = () => {};
    if (!token()) { leave = loginView(message); return; }
    $("logout").hidden = false;
    const match = /^#\/p\/([^/]+)(?:\/([^/]+))?\/?$/.exec(location.hash);
    try {
      if (!match) leave = pipelinesView();
      else if (!match[2]) leave = batchesView(decodeURIComponent(match[1]));
      else leave = batchView(decodeURIComponent(match[1]), decodeURIComponent(match[2]));
    } catch (err) {
      // The last view's stream is closed: left on screen, it would say "live" and never move.
      crumbs();
      setLive("none");
      $("main").replaceChildren(el("p", { class: "card empty error", id: "broken" },
        `This page's address cannot be read (${err.message || err}). `,
        el("a", { href: "#/" }, "Back to the pipelines")));
    }
  }

  function start() {
    const refused = takeFragmentToken();
    $("logout").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      history.replaceState(null, "", location.pathname + location.search);  // no hashchange
      render("Signed out.");
    });
    window.addEventListener("hashchange", () => {
      render(location.hash.startsWith("#token=") ? takeFragmentToken() : undefined);
    });
    render(refused);
  }

  start();
})();
