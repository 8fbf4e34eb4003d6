// A pipeline's batches, newest first, kept live by the list's stream, with Run batch and
// the older batches page by page.
import { api, runBatch } from "./api.js";
import { $, badge, el, when } from "./dom.js";
import { crumbs, failed, flash } from "./header.js";
import { progressText } from "./progress.js";
import { openStream } from "./stream.js";

const LIST_LIMIT = 50;

function stepSquares(steps) {
  return el("span", { class: "steps-mini" }, Object.entries(steps || {}).map(([name, step]) =>
    el("span", { class: step.state, title: `${name}: ${step.state}` })));
}

export function batchesView(pipelineId) {
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
  // Bumped whenever the rows' oldest end moves for another reason than "older" (a resync
  // applied, the oldest rows let go): an "older" page read before then follows rows that
  // are no longer the ones shown, and added, it would leave a gap above itself.
  let continuity = 0;

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
  // batches or the last page, handed to `apply(seen, next, newer)`: the batches, the next
  // token, and whether the stream spoke of an id after the read began (then the stream's is
  // newer). `apply` runs in the same step as the last answer arrives, before the stamps go:
  // a stream event handled between the two would be neither stamped nor compared.
  const read = async (from, count, apply) => {
    reading += 1;
    redraw();
    const began = events;
    const seen = new Map();
    let next = from;
    try {
      do {
        const query = `?limit=${Math.min(1000, count - seen.size)}` +
          (next ? `&token=${encodeURIComponent(next)}` : "");
        const page = await api("GET", `/batches/${enc}/${query}`);
        for (const [id, batch] of Object.entries(page.items || {})) seen.set(id, batch);
        next = page.token;
      } while (next && seen.size < count && !closed);
      const told = new Set();
      for (const [id, n] of stamps) if (n > began) told.add(id);
      apply(seen, next, (id) => told.has(id));
    } finally {
      reading -= 1;
      if (!reading) stamps.clear();
      redraw();
    }
  };

  // After each (re)connection: the stream starts with the newest page again but says
  // nothing of what changed or went while it was down, so the rows shown are checked
  // against a read of the list as deep as the reader had gone. Until it answers they stay
  // (the header says reconnecting): clearing them showed an empty list, "No batch yet".
  const resync = async () => {
    const mine = ++syncs;
    try {
      await read(null, Math.max(depth, LIST_LIMIT), (seen, next, newer) => {
        if (closed || mine !== syncs) return;
        for (const id of [...batches.keys()]) {
          // Not in the read and nothing said of it since: gone, or older than what was read.
          if (!seen.has(id) && !newer(id)) batches.delete(id);
        }
        for (const [id, batch] of seen) if (!newer(id)) batches.set(id, batch);
        olderToken = next;
        loaded = true;
        continuity += 1;
      });
    } catch (err) {
      if (!closed && mine === syncs) {
        failed(err);
        setTimeout(() => { if (!closed && mine === syncs) resync(); }, 3000);
      }
    }
  };

  const older = async () => {
    if (reading) return;
    if (olderToken) {
      const from = continuity;
      await read(olderToken, LIST_LIMIT, (seen, next, newer) => {
        // A resync or a trim since it began: the page no longer follows the rows shown
        // (added, it left a gap above itself); the button reads from the new end.
        if (closed || from !== continuity) return;
        for (const [id, batch] of seen) if (!newer(id) && !batches.has(id)) batches.set(id, batch);
        depth += LIST_LIMIT;
        olderToken = next;
      });
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
          continuity += 1;
        }
      } else if (event === "deleted") {
        batches.delete(data.id);
      }
      redraw();
    },
  });
  return () => { closed = true; stream.close(); };
}
