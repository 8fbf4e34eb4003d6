"""`/api/v1/openapi.json` and `/docs`, a self-contained page that renders it (no CDN needed)."""

from __future__ import annotations

import functools
from typing import Final

import orjson
from aiohttp import web


@functools.cache
def _document() -> bytes:
    # Built on first use: the document reads the route table, which imports this module.
    from service import openapi

    return orjson.dumps(openapi.build())

_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dhub Batches API</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:60rem;color:#222}
h1{font-size:1.6rem} .op{border:1px solid #ddd;border-radius:6px;margin:.8rem 0;padding:.6rem 1rem}
.m{display:inline-block;min-width:4.2rem;font-weight:700;text-transform:uppercase}
.get{color:#1a7f37}.post{color:#0550ae}.put{color:#9a6700}.delete{color:#cf222e}
code,pre{background:#f6f8fa;border-radius:4px;padding:.1rem .3rem} pre{padding:.6rem;overflow:auto}
td{padding:.1rem .6rem;vertical-align:top} summary{cursor:pointer}
</style></head><body>
<h1>dhub Batches API</h1><p id="desc"></p><div id="ops">Loading the OpenAPI document...</div>
<h2>Schemas</h2><div id="schemas"></div>
<script>
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));
fetch("/api/v1/openapi.json").then(r => r.json()).then(doc => {
  document.getElementById("desc").textContent = doc.info.description;
  let html = "";
  for (const [path, ops] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      html += `<div class="op"><span class="m ${method}">${method}</span> <code>${esc(path)}</code>
        &mdash; ${esc(op.summary)}<br><small>${esc(op.description || "")}</small>`;
      if (op.parameters.length) {
        html += "<table>" + op.parameters.map(p =>
          `<tr><td><code>${esc(p.name)}</code></td><td>${p.in}${p.required ? ", required" : ""}</td>
           <td>${esc(p.description || "")}</td></tr>`).join("") + "</table>";
      }
      html += "<table>" + Object.entries(op.responses).map(([code, r]) =>
        `<tr><td><b>${code}</b></td><td>${esc(r.description)}</td></tr>`).join("") + "</table></div>";
    }
  }
  document.getElementById("ops").innerHTML = html;
  document.getElementById("schemas").innerHTML = Object.entries(doc.components.schemas).map(
    ([name, s]) =>
      `<details><summary>${name}</summary><pre>${esc(JSON.stringify(s, null, 2))}</pre></details>`
  ).join("");
});
</script></body></html>
"""


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=_document(), content_type="application/json")


async def docs_page(request: web.Request) -> web.Response:
    return web.Response(text=_PAGE, content_type="text/html")
