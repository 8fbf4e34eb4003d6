"""The pieces the OpenAPI document (service.openapi) is built from: references, JSON bodies,
the path and header parameters, and one operation with the error answers its route can give."""

from __future__ import annotations

from typing import Any, Final

from core.models import ID_PATTERN

REF_TEMPLATE: Final = "#/components/schemas/{model}"

# Statuses any route can answer: malformed HTTP, an unlisted method (with `Allow`), and the
# parser's limits on the request line and headers (service.edge).
_EVERYWHERE: Final = {
    "400": "malformed request: ids, limit, token, filters, body, or the HTTP syntax itself",
    "405": "method not allowed here; the `Allow` header lists the allowed ones",
    "414": "request line longer than the server accepts",
    "431": "a header longer than the server accepts",
}
_PROTECTED: Final = {
    "401": "missing or invalid bearer token",
    "403": "the token lacks the scope this route needs",
    "503": "Redis or Kafka is unavailable; nothing was changed, retry later",
}
_OTHER: Final = {
    "404": "unknown pipeline, version or batch",
    "409": "conflict with an earlier request",
    "413": "body larger than the limit (DHUB_MAX_BODY_BYTES)",
}


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF_TEMPLATE.format(model=name)}


def json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


EXAMPLE_PIPELINE: Final = "sales-pipeline"
EXAMPLE_BATCH: Final = "batch-01jd3x5y6z7a8b9c0d1e2f3g4h"
ID_SCHEMA: Final = {"type": "string", "pattern": ID_PATTERN}
PIPELINE_ID: Final = {"name": "pipeline_id", "in": "path", "required": True,
                       "schema": {**ID_SCHEMA, "examples": [EXAMPLE_PIPELINE]}}
BATCH_ID: Final = {"name": "batch_id", "in": "path", "required": True,
                    "schema": {**ID_SCHEMA, "examples": [EXAMPLE_BATCH]}}
# Printable ASCII without surrounding spaces: what survives HTTP header parsing unchanged.
PRINTABLE_HEADER: Final = r"^[!-~]([ -~]*[!-~])?$"


def operation(summary: str, scope: str | None, ok: dict[str, Any], params: list[dict[str, Any]],
        errors: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    responses: dict[str, Any] = dict(ok)
    for status, text in _EVERYWHERE.items():
        responses.setdefault(status, json_body(ref("Error"), text))
    wanted = {**(_PROTECTED if scope is not None else {}),
              **{status: _OTHER[status] for status in errors}}
    for status, text in wanted.items():
        responses.setdefault(status, json_body(ref("Error"), text))
    op: dict[str, Any] = {"summary": summary, "parameters": params,
                          "responses": dict(sorted(responses.items()))}
    if scope is not None:
        op["security"] = [{"bearer": [scope]}]
        op["description"] = f"Needs the scope `{scope}`."
    op.update(extra)
    return op


def idempotency_key(what: str) -> dict[str, Any]:
    return {"name": "Idempotency-Key", "in": "header", "required": False,
            "schema": {"type": "string", "minLength": 1, "maxLength": 256,
                       "pattern": PRINTABLE_HEADER},
            "description": f"same key and same request ({what}, and the body's meaning) "
                           "within 24 h: the same batch; another request: 409 naming what "
                           "differs"}


def run_body(description: str) -> dict[str, Any]:
    return {"required": False, "description": description,
            "content": {"application/json": {"schema": ref("RunRequest")}}}
