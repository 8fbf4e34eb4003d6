"""The OpenAPI 3.1 document of the API, generated: its schemas come from the pydantic models
the handlers validate requests with (`core.models`) and the models of their answers
(`service.api_models`); parameters take their limits from the handlers' own constants.
Nothing here restates a shape, so the document cannot drift from the code."""

from __future__ import annotations

import functools
from typing import Any, Final

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from core.models import BATCH_STATES, ID_PATTERN, OUTCOMES, PipelineSpec, RunRequest
from core.step_catalogue import known_steps
from service.api_models import RESPONSE_MODELS
from service.listing import DEFAULT_LIMIT, MAX_LIMIT
from service.schemas import CONTENT_TYPE as SCHEMA_CONTENT_TYPE

_REF_TEMPLATE: Final = "#/components/schemas/{model}"

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


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF_TEMPLATE.format(model=name)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


@functools.cache
def _schemas() -> dict[str, Any]:
    inputs: list[tuple[type[BaseModel], JsonSchemaMode]] = [(PipelineSpec, "validation"),
                                                            (RunRequest, "validation")]
    outputs: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (model, "serialization") for model in RESPONSE_MODELS]
    _, document = models_json_schema([*inputs, *outputs], ref_template=_REF_TEMPLATE)
    schemas: dict[str, Any] = document["$defs"]
    # The handler admits only registered step implementations (a definition must not choose
    # arbitrary code); the catalogue is the source of the list.
    step_spec = schemas["PipelineSpec"]["properties"]["steps"]["items"]["$ref"].rsplit("/", 1)[1]
    schemas[step_spec]["properties"]["uses"]["enum"] = sorted(known_steps())
    return schemas


EXAMPLE_PIPELINE: Final = "sales-pipeline"
EXAMPLE_BATCH: Final = "batch-01jd3x5y6z7a8b9c0d1e2f3g4h"
_ID: Final = {"type": "string", "pattern": ID_PATTERN}
_PIPELINE_ID: Final = {"name": "pipeline_id", "in": "path", "required": True,
                       "schema": {**_ID, "examples": [EXAMPLE_PIPELINE]}}
_BATCH_ID: Final = {"name": "batch_id", "in": "path", "required": True,
                    "schema": {**_ID, "examples": [EXAMPLE_BATCH]}}
# Printable ASCII without surrounding spaces: what survives HTTP header parsing unchanged.
_PRINTABLE_HEADER: Final = r"^[!-~]([ -~]*[!-~])?$"


