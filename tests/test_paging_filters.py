"""The list's filters against a brute-force filter of every batch: each combination of
`state`, `outcome`, `created_after` and `created_before`, paged with tokens at several
limits, gives exactly the visible batches that match, newest first (hidden and purged ones
never), over the indexes as the scripts keep them (`state=stop` merged from the outcome
indexes, the created bounds searched in the batch index)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
from redis.asyncio import Redis

from core import keys
from core.codec import Event
from core.list_filter import ListFilter
from core.models import BATCH_STATES, OUTCOMES
from core.packing import unpacked
from core.scripts import Scripts
from core.store import BatchStore
from tests.helpers import spec

P = "brute"
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def iso(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@pytest.fixture
def store(redis: Redis, scripts: Scripts) -> BatchStore:
    return BatchStore(redis, scripts, token_secret=b"brute", changes_channel="")


async def history(store: BatchStore, redis: Redis, n: int) -> list[str]:
    """n batches in every state and outcome, some sharing a millisecond, some hidden and one
    purged; the ids in creation order."""
    rng = random.Random(12)
    ids = [f"b{k:03d}" for k in range(n)]
    at = T0
    for batch_id in ids:
        await store.create(P, batch_id, spec())
        at += timedelta(milliseconds=rng.choice([0, 0, 1, 7, 1000]))
        await redis.hset(keys.batch(P, batch_id), mapping={"created_at": iso(at),
                                                           "updated_at": iso(at)})
    events: list[Event] = []
    for batch_id in ids:
        state = rng.choice(BATCH_STATES)
        if state != "pending":
            outcome = rng.choice(OUTCOMES)  # drawn for every state: the later draws stay put
            events.append(Event("batch.state", batch_id, P, state=state, ts=1.0,
                                outcome=outcome if state == "stop" else None))
    await store.apply(events)
    for batch_id in rng.sample(ids, 6):
        await store.hide(P, batch_id)
    await store.purge(P, ids[n // 2])
    return ids


async def brute(redis: Redis, ids: list[str], where: ListFilter) -> list[str]:
    """The visible batches `where` matches, newest first, from every hash."""
    out = []
    for batch_id in reversed(ids):
        fields = unpacked(cast(dict[str, str], await redis.hgetall(keys.batch(P, batch_id))))
        if fields and "deleted" not in fields and where.matches(fields):
            out.append(batch_id)
    return out


async def paged(store: BatchStore, where: ListFilter, limit: int) -> list[str]:
    seen: list[str] = []
    token: str | None = None
    while True:
        page = await store.page(P, limit, token, where)
        assert len(page.items) <= limit
        seen += page.items
        token = page.token
        if token is None:
            return seen


async def test_every_filter_pages_as_a_brute_force_filter_does(
        store: BatchStore, redis: Redis) -> None:
    ids = await history(store, redis, 80)
    times = sorted({cast(str, await redis.hget(keys.batch(P, b), "created_at"))
                    for b in ids if await redis.exists(keys.batch(P, b))})
    bounds = [None, times[0], times[len(times) // 3], times[-1], "2031-01-01T00:00:00.000Z"]
    checked = 0
    for state in (None, *BATCH_STATES):
        for outcome in (None, *OUTCOMES):
            for after in bounds:
                for before in bounds:
                    if after is not None and before is not None and after >= before:
                        continue
                    where = ListFilter(state, outcome, after, before)
                    want = await brute(redis, ids, where)
                    for limit in (3, 100):
                        assert await paged(store, where, limit) == want, (where, limit)
                    checked += bool(want)
    assert checked > 100  # most combinations match something


async def test_a_state_stop_page_continues_below_its_token_while_batches_stop(
        store: BatchStore, redis: Redis) -> None:
    """A batch that stops above the cursor is not shown (its sequence is above); one that
    stops below it is (it matches when its page is read); nothing repeats."""
    ids = [f"b{k:02d}" for k in range(30)]
    for batch_id in ids:
        await store.create(P, batch_id, spec())
    await store.apply([Event("batch.state", b, P, state="stop", outcome=OUTCOMES[k % 4], ts=1.0)
                       for k, b in enumerate(ids) if k % 2 == 0])
    where = ListFilter(state="stop")
    first = await store.page(P, 4, None, where)
    assert list(first.items) == ["b28", "b26", "b24", "b22"]
    await store.apply([Event("batch.state", b, P, state="stop", outcome="crashed", ts=1.0)
                       for b in ("b29", "b21", "b03")])
    rest = await paged_from(store, where, first.token)
    assert rest == ["b21", "b20", "b18", "b16", "b14", "b12", "b10", "b08", "b06", "b04",
                    "b03", "b02", "b00"]


async def paged_from(store: BatchStore, where: ListFilter, token: str | None) -> list[str]:
    seen: list[str] = []
    while token is not None:
        page = await store.page(P, 4, token, where)
        seen += page.items
        token = page.token
    return seen
