// What the page shows around its views: the breadcrumbs and the stream's status in the
// header, and the flash message under it.
import { $, el } from "./dom.js";
import { SignedOut } from "./session.js";

export function crumbs(pipelineId, batchId) {
  const parts = [el("a", { href: "#/" }, "Pipelines")];
  if (pipelineId) {
    parts.push(el("span", { class: "sep" }, "›"),
      el("a", { href: `#/p/${encodeURIComponent(pipelineId)}` }, pipelineId));
  }
  if (batchId) parts.push(el("span", { class: "sep" }, "›"), el("span", { class: "mono" }, batchId));
  $("crumbs").replaceChildren(...parts);
}

export function setLive(state) {
  const node = $("live");
  node.hidden = state === "none";  // a view without a stream
  const text = { on: "live", connecting: "connecting…", wait: "reconnecting…", off: "offline",
                 done: "final", none: "" }[state];
  node.className = `live ${{ done: "off", connecting: "wait" }[state] || state}`;
  node.textContent = text;
}

let flashTimer = null;
export function flash(content, kind) {
  const node = $("flash");
  node.replaceChildren(content);
  node.className = kind === "error" ? "error" : "";
  node.hidden = false;
  clearTimeout(flashTimer);
  flashTimer = setTimeout(() => { node.hidden = true; }, kind === "error" ? 12000 : 8000);
}

// A sign-out has already shown the sign-in form with its reason: not flashed again.
export const failed = (error) => {
  if (!(error instanceof SignedOut)) flash(String(error.message || error), "error");
};
