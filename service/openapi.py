"""The OpenAPI 3.1 document of the API (its schemas are JSON Schema 2020-12)."""

from __future__ import annotations

from typing import Any, Final

from core.models import BATCH_STATES, ID_PATTERN, OUTCOMES, STEP_STATES


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_ID: Final = {"type": "string", "pattern": ID_PATTERN}
_NULLABLE_STR: Final = {"type": ["string", "null"]}

SCHEMAS: Final[dict[str, Any]] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "request_id"],
                "properties": {
                    "code": {"type": "string", "examples": ["not_found"]},
                    "message": {"type": "string"},
                    "request_id": {"type": "string"},
                    "details": {"type": "object"},
                },
            }
        },
    },
    "Step": {
        "type": "object",
        "required": ["state", "offsets"],
        "properties": {
            "state": {"enum": list(STEP_STATES)},
            "offsets": {
                "type": "object",
                "description": "partition name -> records processed; only grows",
                "additionalProperties": {"type": "integer", "minimum": 0},
            },
        },
    },
    "Batch": {
        "type": "object",
        "required": ["id", "name", "deployment", "state"],
        "properties": {
            "id": {"type": "string", "examples": ["batch-01jd3x5y6z7a8b9c0d1e2f3g4h"]},
            "name": {"type": "string", "description": "the pipeline's name"},
            "deployment": {"type": "string", "examples": ["run-pipeline/sales-pipeline"]},
            "state": {
                "type": "object",
                "required": ["state", "steps"],
                "properties": {
                    "state": {"enum": list(BATCH_STATES)},
                    "steps": {"type": "object", "additionalProperties": _ref("Step")},
                },
            },
            "pipeline_id": {"type": "string"},
            "pipeline_version": {"type": "string"},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
            "outcome": {"enum": [*OUTCOMES, None], "description": "why a stopped batch stopped"},
            "reason": _NULLABLE_STR,
            "flow_run_id": _NULLABLE_STR,
        },
    },
    "BatchPage": {
        "type": "object",
        "required": ["items", "token"],
        "properties": {
            "items": {"type": "object", "additionalProperties": _ref("Batch"),
                      "description": "batch id -> batch, newest first"},
            "token": {"type": ["string", "null"], "description": "next page; null on the last"},
        },
    },
    "RunAccepted": {
        "type": "object", "required": ["item"],
        "properties": {"item": {"type": "string", "description": "the new batch id"}},
    },
    "Message": {
        "type": "object", "required": ["message"], "properties": {"message": {"type": "string"}},
    },
    "StepSpec": {
        "type": "object", "required": ["name", "uses"], "additionalProperties": False,
        "properties": {"name": _ID, "uses": {"type": "string"}, "config": {"type": "object"}},
    },
    "PipelineSpec": {
        "type": "object", "required": ["name", "version", "steps"], "additionalProperties": False,
        "properties": {
            "name": _ID,
            "version": _ID,
            "steps": {"type": "array", "minItems": 1, "items": _ref("StepSpec")},
        },
    },
    "Pipeline": {
        "type": "object",
        "required": ["id", "name", "deployment", "latest", "versions"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "deployment": {"type": "string"},
            "latest": {"type": "string"},
            "created": {"type": "boolean"},
            "versions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "version", "steps", "latest"],
                    "properties": {"name": _ID, "version": _ID,
                                   "steps": {"type": "array", "items": _ref("StepSpec")},
                                   "latest": {"type": "boolean"}},
                },
            },
        },
    },
    "PipelineList": {
        "type": "object", "required": ["items"],
        "properties": {"items": {"type": "object", "additionalProperties": _ref("Pipeline")}},
    },
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
    "Ready": {
        "type": "object", "required": ["status", "checks"],
        "properties": {"status": {"enum": ["ready", "unavailable"]},
                       "checks": {"type": "object",
                                  "additionalProperties": {"type": "boolean"}}},
    },
    "WebhookAccepted": {
        "type": "object", "required": ["accepted"],
        "properties": {"accepted": {"type": "integer", "minimum": 0}},
    },
}

_PIPELINE_ID = {"name": "pipeline_id", "in": "path", "required": True, "schema": _ID}
_BATCH_ID = {"name": "batch_id", "in": "path", "required": True, "schema": _ID}
_AUTH_ERRORS = {
    "400": _error("malformed input (ids, limit, token, body)"),
    "401": _error("missing or invalid bearer token"),
    "403": _error("the token lacks the scope this route needs"),
    "503": _error("Redis or Kafka is unavailable"),
}


