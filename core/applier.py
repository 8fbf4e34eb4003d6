"""Events applied to the batch hashes: a poll's events in a few `APPLY_EVENTS` calls (one
per pipeline and up to `apply_chunk` of its batches), then the batches they finished packed
(`core.packing`). `BatchStore.apply` is this; the events consumer is its caller.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import Any

import orjson
from redis.asyncio import Redis

from core import keys
from core.codec import Event, StepOffsets
from core.models import now_iso
from core.packer import Packer
from core.script_calls import run_all
from core.scripts import Scripts

# Batches per APPLY_EVENTS call: enough that a poll is a few calls, few enough that one call
# holds Redis (single-threaded: every other client waits) for a millisecond or two at most.
APPLY_CHUNK = 100
# APPLY_EVENTS's answer for a packed batch (core.packing): `apply` unpacks it and applies
# again, so its callers never see it.
PACKED_BATCH = -2
_UNPACK_TRIES = 5


def script_entries(events: Iterable[Event]) -> dict[str, dict[str, list[list[Any]]]]:
    """The events in `APPLY_EVENTS`'s form, per pipeline and batch, each batch's in order,
    except that the offsets events of one (batch, step) become one entry holding each
    partition's highest offset, after the batch's other events.

    Safe because `APPLY_EVENTS` applies offsets by value (max) and never de-duplicates them
    by id: the merged entry leaves Redis exactly as applying each event would, and offsets
    commute with state events (they read only the step's existence). It moves the cost of a
    fast offsets stream (many updates of the same partitions) out of the Redis script. The
    events given are not modified."""
    grouped: dict[str, dict[str, list[list[Any]]]] = {}
    merged: dict[tuple[str, str, str], dict[str, int]] = {}
    totals: dict[tuple[str, str, str], dict[str, int]] = {}
    for event in events:
        # An exact class test and plain attribute reads: this loop runs once per event of a
        # fast stream, and most of its events merge into another.
        if type(event) is StepOffsets:
            key = (event.pipeline_id, event.batch_id, event.step)
            if event.totals:  # the latest a step said of each partition
                totals.setdefault(key, {}).update(event.totals)
            into = merged.get(key)
            if into is None:
                merged[key] = dict(event.offsets)
            else:
                for part, value in event.offsets.items():
                    if value > into.get(part, -1):
                        into[part] = value
            continue
        batches = grouped.get(event.pipeline_id)
        if batches is None:
            batches = grouped[event.pipeline_id] = {}
        entries = batches.get(event.batch_id)
        if entries is None:
            entries = batches[event.batch_id] = []
        entries.append(event.to_script())
    for (pipeline_id, batch_id, step), offsets in merged.items():
        entry: list[Any] = ["o", step]
        for part, value in offsets.items():
            entry += (part, str(value))  # a string: a Lua number written back keeps 14 digits
        entries = grouped.setdefault(pipeline_id, {}).setdefault(batch_id, [])
        entries.append(entry)
        step_totals = totals.get((pipeline_id, batch_id, step))
        if step_totals:
            entries.append(["t", step, *(x for part, total in step_totals.items()
                                         for x in (part, str(total)))])
    return grouped


class Applier:
    def __init__(self, redis: Redis, scripts: Scripts, *, changes_channel: str,
                 dedup_window: int, apply_chunk: int) -> None:
        self.redis = redis
        self.scripts = scripts
        self._channel = changes_channel
        self._dedup_window = dedup_window
        self._apply_chunk = apply_chunk
        self._packer = Packer(redis, apply_chunk)

    async def apply(self, events: Iterable[Event], now: str | None = None
                    ) -> dict[tuple[str, str], int]:
        """Applies events in one round trip: one `APPLY_EVENTS` call per pipeline and up to
        `apply_chunk` of its batches (a few calls per poll, not one per batch: the client's
        cost per call was most of the consumer's). The offsets events of one (batch, step)
        are merged first (`script_entries`).

        A finished batch is packed (`core.packing`) by the apply that stopped it: two more
        round trips for a poll holding stops (read, PACK). An event for a packed batch (late,
        or re-delivered) costs three more: the batch is read and unpacked (UNPACK), and its
        events applied again; it is then packed with the stops.

        Returns, per (pipeline_id, batch_id), how many events changed it (-1: batch unknown
        or deleted, its events dropped)."""
        grouped = script_entries(events)
        if not grouped:
            return {}
        now = now or now_iso()  # `now`: a test's clock (a batch stopped long ago)
        results = await self._apply_events(grouped, now)
        unpacked_now: list[tuple[str, str]] = []
        tries = 0
        while packed := [batch for batch, n in results.items() if n == PACKED_BATCH]:
            if tries == _UNPACK_TRIES:
                # Packed again before each of its applies: only another client packing it
                # over and over does that (none packs a batch it did not just apply to).
                raise RuntimeError(f"batches packed again under each apply: {packed}")
            tries += 1
            await self._packer.unpack(packed)
            unpacked_now += packed
            again: dict[str, dict[str, list[list[Any]]]] = {}
            for pipeline_id, batch_id in packed:
                again.setdefault(pipeline_id, {})[batch_id] = grouped[pipeline_id][batch_id]
            results.update(await self._apply_events(again, now))
        stopping = [(pipeline_id, batch_id)
                    for pipeline_id, batches in grouped.items()
                    for batch_id, entries in batches.items()
                    if any(e[0] == "b" and e[2] == "stop" for e in entries)]
        await self._packer.pack([batch for batch in dict.fromkeys(stopping + unpacked_now)
                                 if results[batch] >= 0])
        return results

    async def _apply_events(self, grouped: dict[str, dict[str, list[list[Any]]]], now: str
                            ) -> dict[tuple[str, str], int]:
        order: list[tuple[str, str]] = []
        calls: list[list[Any]] = []  # EVALSHA's arguments after the sha, one list per call
        for pipeline_id, batches in grouped.items():
            ids = list(batches)
            # APPLY_EVENTS's first keys: the filter indexes, then the finished index.
            indexes = [*keys.batch_filter_indexes(pipeline_id),
                       keys.batch_finished_index(pipeline_id)]
            for start in range(0, len(ids), self._apply_chunk):
                chunk = ids[start : start + self._apply_chunk]
                names = list(indexes)
                for batch_id in chunk:
                    names += (keys.batch(pipeline_id, batch_id),
                              keys.batch_seen(pipeline_id, batch_id))
                    order.append((pipeline_id, batch_id))
                payload = orjson.dumps([batches[batch_id] for batch_id in chunk])
                calls.append([len(names), *names, now, self._dedup_window, self._channel,
                              payload])
        results = await run_all(self.redis, self.scripts.apply_events, calls)
        return dict(zip(order, chain.from_iterable(results), strict=True))
