"""An API process keeps each (pipeline, version)'s parsed definition for good
(`service.creates._SPECS`: "a version is immutable"), and the create script checked only the
latest version's *name* (it now checks the definition's digest too). After Redis lost the
registry (a restart without persistence; the rebuild's own docs: "Redis lost, the pipeline
PUT again before the rebuild"), a client PUTs v1 again with another definition: 201, GET
shows it. A POST on a process that had run v1
before recorded its batch with the old definition (its steps and config), while the flow
planned the steps from the registry's new one."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from core import keys
from core.codec import Event
from core.models import PipelineSpec
from core.registry import registered_body
from core.scripts import Scripts
from core.settings import Settings
from core.store import BatchStore
from tests.helpers import AUTH, api_client, api_settings, spec_body


async def test_a_post_records_the_definition_get_shows(topics: Settings, redis: Redis) -> None:
    settings = api_settings(topics)
    old = spec_body(version="1")
    old["steps"][0]["config"] = {"rows": 700}
    new = spec_body(version="1", steps=("extract",))
    new["steps"][0]["config"] = {"rows": 900}
    async with api_client(settings) as api:
        assert (await api.put("/api/v1/pipelines/p", json=old, headers=AUTH)).status == 201
        assert (await api.post("/api/v1/batches/p", headers=AUTH)).status == 200

        await redis.flushdb()  # Redis lost (no persistence); nothing rebuilt yet
        resp = await api.put("/api/v1/pipelines/p", json=new, headers=AUTH)
        assert resp.status == 201, await resp.text()
        shown: dict[str, Any] = await (await api.get("/api/v1/pipelines/p", headers=AUTH)).json()
        [v1] = shown["versions"]

        resp = await api.post("/api/v1/batches/p", headers=AUTH)
        assert resp.status == 200, await resp.text()
        batch_id = (await resp.json())["item"]
        batch = await (await api.get(f"/api/v1/batches/p/{batch_id}", headers=AUTH)).json()
    recorded = {"version": batch["pipeline_version"],
                "steps": list(batch["state"]["steps"]),
                "config": batch.get("config")}
    expected = {"version": "1", "steps": [s["name"] for s in v1["steps"]],
                "config": {s["name"]: s["config"] for s in v1["steps"]}}
    assert recorded == expected, (
        f"GET /pipelines/p shows v1 = {expected}; the batch POSTed after it was recorded as "
        f"{recorded}")


async def test_a_resume_records_the_definition_the_registry_holds(topics: Settings,
                                                                  redis: Redis) -> None:
    """The resume of a batch took its version's definition from the same cache: after the
    registry changed under the version's name it recorded the old steps (its config is the
    batch's own, as any resume's)."""
    settings = api_settings(topics)
    async with api_client(settings) as api:
        resp = await api.put("/api/v1/pipelines/p", json=spec_body(version="1"), headers=AUTH)
        assert resp.status == 201
        resp = await api.post("/api/v1/batches/p", headers=AUTH)  # the process caches v1
        batch_id = (await resp.json())["item"]
        store = BatchStore(redis, Scripts(redis), token_secret=b"t")
        await store.apply([Event("batch.state", batch_id, "p", state="stop", outcome="failed",
                                 event_id="failed-1", ts=1.0)])
        # What a registration again after a loss leaves (as the test above): v1, another body.
        new = PipelineSpec.model_validate(spec_body(version="1", steps=("extract", "load")))
        await redis.hset(keys.pipeline_versions("p"), "1", registered_body(new))
        resp = await api.post(f"/api/v1/batches/p/{batch_id}/resume", headers=AUTH)
        assert resp.status == 200, await resp.text()
        resumed = (await resp.json())["item"]
        batch = await (await api.get(f"/api/v1/batches/p/{resumed}", headers=AUTH)).json()
    assert list(batch["state"]["steps"]) == ["extract", "load"]
