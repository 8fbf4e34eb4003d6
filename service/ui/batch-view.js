// One batch: its state and facts, each step's records, percent and partitions' bars, kept
// live by the batch's stream, with Stop and Delete.
import { api } from "./api.js";
import { $, badge, el, num, when } from "./dom.js";
import { crumbs, failed, flash } from "./header.js";
import { partitionBar, percentText, records } from "./progress.js";
import { openStream } from "./stream.js";

export function batchView(pipelineId, batchId) {
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
