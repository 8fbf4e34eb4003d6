"""The OpenAPI document covers every route, and real responses validate against it."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import orjson
from jsonschema import Draft202012Validator
from pydantic import SecretStr
from redis.asyncio import Redis
from referencing import Registry, Resource

from core.codec import Event
from core.scripts import Scripts
from core.settings import Settings
from core.store import BatchStore
from service import openapi
from service.routes import UNMATCHED
from service.webhook import signature
from tests.helpers import AUTH, api_client, api_settings, spec_body

DOC = openapi.build()
DOC_URI = "urn:dhub:openapi"
REGISTRY: Registry[Any] = Registry().with_resource(DOC_URI, Resource.opaque(DOC))


def _validate(route: str, method: str, status: int, content_type: str, body: bytes) -> None:
    operation = DOC["paths"][route][method.lower()]
    responses = operation["responses"]
    assert str(status) in responses, f"{method} {route} answered undocumented {status}"
    content = responses[str(status)].get("content", {})
    assert content_type in content, f"{method} {route} {status}: undocumented {content_type}"
    if content_type != "application/json":
        return
    schema = content[content_type]["schema"]
    pointer = {"$ref": DOC_URI + schema["$ref"]} if "$ref" in schema else schema
    Draft202012Validator(pointer, registry=REGISTRY).validate(orjson.loads(body))


def test_every_route_is_documented(topics: Settings) -> None:
    from service.app import init_app

    app = init_app(api_settings(topics))
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and r.method != "HEAD" and r.name != UNMATCHED}
    documented = {(m, p) for p, ops in DOC["paths"].items() for m in ops}
    assert routes == documented
    Draft202012Validator.check_schema({"$defs": DOC["components"]["schemas"]})


async def test_real_responses_validate_against_the_document(topics: Settings, redis: Redis) -> None:
    secret = "hook-secret"
    settings = api_settings(topics, webhook_secret=SecretStr(secret))
    async with api_client(settings) as api:
        calls: list[tuple[str, str, str, dict[str, Any]]] = []

        async def call(method: str, route: str, path: str, **kwargs: Any) -> Any:
            response = await api.request(method, path, **kwargs)
            body = await response.read()
            _validate(route, method, response.status, response.content_type, body)
            calls.append((method, route, path, kwargs))
            return orjson.loads(body) if response.content_type == "application/json" else body

        b = "/api/v1/batches/{pipeline_id}"
        await call("PUT", "/api/v1/pipelines/{pipeline_id}", "/api/v1/pipelines/p", json=spec_body(), headers=AUTH)
        await call("PUT", "/api/v1/pipelines/{pipeline_id}", "/api/v1/pipelines/p", json=spec_body(), headers=AUTH)
        await call("PUT", "/api/v1/pipelines/{pipeline_id}", "/api/v1/pipelines/p",
                   json=spec_body(steps=("extract", "load")), headers=AUTH)
        await call("GET", "/api/v1/pipelines/{pipeline_id}", "/api/v1/pipelines/p", headers=AUTH)
        await call("GET", "/api/v1/pipelines/{pipeline_id}", "/api/v1/pipelines/q", headers=AUTH)
        await call("GET", "/api/v1/pipelines/", "/api/v1/pipelines/", headers=AUTH)
        await call("GET", b, "/api/v1/batches/p", headers=AUTH)  # 404: none yet
        batch_id = (await call("POST", b, "/api/v1/batches/p", headers=AUTH))["item"]
        await call("POST", b, "/api/v1/batches/p")  # 401
        await call("POST", b, "/api/v1/batches/q", headers=AUTH)  # 404
        await call("GET", b, "/api/v1/batches/p", headers=AUTH)
        await call("GET", b + "/", "/api/v1/batches/p/?limit=1", headers=AUTH)
        await call("GET", b + "/", "/api/v1/batches/p/?limit=x", headers=AUTH)
        one = b + "/{batch_id}"
        await call("GET", one, f"/api/v1/batches/p/{batch_id}", headers=AUTH)
        await call("GET", b + "/", "/api/v1/batches/p/?state=pending&outcome=failed",
                   headers=AUTH)
        await call("GET", b + "/", "/api/v1/batches/p/?created_after=2026-01-01T00:00:00",
                   headers=AUTH)  # 400: no timezone
        await call("PUT", one + "/stop", f"/api/v1/batches/p/{batch_id}/stop", headers=AUTH)
        resume = one + "/resume"
        await call("POST", resume, f"/api/v1/batches/p/{batch_id}/resume",
                   headers=AUTH)  # 409: not stopped
        stopped_id = (await call("POST", b, "/api/v1/batches/p", headers=AUTH,
                                 json={"config": {"extract": {"rows": 10}}}))["item"]
        await BatchStore(redis, Scripts(redis), token_secret=b"t").apply(
            [Event("batch.state", stopped_id, "p", state="stop", outcome="failed")])
        await call("POST", resume, f"/api/v1/batches/p/{stopped_id}/resume", headers=AUTH,
                   json={"config": {"extract": {"rows": 20}}})
        await call("POST", resume, f"/api/v1/batches/p/{stopped_id}/resume", headers=AUTH,
                   json={"config": {"nope": {}}})  # 400
        await call("POST", b, "/api/v1/batches/p", headers=AUTH,
                   json={"config": {"extract": {"rows": -1}}})  # 400
        await call("DELETE", one, f"/api/v1/batches/p/{batch_id}", headers=AUTH)
        await call("GET", one, f"/api/v1/batches/p/{batch_id}", headers=AUTH)  # 404 now
        await call("POST", resume, f"/api/v1/batches/p/{batch_id}/resume",
                   headers=AUTH)  # 404: deleted
        await call("GET", "/api/v1/steps", "/api/v1/steps", headers=AUTH)
        await call("GET", "/api/v1/steps", "/api/v1/steps")  # 401
        await call("GET", "/healthz", "/healthz")
        await call("GET", "/readyz", "/readyz")
        await call("GET", "/metrics", "/metrics", headers=AUTH)
        await call("GET", "/api/v1/openapi.json", "/api/v1/openapi.json")
        await call("GET", "/docs", "/docs")
        await call("GET", "/ui", "/ui")
        await call("GET", "/ui/", "/ui/")
        await call("GET", "/ui/{name}", "/ui/app.js")
        await call("GET", "/ui/{name}", "/ui/style.css")
        await call("GET", "/ui/{name}", "/ui/nope.js")
        await call("GET", "/api/v1/schemas", "/api/v1/schemas")
        await call("GET", "/api/v1/schemas/{name}", "/api/v1/schemas/command.run")
        await call("GET", "/api/v1/schemas/{name}", "/api/v1/schemas/nope")
        prefect_event = {"id": "0c6a8d9e-0000-4000-8000-000000000001", "event": "prefect.flow-run.Running",
                         "occurred": "2026-11-27T00:00:00Z",
                         "resource": {"prefect.resource.id": "prefect.flow-run.abc"}, "related": []}
        raw = orjson.dumps(prefect_event)
        ts = str(int(time.time()))
        await call("POST", "/api/v1/hooks/prefect", "/api/v1/hooks/prefect", data=raw,
                   headers={"X-Dhub-Timestamp": ts, "X-Dhub-Signature": signature(secret.encode(), ts, raw),
                            "Content-Type": "application/json"})
        await call("POST", "/api/v1/hooks/prefect", "/api/v1/hooks/prefect", data=raw,
                   headers={"X-Dhub-Timestamp": ts, "X-Dhub-Signature": "sha256=" + hashlib.sha256(raw).hexdigest()})
        routes_hit = {(m.lower(), r) for m, r, _, _ in calls}
        documented = {(m, p) for p, ops in DOC["paths"].items() for m in ops}
        assert routes_hit == documented, documented - routes_hit


def test_request_schemas_are_the_models_the_handlers_validate_with() -> None:
    """No hand-kept copy: the limits of PipelineSpec are the document's."""
    from core.models import PipelineSpec
    from core.step_catalogue import known_steps

    schemas = DOC["components"]["schemas"]
    spec = schemas["PipelineSpec"]
    model = PipelineSpec.model_json_schema()
    assert spec["properties"]["steps"]["maxItems"] == model["properties"]["steps"]["maxItems"] == 100
    assert spec["properties"]["steps"]["minItems"] == 1
    assert spec["additionalProperties"] is False
    step = schemas[spec["properties"]["steps"]["items"]["$ref"].rsplit("/", 1)[1]]
    assert step["properties"]["uses"]["maxLength"] == 256
    assert step["properties"]["uses"]["enum"] == sorted(known_steps())
    config_value = schemas[step["properties"]["config"]["additionalProperties"]["$ref"].rsplit("/", 1)[1]]
    bounded = [s for s in config_value["anyOf"] if s.get("type") in ("integer", "number")]
    assert bounded and all(s["maximum"] == 2**53 - 1 and s["minimum"] == -(2**53 - 1) for s in bounded)


