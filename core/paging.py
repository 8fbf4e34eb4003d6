"""The list of a pipeline's batches: its pages and their signed tokens, and the backfill of
the indexes behind its filters (`core.list_filter`: what a filter is).

A page is newest first. Its token holds the sequence of the last batch the page read, so the
next page continues strictly below it: batches created meanwhile (higher sequences) never
shift the pages that follow, and a batch that leaves a filtered set (a `running` batch that
stops) takes nothing else with it. A filter reads its own sorted set (`keys.batch_state_index`,
`keys.batch_outcome_index`); `state=stop`, which has none, merges the outcome indexes (every
stopped batch has an outcome) in one script, and `created_after`/`created_before` become
sequence bounds by a binary search of the batch index in the same script
(`core.list_scripts.PAGE_RANGE`). A filtered page costs O(log n + limit) whatever the history
(`state=stop`: O(k log n + limit) for the k outcomes; a created bound: O(log² n) more).
Every batch a page returns matches the filter when its hash is read; one that left the set
between the two reads (hidden, or out of the filter) is dropped, and the page reads on below
it, so a page with a token holds `limit` batches (fewer only past `_FILL_ROUNDS` reads).

Also here, as the list's indexes are: the backfill of the retention's finished buckets
(`ensure_finished`), which the sweeper and a rebuild run.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final, cast

import orjson
from redis.asyncio import Redis

from core import keys
from core.layout import is_visible, render
from core.list_filter import NO_FILTER, ListFilter
from core.models import OUTCOMES
from core.packing import unpacked
from core.scripts import Scripts

# Batches per backfill call: a call holds Redis for about a millisecond.
BACKFILL_CHUNK: Final = 200
# Pipelines a process remembers as indexed (past that it forgets them all and asks again).
_REMEMBERED: Final = 4096
# Index reads a page makes at most to fill itself past batches that left meanwhile.
_FILL_ROUNDS: Final = 8


class BadToken(ValueError):
    """A paging token that is malformed, forged, or issued for another pipeline or filter."""


@dataclass(slots=True)
class Page:
    items: dict[str, dict[str, Any]]
    token: str | None


class Pager:
    """Pages of a pipeline's batches (`BatchStore.page` is this)."""

    def __init__(self, redis: Redis, scripts: Scripts, token_secret: bytes) -> None:
        self._redis = redis
        self._scripts = scripts
        self._secret = token_secret
        self._indexed: set[str] = set()
        self._checking: dict[str, asyncio.Task[None]] = {}

    async def page(self, pipeline_id: str, limit: int, token: str | None,
                   where: ListFilter = NO_FILTER) -> Page:
        below = self._open_token(pipeline_id, token, where) if token else None
        if where.disjoint:
            return Page(items={}, token=None)
        if where.active:
            await self.ensure_indexes(pipeline_id)
        items: dict[str, dict[str, Any]] = {}
        # Rows whose batch left between the index read and the hash read (hidden, or out of
        # the filter) are passed over and the index read on below them: a page with a token
        # is full. Short or empty, it was taken for the list's end by clients that stop at
        # an empty page (`dhub ls`). Each round reads below the last: bounded by the batches
        # that left meanwhile, and by _FILL_ROUNDS (a short page is still true).
        for _ in range(_FILL_ROUNDS):
            want = limit - len(items)
            rows = await self._rows(pipeline_id, where, below, want + 1)
            more = len(rows) > want
            rows = rows[:want]
            async with self._redis.pipeline(transaction=False) as pipe:
                for batch_id, _seq in rows:
                    pipe.hgetall(keys.batch(pipeline_id, batch_id))
                hashes: list[dict[str, str]] = [unpacked(h) for h in await pipe.execute()]
            for (batch_id, _seq), data in zip(rows, hashes, strict=True):
                if is_visible(data) and where.matches(data):
                    items[batch_id] = render(data)
            if rows:
                below = int(rows[-1][1])
            if not more or len(items) == limit:
                break
        next_token = (self._make_token(pipeline_id, below, where)
                      if more and below is not None else None)
        return Page(items=items, token=next_token)

    async def _rows(self, pipeline_id: str, where: ListFilter, below: int | None,
                    count: int) -> list[tuple[str, float]]:
        """(id, sequence) rows of `where`, newest first, strictly below sequence `below`
        (None: from the newest), `count` at most."""
        ranked = _ranked(pipeline_id, where)
        bounded = where.created_after is not None or where.created_before is not None
        if len(ranked) == 1 and not bounded:
            return cast(list[tuple[str, float]], await self._redis.zrevrangebyscore(
                ranked[0], f"({below}" if below is not None else "+inf", "-inf",
                start=0, num=count, withscores=True))
        flat = cast(list[str], await self._scripts.page_range(
            keys=[keys.batch_index(pipeline_id), *ranked],
            args=[below - 1 if below is not None else "+inf", where.created_after or "",
                  where.created_before or "", count, keys.batch(pipeline_id, "")]))
        return [(flat[i], float(flat[i + 1])) for i in range(0, len(flat), 2)]

    # -- the indexes of batches from before them ------------------------------------------

    async def ensure_indexes(self, pipeline_id: str) -> None:
        """Lazily, at a pipeline's first filtered page: batches created before the filter
        indexes existed are put in them once (`backfill`), then a marker key says so. Every
        process asks the marker once per pipeline; concurrent backfills are harmless."""
        if pipeline_id in self._indexed:
            return
        # Concurrent first pages of a pipeline share one check (and backfill).
        task = self._checking.get(pipeline_id)
        if task is None:
            task = self._checking[pipeline_id] = asyncio.create_task(self._check(pipeline_id))
            task.add_done_callback(lambda _: self._checking.pop(pipeline_id, None))
        await asyncio.shield(task)

    async def _check(self, pipeline_id: str) -> None:
        marker = keys.batch_indexes_built(pipeline_id)
        if not await self._redis.exists(marker):
            if not await self.backfill(pipeline_id):
                return  # no batch yet: no marker written for a pipeline that may not exist
            await self._redis.set(marker, "1")
        if len(self._indexed) >= _REMEMBERED:
            self._indexed.clear()
        self._indexed.add(pipeline_id)

    async def backfill(self, pipeline_id: str) -> int:
        """Puts every batch of the batch index in the filter indexes its hash says
        (idempotent: BACKFILL_INDEXES), then deletes the indexes an older version kept
        (`keys.batch_retired_keys`: UNLINK, freed off Redis's main thread). Returns how many
        batches the index held."""
        head = keys.batch_filter_indexes(pipeline_id)
        total = 0
        async for rows in _chunks(self._redis, pipeline_id):
            await self._scripts.backfill_indexes(
                keys=[*head, *(keys.batch(pipeline_id, batch_id) for batch_id, _ in rows)],
                args=[x for batch_id, seq in rows for x in (batch_id, int(seq))])
            total += len(rows)
        if total:
            await self._redis.unlink(*keys.batch_retired_keys(pipeline_id))
        return total

    # -- tokens --------------------------------------------------------------------------

    def _sign(self, body: bytes) -> str:
        mac = hmac.new(self._secret, body, hashlib.sha256).digest()[:12]
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def _make_token(self, pipeline_id: str, seq: int, where: ListFilter) -> str:
        data: dict[str, Any] = {"p": pipeline_id, "s": seq}
        if where.active:
            data["f"] = where.digest()
        body = orjson.dumps(data)
        encoded = base64.urlsafe_b64encode(body).decode().rstrip("=")
        return f"{encoded}.{self._sign(body)}"

    def _open_token(self, pipeline_id: str, token: str, where: ListFilter) -> int:
        try:
            encoded, signature = token.split(".", 1)
            body = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            # The decoder skips characters it does not know, extra padding and a last
            # character's unused bits: only the text this service wrote is the token.
            if base64.urlsafe_b64encode(body).rstrip(b"=").decode() != encoded:
                raise ValueError("not the token's own text")
            data = orjson.loads(body)
        except (ValueError, orjson.JSONDecodeError):
            raise BadToken("malformed token") from None
        # compare_digest refuses non-ASCII str; a client can send any text in the query string.
        if not signature.isascii() or not hmac.compare_digest(signature, self._sign(body)):
            raise BadToken("token signature does not match")
        if not isinstance(data, dict) or data.get("p") != pipeline_id:
            raise BadToken("token belongs to another pipeline")
        if data.get("f", "") != where.digest():
            raise BadToken("token belongs to another filter: send the filter of the page "
                           "that gave it")
        seq = data.get("s")
        if not isinstance(seq, int) or seq < 1:
            raise BadToken("malformed token")
        return seq


