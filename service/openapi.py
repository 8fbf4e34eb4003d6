"""The OpenAPI 3.1 document of the API, generated: its schemas come from the pydantic models
the handlers validate requests with (`core.models`) and the models of their answers
(`service.api_models`); parameters take their limits from the handlers' own constants.
Nothing here restates a shape, so the document cannot drift from the code."""

from __future__ import annotations

import functools
from typing import Any, Final

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from core.models import BATCH_STATES, OUTCOMES, PipelineSpec, RunRequest
from core.step_catalogue import known_steps
from service.api_models import RESPONSE_MODELS
from service.listing import DEFAULT_LIMIT, MAX_LIMIT
from service.openapi_parts import (
    BATCH_ID,
    ID_SCHEMA,
    PIPELINE_ID,
    REF_TEMPLATE,
    idempotency_key,
    json_body,
    operation,
    ref,
    run_body,
)
from service.schemas import CONTENT_TYPE as SCHEMA_CONTENT_TYPE


@functools.cache
def _schemas() -> dict[str, Any]:
    inputs: list[tuple[type[BaseModel], JsonSchemaMode]] = [(PipelineSpec, "validation"),
                                                            (RunRequest, "validation")]
    outputs: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (model, "serialization") for model in RESPONSE_MODELS]
    _, document = models_json_schema([*inputs, *outputs], ref_template=REF_TEMPLATE)
    schemas: dict[str, Any] = document["$defs"]
    # The handler admits only registered step implementations (a definition must not choose
    # arbitrary code); the catalogue is the source of the list.
    step_spec = schemas["PipelineSpec"]["properties"]["steps"]["items"]["$ref"].rsplit("/", 1)[1]
    schemas[step_spec]["properties"]["uses"]["enum"] = sorted(known_steps())
    return schemas


def _batch_paths() -> dict[str, Any]:
    batch_ok = {"200": json_body(ref("Batch"), "the batch")}
    message_ok = {"200": json_body(ref("Message"), "done")}
    return {
        "/api/v1/batches/{pipeline_id}": {
            "post": operation(
                "Run a batch of the pipeline", "batches:write",
                {"200": json_body(ref("RunAccepted"), "accepted; the run command is queued")},
                [PIPELINE_ID,
                 {"name": "pipeline_version", "in": "query", "required": False, "schema": ID_SCHEMA,
                  "description": "default: the latest registered version"},
                 idempotency_key("pipeline and version asked for")],
                ("404", "409", "413"),
                requestBody=run_body(
                    "per-step config overrides, merged over the version's registered config "
                    "and checked by each step's config model (400 with `details.problems`); "
                    "no body runs with the registered config"),
            ),
            "get": operation("The pipeline's latest batch", "batches:read", batch_ok,
                       [PIPELINE_ID], ("404",),
                       description="Needs the scope `batches:read`. The newest batch, "
                                   "whatever its state: the list's filters "
                                   "(state, outcome, created bounds), limit and token are a "
                                   "400 here, not ignored (so is any parameter but `wait` "
                                   "and `_`-prefixed cache-busters); the list with limit=1 "
                                   "gives the newest batch matching them."),
        },
        "/api/v1/batches/{pipeline_id}/": {
            "get": operation(
                "All batches of the pipeline, newest first, a page at a time", "batches:read",
                {"200": json_body(ref("BatchPage"), "one page")},
                [PIPELINE_ID,
                 {"name": "limit", "in": "query", "required": False,
                  "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
                             "default": DEFAULT_LIMIT},
                  "description": "given more than once is a 400"},
                 {"name": "token", "in": "query", "required": False,
                  "schema": {"type": "string", "minLength": 1},
                  "description": "opaque, from the previous page of the same filter; any other "
                                 "value, a token of another filter, or a token given more "
                                 "than once is a 400"},
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
                ("404",),
                description=(
                    "Needs the scope `batches:read`. Filters combine; a page with a token holds "
                    "`limit` batches (in rare races, after 8 reads, fewer). A query parameter "
                    "the list does not take is a 400, but for a `_` cache-buster. A pipeline "
                    "never registered and "
                    "without a batch is a 404 (a registered one without a batch: an empty "
                    "page). With `Accept: text/event-stream` the pipeline's changes stream, "
                    "unfiltered and from the newest batches (filters or a token then are a "
                    "400)."),
            ),
        },
        "/api/v1/batches/{pipeline_id}/{batch_id}": {
            "get": operation("One batch", "batches:read", batch_ok, [PIPELINE_ID, BATCH_ID],
                       ("404",)),
            "delete": operation("Delete a batch (a running one is stopped first)", "batches:write",
                          {**message_ok,
                           "409": json_body(ref("Error"), "a resume going on from this "
                                            "batch's data has not stopped yet")},
                          [PIPELINE_ID, BATCH_ID], ("404",)),
        },
        "/api/v1/batches/{pipeline_id}/{batch_id}/resume": {
            "post": operation(
                "Resume a stopped, not completed batch from its offsets, as a new batch",
                "batches:write",
                {"200": json_body(ref("RunAccepted"), "accepted; the new batch's id"),
                 "409": json_body(ref("Error"), "the batch is not stopped, or it completed; or "
                                             "the data it would go on from was deleted; or "
                                             "the Idempotency-Key was used for another "
                                             "request")},
                [PIPELINE_ID, BATCH_ID, idempotency_key("the batch resumed")],
                ("404", "409", "413"),
                description=(
                    "Needs the scope `batches:write`. The new batch runs the same pipeline "
                    "version and shows `resumed_from`. Steps that were `success` are `success` "
                    "at once with their offsets; the first step that was not starts each "
                    "partition from its old offset; the steps after it start from zero. A "
                    "400 also when the config changes a `success` step's config, or a key "
                    "that shapes the data (schema mark `shapes_data`, GET /api/v1/steps) of "
                    "the step that goes on."),
                requestBody=run_body(
                    "per-step config overrides, merged over the resumed batch's effective "
                    "config (e.g. `{\"config\": {\"transform\": {\"fail_at\": null}}}`)"),
            ),
        },
        "/api/v1/batches/{pipeline_id}/{batch_id}/stop": {
            "put": operation("Stop a batch", "batches:write", message_ok, [PIPELINE_ID, BATCH_ID],
                       ("404",)),
        },
    }