def test_every_operation_documents_its_error_answers() -> None:
    for path, ops in DOC["paths"].items():
        for method, op in ops.items():
            responses = op["responses"]
            expected = {"400", "405", "414", "431"}
            if "security" in op:
                expected |= {"401", "403", "503"}
            creates = (method, path) == ("put", "/api/v1/pipelines/{pipeline_id}")
            if "{pipeline_id}" in path and path != "/api/v1/batches/{pipeline_id}/" and not creates:
                expected.add("404")
            if "requestBody" in op:
                expected.add("413")
            assert expected <= set(responses), (method, path, expected - set(responses))
            for status, response in responses.items():
                if int(status) >= 400 and path != "/readyz":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)


async def test_405_and_413_answers_validate_against_the_document(topics: Settings, redis: Redis) -> None:
    async with api_client(api_settings(topics, max_body_bytes=64)) as api:
        response = await api.patch("/api/v1/pipelines/p", headers=AUTH)
        assert response.headers["Allow"]
        _validate("/api/v1/pipelines/{pipeline_id}", "PUT", response.status, response.content_type,
                  await response.read())
        response = await api.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)
        assert response.status == 413
        _validate("/api/v1/pipelines/{pipeline_id}", "PUT", response.status, response.content_type,
                  await response.read())
