"""A run command whose `recorded.seq` is past what Redis's sequence counter holds (the
published schema says "integer"): the live consumer does not read `seq`, but a later rebuild
raised the pipeline's counter to it, and every POST of the pipeline failed after it (500).
Such a record is now refused at its decode, and the rebuild leaves it out."""

from __future__ import annotations

import time
import uuid

import orjson
from redis.asyncio import Redis

from consumers.rebuild import rebuild
from core import keys
from core.settings import Settings
from core.snapshots import pipeline_key, pipeline_record
from tests.helpers import AUTH, api_client, api_settings, spec
from tests.test_consumers_support import send, unique


async def test_a_recorded_seq_past_redis_counters_breaks_every_post_after_a_rebuild(
        topics: Settings, redis: Redis) -> None:
    p = unique("test-seq")
    await send(topics, topics.topic_pipelines, pipeline_key(p, "1").decode(),
               pipeline_record(p, spec(version="1"), 0))
    forged = unique("batch-forged")
    await send(topics, topics.topic_commands, forged, orjson.dumps({
        "schema": 1, "type": "run", "event_id": uuid.uuid4().hex, "batch_id": forged,
        "pipeline_id": p, "pipeline_version": "1", "ts": time.time(),
        "recorded": {"seq": 2**63, "created_at": "2026-12-05T00:00:00.000Z"}}))
    await rebuild(topics)  # Redis lost, rebuilt from the topics
    async with api_client(api_settings(topics)) as api:
        response = await api.post(f"/api/v1/batches/{p}", headers=AUTH)
        text = await response.text()
        listed = await api.get(f"/api/v1/batches/{p}/", headers=AUTH)
        assert response.status == 200, (
            f"POST after the rebuild: {response.status} {text}; counter "
            f"{await redis.get(keys.batch_seq(p))!r}; list {listed.status}")
