"""An API process keeps each (pipeline, version)'s parsed definition for good
(`service.creates._SPECS`: "a version is immutable"), and the create script checked only the
latest version's *name* (it now checks the definition's digest too). After Redis lost the
registry (a restart without persistence; the rebuild's own docs: "Redis lost, the pipeline
PUT again before the rebuild"), a client PUTs v1 again with another definition: 201, GET
shows it. A POST on a process that had run v1
before recorded its batch with the old definition (its steps and config), while the flow
planned the steps from the registry's new one."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

from core import keys
from core.api_scripts import ApiScripts
from core.codec import Event
from core.models import PipelineSpec
from core.registry import PipelineRegistry, registered_body
from core.scripts import Scripts
from core.settings import Settings
from core.store import BatchStore
from service import creates
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


async def test_a_create_holding_the_stale_definition_is_still_checked(
        test_settings: Settings, redis: Redis) -> None:
    """The digest was looked up by version: a request holding the stale definition after
    another request had found it changed (forgotten, the new one read) sent '' (no check),
    and its batch was recorded with the stale definition. It is now kept by the object."""
    scripts = Scripts(redis)
    registry = PipelineRegistry(redis, scripts)
    store = BatchStore(redis, scripts, token_secret=b"t")
    api_scripts = ApiScripts(redis)
    s1 = PipelineSpec.model_validate(spec_body(version="1"))
    await registry.register("p", s1)
    # 1. The process has v1 cached (a POST ran it)
    cached = await creates.latest_spec(registry, "p", "1")
    await creates.record(store, api_scripts, registry, "p", "B0", cached, True)
    # Redis lost the registry; v1 registered again with another definition.
    s2 = PipelineSpec.model_validate(spec_body(version="1", steps=("extract",)))
    await redis.hset(keys.pipeline_versions("p"), "1", registered_body(s2))
    # 2. Request A resolves v1: the cached S1.
    held_by_a = await creates.latest_spec(registry, "p", "1")
    assert held_by_a is cached
    # 3. Request B creates first: its create finds the change, and re-reads v1.
    b = await creates.record(store, api_scripts, registry, "p", "BB", held_by_a, True)
    assert [s.name for s in b.spec.steps] == ["extract"]
    # 4. Request A creates with what it resolved.
    a = await creates.record(store, api_scripts, registry, "p", "BA", held_by_a, True)
    fields = await store.fields("p", "BA")
    assert fields is not None
    steps = sorted(k.removeprefix("step:") for k in fields if k.startswith("step:"))
    assert ([s.name for s in a.spec.steps], steps) == (["extract"], ["extract"]), (
        f"batch BA recorded with the stale definition: spec steps "
        f"{[s.name for s in a.spec.steps]}, hash steps {steps}; registry holds ['extract']")


async def test_concurrent_posts_after_the_registry_changed(topics: Settings, redis: Redis) -> None:
    """The same over HTTP: two POSTs of one moment on the process that cached v1; one with an
    Idempotency-Key (its claim is one more Redis round trip before its create)."""
    settings = api_settings(topics)
    async with api_client(settings) as api:
        assert (await api.put("/api/v1/pipelines/p", json=spec_body(version="1"),
                              headers=AUTH)).status == 201
        assert (await api.post("/api/v1/batches/p", headers=AUTH)).status == 200
        await redis.flushdb()  # Redis lost; v1 registered again, another definition
        new = spec_body(version="1", steps=("extract",))
        assert (await api.put("/api/v1/pipelines/p", json=new, headers=AUTH)).status == 201
        b, a = await asyncio.gather(
            api.post("/api/v1/batches/p", headers=AUTH),
            api.post("/api/v1/batches/p", headers={**AUTH, "Idempotency-Key": "k-a"}))
        assert (a.status, b.status) == (200, 200), (await a.text(), await b.text())
        shown: dict[str, Any] = {}
        for name, resp in (("A (key)", a), ("B", b)):
            batch_id = (await resp.json())["item"]
            batch = await (await api.get(f"/api/v1/batches/p/{batch_id}", headers=AUTH)).json()
            shown[name] = list(batch["state"]["steps"])
    assert shown == {"A (key)": ["extract"], "B": ["extract"]}, (
        f"GET /pipelines/p shows v1 with steps ['extract']; the batches were recorded as {shown}")


async def test_a_post_with_overrides_is_judged_against_the_registrys_definition(
        topics: Settings, redis: Redis) -> None:
    """A POST whose overrides the cached definition refuses had the refusal "confirmed"
    against the same cached object: a 400 though the registry's definition takes them (no
    create comes to check a refused request's definition)."""
    settings = api_settings(topics)
    old = spec_body(version="1", steps=("extract",))
    new = spec_body(version="1")  # extract, transform, load
    body = {"config": {"load": {"rows": 500}}}
    async with api_client(settings) as api:
        assert (await api.put("/api/v1/pipelines/p", json=old, headers=AUTH)).status == 201
        assert (await api.post("/api/v1/batches/p", headers=AUTH)).status == 200  # caches v1
        await redis.flushdb()  # Redis lost; v1 PUT again with another definition
        assert (await api.put("/api/v1/pipelines/p", json=new, headers=AUTH)).status == 201
        shown = await (await api.get("/api/v1/pipelines/p", headers=AUTH)).json()
        assert [s["name"] for s in shown["versions"][0]["steps"]] == ["extract", "transform",
                                                                     "load"]
        resp = await api.post("/api/v1/batches/p", json=body, headers=AUTH)
        text = await resp.text()
    assert resp.status == 200, f"{resp.status}: {text}"