def _op(summary: str, scope: str | None, ok: dict[str, Any], params: list[dict[str, Any]],
        errors: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    responses: dict[str, Any] = dict(ok)
    for status, text in _EVERYWHERE.items():
        responses.setdefault(status, _json(_ref("Error"), text))
    wanted = {**(_PROTECTED if scope is not None else {}),
              **{status: _OTHER[status] for status in errors}}
    for status, text in wanted.items():
        responses.setdefault(status, _json(_ref("Error"), text))
    op: dict[str, Any] = {"summary": summary, "parameters": params,
                          "responses": dict(sorted(responses.items()))}
    if scope is not None:
        op["security"] = [{"bearer": [scope]}]
        op["description"] = f"Needs the scope `{scope}`."
    op.update(extra)
    return op


def _idempotency_key(what: str) -> dict[str, Any]:
    return {"name": "Idempotency-Key", "in": "header", "required": False,
            "schema": {"type": "string", "minLength": 1, "maxLength": 256,
                       "pattern": _PRINTABLE_HEADER},
            "description": f"same key and same request ({what}, and the body's meaning) "
                           "within 24 h: the same batch; another request: 409 naming what "
                           "differs"}


def _run_body(description: str) -> dict[str, Any]:
    return {"required": False, "description": description,
            "content": {"application/json": {"schema": _ref("RunRequest")}}}


def _batch_paths() -> dict[str, Any]:
    batch_ok = {"200": _json(_ref("Batch"), "the batch")}
    message_ok = {"200": _json(_ref("Message"), "done")}
    return {
        "/api/v1/batches/{pipeline_id}": {
            "post": _op(
                "Run a batch of the pipeline", "batches:write",
                {"200": _json(_ref("RunAccepted"), "accepted; the run command is queued")},
                [_PIPELINE_ID,
                 {"name": "pipeline_version", "in": "query", "required": False, "schema": _ID,
                  "description": "default: the latest registered version"},
                 _idempotency_key("pipeline and version asked for")],
                ("404", "409", "413"),
                requestBody=_run_body(
                    "per-step config overrides, merged over the version's registered config "
                    "and checked by each step's config model (400 with `details.problems`); "
                    "no body runs with the registered config"),
            ),
            "get": _op("The pipeline's latest batch", "batches:read", batch_ok,
                       [_PIPELINE_ID], ("404",)),
        },
        "/api/v1/batches/{pipeline_id}/": {
            "get": _op(
                "All batches of the pipeline, newest first, a page at a time", "batches:read",
                {"200": _json(_ref("BatchPage"), "one page")},
                [_PIPELINE_ID,
                 {"name": "limit", "in": "query", "required": False,
                  "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
                             "default": DEFAULT_LIMIT}},
                 {"name": "token", "in": "query", "required": False,
                  "schema": {"type": "string"},
                  "description": "opaque, from the previous page of the same filter; any other "
                                 "value, or a token of another filter, is a 400"},
                 {"name": "state", "in": "query", "required": False,
                  "schema": {"type": "string", "enum": list(BATCH_STATES)},
                  "description": "only batches in this state when the page is read"},
                 {"name": "outcome", "in": "query", "required": False,
                  "schema": {"type": "string", "enum": list(OUTCOMES)},
                  "description": "only stopped batches with this outcome"},
                 {"name": "created_after", "in": "query", "required": False,
                  "schema": {"type": "string", "format": "date-time"},
                  "description": "created at or after this time (ISO-8601 with a timezone; "
                                 "without one, 400)"},
                 {"name": "created_before", "in": "query", "required": False,
                  "schema": {"type": "string", "format": "date-time"},
                  "description": "created strictly before this time (ISO-8601 with a "
                                 "timezone)"}],
                description=(
                    "Needs the scope `batches:read`. Filters combine; a filtered page may hold "
                    "fewer than `limit` batches (one that left the filter since it was indexed "
                    "is skipped) while its token is not null. With `Accept: "
                    "text/event-stream` the pipeline's changes stream, unfiltered (filters "
                    "then are a 400)."),
            ),
        },
        "/api/v1/batches/{pipeline_id}/{batch_id}": {
            "get": _op("One batch", "batches:read", batch_ok, [_PIPELINE_ID, _BATCH_ID],
                       ("404",)),
            "delete": _op("Delete a batch (a running one is stopped first)", "batches:write",
                          message_ok, [_PIPELINE_ID, _BATCH_ID], ("404",)),
        },
        "/api/v1/batches/{pipeline_id}/{batch_id}/resume": {
            "post": _op(
                "Resume a stopped, not completed batch from its offsets, as a new batch",
                "batches:write",
                {"200": _json(_ref("RunAccepted"), "accepted; the new batch's id"),
                 "409": _json(_ref("Error"), "the batch is not stopped, or it completed; or "
                                             "the Idempotency-Key was used for another "
                                             "request")},
                [_PIPELINE_ID, _BATCH_ID, _idempotency_key("the batch resumed")],
                ("404", "409", "413"),
                description=(
                    "Needs the scope `batches:write`. The new batch runs the same pipeline "
                    "version and shows `resumed_from`. Steps that were `success` are `success` "
                    "at once with their offsets; the first step that was not starts each "
                    "partition from its old offset; the steps after it start from zero."),
                requestBody=_run_body(
                    "per-step config overrides, merged over the resumed batch's effective "
                    "config (e.g. `{\"config\": {\"transform\": {\"fail_at\": null}}}`)"),
            ),
        },
        "/api/v1/batches/{pipeline_id}/{batch_id}/stop": {
            "put": _op("Stop a batch", "batches:write", message_ok, [_PIPELINE_ID, _BATCH_ID],
                       ("404",)),
        },
    }


