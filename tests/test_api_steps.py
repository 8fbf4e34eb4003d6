"""`GET /api/v1/steps` and the registration check of plugin steps' config, on the real Redis and
Kafka (an in-process API)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core.settings import Settings
from core.step_catalogue import declarations
from service.step_routes import StepList
from tests.helpers import AUTH, api_client, api_settings, bearer
from tests.test_api_auth import hs_token

Client = TestClient[Any, Any]


@pytest.fixture
async def api(topics: Settings, redis: Redis) -> AsyncIterator[Client]:
    async with api_client(api_settings(topics)) as client:
        yield client


async def test_the_step_list_shows_every_installed_implementation(api: Client) -> None:
    response = await api.get("/api/v1/steps", headers=AUTH)
    assert response.status == 200
    body = await response.json()
    StepList.model_validate(body)
    items = body["items"]
    assert list(items) == sorted(items)
    assert {"sales.extract", "sales.transform", "sales.load", "wordcount.generate",
            "wordcount.count", "wordcount.merge"} <= set(items)
    for name, item in items.items():
        declared = declarations()[name]
        assert item == {"uses": name, "doc": declared.doc,
                        "config_schema": declared.config.model_json_schema()}
    count = items["wordcount.count"]
    assert count["doc"].startswith("Counts the words")
    lines = count["config_schema"]["properties"]["lines"]
    assert (lines["minimum"], lines["maximum"]) == (1, 100_000)
    assert count["config_schema"]["additionalProperties"] is False
    rows = items["sales.extract"]["config_schema"]["properties"]["rows"]
    assert rows["maximum"] == 10_000_000


async def test_the_step_list_needs_the_read_scope(api: Client) -> None:
    assert (await api.get("/api/v1/steps")).status == 401
    denied = await api.get("/api/v1/steps", headers=bearer(hs_token("pipelines:write")))
    assert denied.status == 403 and (await denied.json())["error"]["code"] == "forbidden"
    assert (await api.get("/api/v1/steps", headers=bearer(hs_token("batches:read")))).status == 200


def wordcount(name: str, **config: Any) -> dict[str, Any]:
    return {"name": name, "version": "1", "steps": [
        {"name": step, "uses": f"wordcount.{step}", "config": config}
        for step in ("generate", "count", "merge")]}


async def test_a_plugin_step_is_registered_and_its_config_checked_first(api: Client) -> None:
    bad = await api.put("/api/v1/pipelines/wc-bad",
                        json=wordcount("wc-bad", lines=100_001, words_per_line=0), headers=AUTH)
    assert bad.status == 400
    error = (await bad.json())["error"]
    assert error["message"] == "invalid step config"
    locs = {p["loc"] for p in error["details"]["problems"]}
    assert {"steps.0.config.lines", "steps.0.config.words_per_line",
            "steps.2.config.lines"} <= locs
    slow = await api.put("/api/v1/pipelines/wc-bad",
                         json=wordcount("wc-bad", lines=100_000, throttle=0.5), headers=AUTH)
    assert slow.status == 400 and "at most 300 s" in await slow.text()
    # Nothing was stored for the refused definitions.
    assert (await api.get("/api/v1/pipelines/wc-bad", headers=AUTH)).status == 404

    ok = await api.put("/api/v1/pipelines/wc-ok", json=wordcount("wc-ok", lines=10), headers=AUTH)
    assert ok.status == 201, await ok.text()
    assert [s["uses"] for s in (await ok.json())["versions"][0]["steps"]] == [
        "wordcount.generate", "wordcount.count", "wordcount.merge"]