def _other_paths() -> dict[str, Any]:
    pipeline = ref("Pipeline")
    return {
        "/api/v1/pipelines/{pipeline_id}": {
            "put": operation(
                "Register a version of a pipeline", "pipelines:write",
                {"200": json_body(pipeline, "this version existed with the same body"),
                 "201": json_body(pipeline, "version added")},
                [PIPELINE_ID], ("409", "413"),
                requestBody={"required": True, "content": {
                    "application/json": {"schema": ref("PipelineSpec")}}},
            ),
            "get": operation("A pipeline with all its versions", "batches:read",
                       {"200": json_body(pipeline, "the pipeline")}, [PIPELINE_ID], ("404",)),
        },
        "/api/v1/pipelines/": {
            "get": operation("Every registered pipeline", "batches:read",
                       {"200": json_body(ref("PipelineList"), "the pipelines")}, []),
        },
        "/api/v1/steps": {
            "get": operation("The step implementations a pipeline may use", "batches:read",
                       {"200": json_body(ref("StepList"), "the step implementations")}, []),
        },
        "/api/v1/hooks/prefect": {
            "post": operation(
                "Prefect automation webhook (HMAC-signed, not bearer)", None,
                {"202": json_body(ref("WebhookAccepted"), "forwarded as events"),
                 "401": json_body(ref("Error"), "bad signature, stale timestamp, or webhooks "
                                             "disabled"),
                 "503": json_body(ref("Error"), "Kafka is unavailable")},
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
            "get": operation("This document", None,
                       {"200": json_body({"type": "object"}, "OpenAPI 3.1")}, []),
        },
        "/api/v1/schemas": {
            "get": operation("The JSON Schemas of the Kafka commands and events", None,
                       {"200": json_body(ref("MessageSchemaList"), "the schemas")}, []),
        },
        "/api/v1/schemas/{name}": {
            "get": operation(
                "One message JSON Schema (2020-12), to validate what a service produces", None,
                {"200": {"description": "the schema", "content": {
                    SCHEMA_CONTENT_TYPE: {"schema": {"type": "object"}}}}},
                [{"name": "name", "in": "path", "required": True,
                  "schema": {"type": "string", "examples": ["command.run", "events"]}}],
                ("404",)),
        },
        "/docs": {
            "get": operation("A page rendering this document", None,
                       {"200": {"description": "HTML",
                                "content": {"text/html": {"schema": {"type": "string"}}}}}, []),
        },
        # The page at /ui/ and at /ui alike (it names its files by absolute paths).
        **{path: {"get": operation("The live web page (its data calls carry the bearer token)", None,
                             {"200": {"description": "the page", "content": {
                                 "text/html": {"schema": {"type": "string"}}}},
                              "304": {"description": "unchanged (ETag)"}}, [])}
           for path in ("/ui/", "/ui")},
        "/ui/{name}": {
            "get": operation("A script or style sheet of the web page", None,
                       {"200": {"description": "the file", "content": {
                           "text/javascript": {"schema": {"type": "string"}},
                           "text/css": {"schema": {"type": "string"}}}},
                        "304": {"description": "unchanged (ETag)"}},
                       [{"name": "name", "in": "path", "required": True,
                         "schema": {"type": "string", "examples": ["app.js"]}}], ("404",)),
        },
        "/healthz": {"get": operation("Alive", None, {"200": json_body(ref("Health"), "alive")}, [])},
        "/metrics": {
            "get": operation("Prometheus metrics (text exposition format)", "metrics:read",
                       {"200": {"description": "the metrics", "content": {
                           "text/plain": {"schema": {"type": "string"}}}}}, []),
        },
        "/readyz": {
            "get": operation("this process can take writes: Redis takes one, the commands "
                             "topic can be written", None,
                       {"200": json_body(ref("Ready"), "ready"),
                        "503": json_body(ref("Ready"), "a dependency is down or refuses "
                                         "writes")}, []),
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
