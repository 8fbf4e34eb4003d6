"""A PUT whose pipelines-topic record Kafka confirms after the API's wait ran out (503,
"retry later"). A timed-out wait withdraws nothing: the producer still delivers the record,
and a rebuild of Redis from the topic registered its version though Redis never had. With
two API processes it was worse: PUT v2 {rows: 900} on A answered 503; PUT v2 {rows: 800} on
B answered 201 and GET showed it; A's record landed after B's, and the rebuild restored the
refused definition in place of the accepted one.

Now a record confirmed late is settled as the topic says: registered at once, or, another
definition of the version held, that one's record written again after it. The late
confirmation is modelled by holding the real send until after the 503, then letting it
through."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

from consumers.rebuild import rebuild
from core.settings import Settings
from service import pipeline_routes
from service.appkeys import PRODUCER
from tests.conftest import eventually
from tests.helpers import AUTH, api_client, api_settings, spec_body


def _late(api: Any, settings: Settings, release: asyncio.Event) -> list[asyncio.Task[None]]:
    """The app's producer confirms pipelines-topic records only once `release` is set (the
    record queued, or in flight, while the route's wait runs out); the tasks holding them."""
    producer = api.app[PRODUCER]
    real_send = producer.send
    held: list[asyncio.Task[None]] = []

    async def slow(topic: str, *args: Any, **kwargs: Any) -> Any:
        if topic != settings.topic_pipelines or release.is_set():
            return await real_send(topic, *args, **kwargs)
        confirmed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def later() -> None:
            await release.wait()
            try:
                confirmed.set_result(await (await real_send(topic, *args, **kwargs)))
            except Exception as exc:  # as a real delivery's failure
                confirmed.set_exception(exc)

        held.append(asyncio.get_running_loop().create_task(later()))
        return confirmed

    producer.send = slow
    return held


async def _versions(api: Any) -> dict[str, Any]:
    shown: dict[str, Any] = await (await api.get("/api/v1/pipelines/p", headers=AUTH)).json()
    return {v["version"]: v["steps"][0]["config"] for v in shown["versions"]}


async def test_a_record_confirmed_after_its_503_is_registered_as_a_rebuild_would(
        topics: Settings, redis: Redis, monkeypatch: Any) -> None:
    monkeypatch.setattr(pipeline_routes, "RECORD_TIMEOUT_S", 0.3)
    settings = api_settings(topics)
    release = asyncio.Event()
    async with api_client(settings) as api:
        resp = await api.put("/api/v1/pipelines/p", json=spec_body(version="1"), headers=AUTH)
        assert resp.status == 201
        _late(api, settings, release)
        resp = await api.put("/api/v1/pipelines/p", json=spec_body(version="2"), headers=AUTH)
        assert resp.status == 503, await resp.text()
        assert list(await _versions(api)) == ["1"]
        release.set()  # Kafka confirms the record now, after the 503

        async def registered() -> bool:
            return list(await _versions(api)) == ["1", "2"]
        await eventually(registered, timeout=20)
        before = await _versions(api)

    await redis.flushdb()  # Redis lost; rebuilt from the topics
    await rebuild(topics, force=True)
    async with api_client(settings) as api:
        assert await _versions(api) == before


async def test_an_accepted_put_is_not_replaced_by_a_503_puts_late_record(
        topics: Settings, redis: Redis, monkeypatch: Any) -> None:
    monkeypatch.setattr(pipeline_routes, "RECORD_TIMEOUT_S", 0.3)
    settings = api_settings(topics)
    accepted, refused = spec_body(version="2"), spec_body(version="2")
    accepted["steps"][0]["config"] = {"rows": 800}
    refused["steps"][0]["config"] = {"rows": 900}
    release = asyncio.Event()
    async with api_client(settings) as a, api_client(settings) as b:
        resp = await b.put("/api/v1/pipelines/p", json=spec_body(version="1"), headers=AUTH)
        assert resp.status == 201
        _late(a, settings, release)
        resp = await a.put("/api/v1/pipelines/p", json=refused, headers=AUTH)
        assert resp.status == 503, await resp.text()
        resp = await b.put("/api/v1/pipelines/p", json=accepted, headers=AUTH)
        assert resp.status == 201, await resp.text()
        release.set()  # A's record confirmed now, after B's
        # A settles it: v2 is held with B's definition, whose record goes after A's.
        await eventually(lambda: not pipeline_routes._LATE, timeout=20)
        assert (await _versions(b))["2"] == {"rows": 800}

    await redis.flushdb()
    await rebuild(topics, force=True)
    async with api_client(settings) as api:
        assert (await _versions(api))["2"] == {"rows": 800}