async def pipeline_known(redis: Redis, pipeline_id: str) -> bool:
    """A pipeline the list answers for: registered, or holding a batch (one created before
    its registration, or restored by a rebuild, as `latest` finds it). One EXISTS of both
    keys; asked only when a first page comes back empty, so a pipeline with batches never
    pays for it."""
    return bool(await redis.exists(keys.pipeline_order(pipeline_id),
                                   keys.batch_index(pipeline_id)))


def _ranked(pipeline_id: str, where: ListFilter) -> list[str]:
    """The sorted sets a page of `where` merges (before its created bounds)."""
    if where.outcome is not None:
        return [keys.batch_outcome_index(pipeline_id, where.outcome)]
    if where.state == "stop":  # no index of its own: every stopped batch has an outcome
        return [keys.batch_outcome_index(pipeline_id, outcome) for outcome in OUTCOMES]
    if where.state is not None:
        return [keys.batch_state_index(pipeline_id, where.state)]
    return [keys.batch_index(pipeline_id)]


async def _chunks(redis: Redis, pipeline_id: str) -> AsyncIterator[list[tuple[str, float]]]:
    """The batch index, (id, sequence) rows in sequence order, BACKFILL_CHUNK at a time."""
    index, low = keys.batch_index(pipeline_id), "-inf"
    while True:
        rows = cast(list[tuple[str, float]], await redis.zrangebyscore(
            index, low, "+inf", start=0, num=BACKFILL_CHUNK, withscores=True))
        if not rows:
            return
        yield rows
        low = f"({int(rows[-1][1])}"


async def ensure_finished(redis: Redis, scripts: Scripts, pipeline_id: str) -> int:
    """Once per pipeline (marker `keys.batch_finished_indexed`): every stopped batch of the
    batch index that is in no finished bucket yet — from before the buckets, or restored by
    a rebuild — is bucketed by the hour of its `updated_at` (BACKFILL_FINISHED), and the
    indexes an older version kept are deleted. Returns how many it bucketed (0 when marked)."""
    marker = keys.batch_finished_indexed(pipeline_id)
    if await redis.exists(marker):
        return 0
    done = 0
    async for rows in _chunks(redis, pipeline_id):
        done += int(await scripts.backfill_finished(
            keys=[keys.batch_finished_index(pipeline_id),
                  *(keys.batch(pipeline_id, batch_id) for batch_id, _ in rows)],
            args=[batch_id for batch_id, _ in rows]))
    await redis.unlink(*keys.batch_retired_keys(pipeline_id))
    await redis.set(marker, "1")
    return done