def _other_paths() -> dict[str, Any]:
    pipeline = _ref("Pipeline")
    return {
        "/api/v1/pipelines/{pipeline_id}": {
            "put": _op(
                "Register a version of a pipeline", "pipelines:write",
                {"200": _json(pipeline, "this version existed with the same body"),
                 "201": _json(pipeline, "version added")},
                [_PIPELINE_ID], ("409", "413"),
                requestBody={"required": True, "content": {
                    "application/json": {"schema": _ref("PipelineSpec")}}},
            ),
            "get": _op("A pipeline with all its versions", "batches:read",
                       {"200": _json(pipeline, "the pipeline")}, [_PIPELINE_ID], ("404",)),
        },
        "/api/v1/pipelines/": {
            "get": _op("Every registered pipeline", "batches:read",
                       {"200": _json(_ref("PipelineList"), "the pipelines")}, []),
        },
        "/api/v1/steps": {
            "get": _op("The step implementations a pipeline may use", "batches:read",
                       {"200": _json(_ref("StepList"), "the step implementations")}, []),
        },
        "/api/v1/hooks/prefect": {
            "post": _op(
                "Prefect automation webhook (HMAC-signed, not bearer)", None,
                {"202": _json(_ref("WebhookAccepted"), "forwarded as events"),
                 "401": _json(_ref("Error"), "bad signature, stale timestamp, or webhooks "
                                             "disabled"),
                 "503": _json(_ref("Error"), "Kafka is unavailable")},
                [{"name": "X-Dhub-Timestamp", "in": "header", "required": True,
                  "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"},
                  "description": "unix seconds; within five minutes of the server's clock"},
                 {"name": "X-Dhub-Signature", "in": "header", "required": True,
                  "schema": {"type": "string", "pattern": "^sha256=[0-9a-f]{64}$"},
                  "description": "HMAC-SHA256 of `<timestamp>.<body>` with the shared secret"}],
                ("413",),
                requestBody={"required": True,
                             "content": {"application/json": {"schema": {"type": "object"}}}},
            ),
        },
        "/api/v1/openapi.json": {
            "get": _op("This document", None,
                       {"200": _json({"type": "object"}, "OpenAPI 3.1")}, []),
        },
        "/api/v1/schemas": {
            "get": _op("The JSON Schemas of the Kafka commands and events", None,
                       {"200": _json(_ref("MessageSchemaList"), "the schemas")}, []),
        },
        "/api/v1/schemas/{name}": {
            "get": _op(
                "One message JSON Schema (2020-12), to validate what a service produces", None,
                {"200": {"description": "the schema", "content": {
                    SCHEMA_CONTENT_TYPE: {"schema": {"type": "object"}}}}},
                [{"name": "name", "in": "path", "required": True,
                  "schema": {"type": "string", "examples": ["command.run", "events"]}}],
                ("404",)),
        },
        "/docs": {
            "get": _op("A page rendering this document", None,
                       {"200": {"description": "HTML",
                                "content": {"text/html": {"schema": {"type": "string"}}}}}, []),
        },
        # The page at /ui/ and at /ui alike (it names its files by absolute paths).
        **{path: {"get": _op("The live web page (its data calls carry the bearer token)", None,
                             {"200": {"description": "the page", "content": {
                                 "text/html": {"schema": {"type": "string"}}}},
                              "304": {"description": "unchanged (ETag)"}}, [])}
           for path in ("/ui/", "/ui")},
        "/ui/{name}": {
            "get": _op("A script or style sheet of the web page", None,
                       {"200": {"description": "the file", "content": {
                           "text/javascript": {"schema": {"type": "string"}},
                           "text/css": {"schema": {"type": "string"}}}},
                        "304": {"description": "unchanged (ETag)"}},
                       [{"name": "name", "in": "path", "required": True,
                         "schema": {"type": "string", "examples": ["app.js"]}}], ("404",)),
        },
        "/healthz": {"get": _op("Alive", None, {"200": _json(_ref("Health"), "alive")}, [])},
        "/metrics": {
            "get": _op("Prometheus metrics (text exposition format)", "metrics:read",
                       {"200": {"description": "the metrics", "content": {
                           "text/plain": {"schema": {"type": "string"}}}}}, []),
        },
        "/readyz": {
            "get": _op("Redis and Kafka reachable", None,
                       {"200": _json(_ref("Ready"), "ready"),
                        "503": _json(_ref("Ready"), "a dependency is down")}, []),
        },
    }


# Links let a client (and schemathesis' stateful phase) follow an answer to the next call.
_BATCH_LINKS: Final = {
    op: {"operationId": op, "parameters": {"pipeline_id": "$request.path.pipeline_id",
                                           "batch_id": "$response.body#/item"}}
    for op in ("get_batch", "stop_batch", "delete_batch")
}
_PIPELINE_LINKS: Final = {
    op: {"operationId": op, "parameters": {"pipeline_id": "$request.path.pipeline_id"}}
    for op in ("get_pipeline", "run_batch", "latest_batch", "list_batches")
}


def _paths() -> dict[str, Any]:
    from service.routes import operation_ids  # the routes import service.docs, which uses us

    paths = {**_batch_paths(), **_other_paths()}
    ids = operation_ids()
    for path, ops in paths.items():
        for method, op in ops.items():
            op["operationId"] = ids[(method, path)]
    paths["/api/v1/batches/{pipeline_id}"]["post"]["responses"]["200"]["links"] = _BATCH_LINKS
    for status in ("200", "201"):
        paths["/api/v1/pipelines/{pipeline_id}"]["put"]["responses"][status]["links"] = (
            _PIPELINE_LINKS)
    return paths


def build() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "dhub Batches API", "version": "1.0.0",
                 "description": "Run, stop, delete and watch batches (pipeline runs on Prefect). "
                                "Every error answer has the `Error` shape."},
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "a static token or a JWT with scopes"}},
        },
        "paths": _paths(),
    }