async def _v2_late_after_v3(a: Any, b: Any, settings: Settings) -> None:
    """PUT v2 answered 503 on A (its record held back); PUT v3 answered 201 on B; then A's
    record is confirmed and settled."""
    release = asyncio.Event()
    resp = await b.put("/api/v1/pipelines/p", json=spec_body(version="1"), headers=AUTH)
    assert resp.status == 201
    _late(a, settings, release)
    resp = await a.put("/api/v1/pipelines/p", json=spec_body(version="2"), headers=AUTH)
    assert resp.status == 503, await resp.text()
    resp = await b.put("/api/v1/pipelines/p", json=spec_body(version="3"), headers=AUTH)
    assert resp.status == 201, await resp.text()
    release.set()
    await eventually(lambda: not pipeline_routes._LATE, timeout=20)


async def test_a_late_record_never_makes_its_version_latest_over_one_accepted_since(
        topics: Settings, redis: Redis, monkeypatch: Any) -> None:
    """PUT v2 answered 503 on A; PUT v3 answered 201 on B. A's late confirmation appended
    v2 after v3: latest v2, and POSTs ran the version whose PUT had failed. It is registered
    only at its recorded place now."""
    monkeypatch.setattr(pipeline_routes, "RECORD_TIMEOUT_S", 0.3)
    settings = api_settings(topics)
    async with api_client(settings) as a, api_client(settings) as b:
        await _v2_late_after_v3(a, b, settings)
        assert list(await _versions(b)) == ["1", "3"]
        run = await b.post("/api/v1/batches/p", headers=AUTH)
        batch = await (await b.get(f"/api/v1/batches/p/{(await run.json())['item']}",
                                   headers=AUTH)).json()
    assert batch["pipeline_version"] == "3"


async def test_a_late_record_that_lost_its_place_does_not_come_back_latest_at_a_rebuild(
        topics: Settings, redis: Redis, monkeypatch: Any) -> None:
    """Left unregistered, the late record of v2 stayed on the topic at its place: a rebuild
    found two versions at one place and put v2 after v3, the latest, and POSTs ran it. The
    record is withdrawn (a tombstone)."""
    monkeypatch.setattr(pipeline_routes, "RECORD_TIMEOUT_S", 0.3)
    settings = api_settings(topics)
    async with api_client(settings) as a, api_client(settings) as b:
        await _v2_late_after_v3(a, b, settings)
        before = list(await _versions(b))
        assert before == ["1", "3"]

    await redis.flushdb()  # Redis lost; rebuilt from the topics
    await rebuild(topics, force=True)
    async with api_client(settings) as api:
        assert list(await _versions(api)) == before


def _held_until_flushed(api: Any, settings: Settings) -> None:
    """The pipelines topic's records are delivered only when the producer is flushed or
    stopped (both send what is queued), as a record queued while Kafka was slow."""
    producer = api.app[PRODUCER]
    real_stop, real_flush = producer.stop, producer.flush
    release = asyncio.Event()
    held = _late(api, settings, release)

    async def flush() -> None:
        release.set()
        await asyncio.gather(*held)
        await real_flush()

    async def stop() -> None:
        # aiokafka's stop() flushes what is queued: the held record is delivered now.
        release.set()
        await asyncio.gather(*held)
        await real_stop()

    producer.flush = flush
    producer.stop = stop


async def test_a_late_record_queued_at_shutdown_is_settled_before_the_producer_stops(
        topics: Settings, redis: Redis, monkeypatch: Any) -> None:
    """A SIGTERM while a 503'd PUT's record was still queued: the producer's stop delivered
    it, and the task that would have withdrawn it (it lost its place to v3) found the
    producer closed. A rebuild then made the refused v2 the latest. The app's Kafka clean-up
    now flushes and waits for the late records' settlement first."""
    monkeypatch.setattr(pipeline_routes, "RECORD_TIMEOUT_S", 0.3)
    settings = api_settings(topics)
    async with api_client(settings) as b:
        resp = await b.put("/api/v1/pipelines/p", json=spec_body(version="1"), headers=AUTH)
        assert resp.status == 201
        async with api_client(settings) as a:  # leaving = A's SIGTERM path (runner.cleanup)
            _held_until_flushed(a, settings)
            resp = await a.put("/api/v1/pipelines/p", json=spec_body(version="2"),
                               headers=AUTH)
            assert resp.status == 503, await resp.text()
            resp = await b.put("/api/v1/pipelines/p", json=spec_body(version="3"),
                               headers=AUTH)
            assert resp.status == 201, await resp.text()
            assert pipeline_routes._LATE, "the late record's settlement is pending"
        # A has shut down; its record reached the topic during producer.stop().
        before = list(await _versions(b))
        assert before == ["1", "3"]
        left = list(pipeline_routes._LATE)
    for task in left:  # whatever the shutdown left behind
        task.cancel()

    await redis.flushdb()  # Redis lost; rebuilt from the topics
    await rebuild(topics, force=True)
    async with api_client(settings) as api:
        assert list(await _versions(api)) == before, (
            "v2, answered 503, came back from the topic at a rebuild")
