"""Scenario 2: Redis turns read-only mid-stream (a failover made it a replica), then back.

`REPLICAOF` a closed port makes the chaos Redis a replica that never syncs: it keeps its
data, serves reads and answers READONLY to every write, as a demoted primary does. The
events consumer must wait that out: nothing dead-lettered, nothing lost.
"""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest
from redis.asyncio import Redis

from tests.chaos.stackctl import ChaosStack
from tests.chaos.streams import OffsetStream, records_since, seed_batches, send, topic_ends
from tests.chaos.watch import Poller, lost_updates, report, settle_offsets

BATCHES = 20
EVENTS = 20_000
RATE = 1_500.0
READ_ONLY_S = 6.0


def closed_port() -> int:
    """A port nothing listens on (bound then released: refused when Redis tries it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(180)
async def test_redis_read_only_mid_stream(chaos: ChaosStack, chaos_redis: Redis,
                                          http: httpx.AsyncClient) -> None:
    pipeline_id, batch_ids = await seed_batches(chaos_redis, chaos.settings, "chaos-ro", BATCHES)
    stream = OffsetStream(pipeline_id, batch_ids, seed=3).build(EVENTS)
    dlq_before = await topic_ends(chaos.settings, chaos.settings.topic_dlq)
    window: list[float] = []

    async def demote() -> None:
        await asyncio.sleep(3.0)
        await chaos_redis.replicaof("127.0.0.1", str(closed_port()))
        window.append(time.monotonic())
        try:
            await asyncio.sleep(READ_ONLY_S)
        finally:
            await chaos_redis.replicaof("NO", "ONE")
            window.append(time.monotonic())

    async with Poller(http, pipeline_id, batch_ids[:8]) as poller:
        fault = asyncio.create_task(demote())
        try:
            sent_s = await send(chaos.settings, stream.records, RATE)
        finally:
            await fault
        seen, catch_up = await settle_offsets(http, pipeline_id, batch_ids, stream.expected, 60)
    role = await chaos_redis.role()
    dead = await records_since(chaos.settings, chaos.settings.topic_dlq, dlq_before)
    lost = lost_updates(stream.expected, seen)
    reasons = sorted({dict(r.headers).get("dhub-dlq-reason", b"").decode()[:120] for r in dead})
    report("Redis read-only (REPLICAOF) mid-stream, then primary again",
           stream=stream.describe(), sent_in=f"{sent_s:.1f}s",
           read_only_for=f"{window[1] - window[0]:.1f}s" if len(window) == 2 else "?",
           all_offsets_visible_after_stream_end=f"{catch_up:.1f}s",
           dead_lettered=len(dead), dead_letter_reasons=reasons[:3],
           lost_updates=f"{len(lost)} of {len(stream.expected)} series", poll=poller.describe())
    assert role[0] == "master"
    assert not dead, f"{len(dead)} records dead-lettered while Redis was read-only: {reasons[:3]}"
    assert not lost, f"{len(lost)} series lost updates: {lost[:10]}"
    assert not poller.regressions, poller.regressions[:10]
