// The pipelines: each one's latest version, its steps and its deployment, read when the
// view opens and on Refresh (the API has no stream of pipelines).
import { api } from "./api.js";
import { $, el } from "./dom.js";
import { crumbs, failed, setLive } from "./header.js";
import { MAY_NOT_READ, SignedOut } from "./session.js";

export function pipelinesView() {
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