def _op(summary: str, scope: str | None, ok: dict[str, Any], params: list[dict[str, Any]],
        errors: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    responses: dict[str, Any] = dict(ok)
    if scope is not None:
        responses.update(_AUTH_ERRORS)
    for status, text in (("404", "unknown pipeline, version or batch"),
                         ("409", "conflict with an earlier request"),
                         ("413", "body larger than the limit")):
        if status in errors:
            responses[status] = _error(text)
    op: dict[str, Any] = {"summary": summary, "parameters": params, "responses": responses}
    if scope is not None:
        op["security"] = [{"bearer": [scope]}]
        op["description"] = f"Needs the scope `{scope}`."
    op.update(extra)
    return op


def build() -> dict[str, Any]:
    batch_ok = {"200": _json(_ref("Batch"), "the batch")}
    message_ok = {"200": _json(_ref("Message"), "done")}
    return {
        "openapi": "3.1.0",
        "info": {"title": "dhub Batches API", "version": "1.0.0",
                 "description": "Run, stop, delete and watch batches (pipeline runs on Prefect)."},
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "a static token or a JWT with scopes"}},
        },
        "paths": {
            "/api/v1/batches/{pipeline_id}": {
                "post": _op(
                    "Run a batch of the pipeline", "batches:write",
                    {"200": _json(_ref("RunAccepted"), "accepted; the run command is queued")},
                    [_PIPELINE_ID,
                     {"name": "pipeline_version", "in": "query", "required": False, "schema": _ID,
                      "description": "default: the latest registered version"},
                     {"name": "Idempotency-Key", "in": "header", "required": False,
                      "schema": {"type": "string", "minLength": 1, "maxLength": 256},
                      "description": "same key, pipeline and version within 24 h: same batch"}],
                    ("404", "409"),
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
                      "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
                     {"name": "token", "in": "query", "required": False,
                      "schema": {"type": "string"}, "description": "from the previous page"}],
                ),
            },
            "/api/v1/batches/{pipeline_id}/{batch_id}": {
                "get": _op("One batch", "batches:read", batch_ok, [_PIPELINE_ID, _BATCH_ID],
                           ("404",)),
                "delete": _op("Delete a batch (a running one is stopped first)", "batches:write",
                              message_ok, [_PIPELINE_ID, _BATCH_ID], ("404",)),
            },
            "/api/v1/batches/{pipeline_id}/{batch_id}/stop": {
                "put": _op("Stop a batch", "batches:write", message_ok,
                           [_PIPELINE_ID, _BATCH_ID], ("404",)),
            },
            "/api/v1/pipelines/{pipeline_id}": {
                "put": _op(
                    "Register a version of a pipeline", "pipelines:write",
                    {"200": _json(_ref("Pipeline"), "this version existed with the same body"),
                     "201": _json(_ref("Pipeline"), "version added")},
                    [_PIPELINE_ID], ("409", "413"),
                    requestBody={"required": True, "content": {
                        "application/json": {"schema": _ref("PipelineSpec")}}},
                ),
                "get": _op("A pipeline with all its versions", "batches:read",
                           {"200": _json(_ref("Pipeline"), "the pipeline")}, [_PIPELINE_ID],
                           ("404",)),
            },
            "/api/v1/pipelines/": {
                "get": _op("Every registered pipeline", "batches:read",
                           {"200": _json(_ref("PipelineList"), "the pipelines")}, []),
            },
            "/api/v1/hooks/prefect": {
                "post": _op(
                    "Prefect automation webhook (HMAC-signed, not bearer)", None,
                    {"202": _json(_ref("WebhookAccepted"), "forwarded as events"),
                     "400": _error("not a Prefect event"),
                     "401": _error("bad signature, stale timestamp, or webhooks disabled"),
                     "503": _error("Kafka is unavailable")},
                    [{"name": "X-Dhub-Timestamp", "in": "header", "required": True,
                      "schema": {"type": "string"}},
                     {"name": "X-Dhub-Signature", "in": "header", "required": True,
                      "schema": {"type": "string"}}],
                    ("413",),
                    requestBody={"required": True,
                                 "content": {"application/json": {"schema": {"type": "object"}}}},
                ),
            },
            "/api/v1/openapi.json": {
                "get": _op("This document", None,
                           {"200": _json({"type": "object"}, "OpenAPI 3.1")}, []),
            },
            "/docs": {
                "get": _op("A page rendering this document", None,
                           {"200": {"description": "HTML",
                                    "content": {"text/html": {"schema": {"type": "string"}}}}},
                           []),
            },
            "/healthz": {"get": _op("Alive", None, {"200": _json(_ref("Health"), "alive")}, [])},
            "/readyz": {
                "get": _op("Redis and Kafka reachable", None,
                           {"200": _json(_ref("Ready"), "ready"),
                            "503": _json(_ref("Ready"), "a dependency is down")}, []),
            },
        },
    }
