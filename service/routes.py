"""Every route of the API, one per line. `/{pipeline_id}` and `/{pipeline_id}/` differ on purpose:
the first is the latest batch, the second (trailing slash) the paged list. The patterns do not
overlap, so order only matters for speed: aiohttp tries them in turn, the hot GET comes first."""

from __future__ import annotations

from aiohttp import web

from service import batches, docs, health, hooks, pipelines, schemas


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/batches/{pipeline_id}/{batch_id}", batches.get_batch, name="get_batch")
    r.add_post("/api/v1/batches/{pipeline_id}", batches.run_batch, name="run_batch")
    r.add_get("/api/v1/batches/{pipeline_id}", batches.latest_batch, name="latest_batch")
    r.add_get("/api/v1/batches/{pipeline_id}/", batches.list_batches, name="list_batches")
    r.add_put("/api/v1/batches/{pipeline_id}/{batch_id}/stop", batches.stop_batch, name="stop_batch")
    r.add_delete("/api/v1/batches/{pipeline_id}/{batch_id}", batches.delete_batch, name="delete_batch")
    r.add_put("/api/v1/pipelines/{pipeline_id}", pipelines.put_pipeline, name="put_pipeline")
    r.add_get("/api/v1/pipelines/{pipeline_id}", pipelines.get_pipeline, name="get_pipeline")
    r.add_get("/api/v1/pipelines/", pipelines.list_pipelines, name="list_pipelines")
    r.add_post("/api/v1/hooks/prefect", hooks.prefect_webhook, name="prefect_webhook")
    r.add_get("/api/v1/openapi.json", docs.openapi_json, name="openapi")
    r.add_get("/api/v1/schemas", schemas.list_schemas, name="message_schemas")
    r.add_get("/api/v1/schemas/{name}", schemas.get_schema, name="message_schema")
    r.add_get("/docs", docs.docs_page, name="docs")
    r.add_get("/healthz", health.healthz, name="healthz")
    r.add_get("/readyz", health.readyz, name="readyz")
