"""The batch projection in Redis: create, read, page, hide and purge; events are applied by
`core.applier` (`BatchStore.apply`).

The API writes new batches and hides deleted ones; the consumers apply events and purge.
Every write that touches more than one key is a script from `core.scripts` or a MULTI block.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis

from core import keys
from core.applier import APPLY_CHUNK, Applier
from core.codec import Event
from core.layout import RESUMED_FROM, creation_fields, is_visible, render
from core.list_filter import NO_FILTER, ListFilter
from core.models import PipelineSpec, batch_id_ms, now_iso
from core.packing import unpacked
from core.paging import BadToken as BadToken  # the list's error, where callers found it
from core.paging import Page, Pager
from core.scripts import Scripts
from core.settings import Settings

# Batch ids `latest` reads from the index at a time: the newest is nearly always visible,
# and a few more cover a delete racing the read without another round trip.
LATEST_CHUNK = 3
# A resume notes itself in its holder's resumed-by set before its create: a member with no
# batch yet whose id is this recent may still be being created, and counts as live.
RESUME_CREATE_WINDOW_S = 30.0
# How long a DELETE's mark (`begin_delete`) outlives a DELETE that never ended it (its API
# process killed mid-request): past its command's send (5 s at most) and its hide, after which
# the hidden batch refuses resumes by itself. Should the hide be late (Redis failing, the
# commands consumer hides it), a resume let through meanwhile still keeps its data: the
# delete's clean-up waits for live resumes.
DELETE_MARK_TTL_S = 30


@dataclass(frozen=True, slots=True)
class DeleteClaim:
    """A DELETE's mark (`BatchStore.begin_delete`) and the live resumes it found."""

    token: str
    resumes: list[str]


class BatchStore:
    def __init__(self, redis: Redis, scripts: Scripts, *, token_secret: bytes,
                 changes_channel: str = keys.CHANGES_CHANNEL, dedup_window: int = 1024,
                 apply_chunk: int = APPLY_CHUNK) -> None:
        self.redis = redis
        self.scripts = scripts
        self._channel = changes_channel
        self._pager = Pager(redis, scripts, token_secret)
        self._applier = Applier(redis, scripts, changes_channel=changes_channel,
                                dedup_window=dedup_window, apply_chunk=apply_chunk)

    @classmethod
    def from_settings(cls, redis: Redis, settings: Settings,
                      scripts: Scripts | None = None) -> BatchStore:
        """The store as every process of the project configures it."""
        return cls(redis, scripts or Scripts(redis),
                   token_secret=settings.token_secret.get_secret_value().encode(),
                   dedup_window=settings.dedup_window)

    # -- writes from the API -------------------------------------------------------------

    async def create(self, pipeline_id: str, batch_id: str, spec: PipelineSpec,
                     extra: Mapping[str, str] | None = None,
                     created_at: str | None = None) -> int:
        """`extra`: more fields of the batch's hash, recorded with its creation;
        `created_at`: when it was created (now unless given: a batch restored). Returns its
        sequence, 0 when a batch of the id exists already (nothing written)."""
        fields = creation_fields(pipeline_id, batch_id, spec, created_at or now_iso(), extra)
        state = (extra or {}).get("state", "pending")  # the hash's, for its state's index
        seq = await self.scripts.create_batch(
            keys=[keys.batch(pipeline_id, batch_id), keys.batch_index(pipeline_id),
                  keys.batch_seq(pipeline_id), keys.batch_state_index(pipeline_id, state)],
            args=[batch_id, *fields],
        )
        if seq and self._channel:
            # A new batch is news to the pipeline's push streams (as the API's create says).
            await self.redis.publish(self._channel, keys.batch(pipeline_id, batch_id))
        return int(seq)

    async def hide(self, pipeline_id: str, batch_id: str) -> bool:
        hidden = await self.scripts.hide_batch(
            keys=[keys.batch(pipeline_id, batch_id), keys.batch_index(pipeline_id),
                  *keys.batch_filter_indexes(pipeline_id), keys.batch_finished_index(pipeline_id)],
            args=[batch_id, now_iso(), self._channel],
        )
        return bool(hidden)

    async def purge(self, pipeline_id: str, batch_id: str,
                    fields: Mapping[str, str] | None = None) -> None:
        """Removes every key of the batch and its entries in every index of the list (after
        delete, or to undo a create that failed). `fields`: its hash as the caller read it
        (only its `resumed_from` is used, which never changes), else read here."""
        if fields is None:
            fields = await self.fields(pipeline_id, batch_id)
        holder = fields.get(RESUMED_FROM) if fields else None
        await self.scripts.purge_batch(
            keys=[keys.batch(pipeline_id, batch_id), keys.batch_seen(pipeline_id, batch_id),
                  keys.batch_index(pipeline_id), *keys.batch_filter_indexes(pipeline_id),
                  keys.batch_finished_index(pipeline_id),
                  keys.batch_purged(pipeline_id, batch_id)],
            args=[batch_id, self._channel])
        # The resumes that went on from its data matter no more; nor does this one, gone,
        # to the batch whose data it went on from (a resume undone after its create).
        await self.redis.delete(keys.resumed_by(pipeline_id, batch_id))
        if holder:
            await self.redis.srem(keys.resumed_by(pipeline_id, holder), batch_id)

    async def note_resume(self, pipeline_id: str, holder_id: str, batch_id: str) -> None:
        """`batch_id` is a resume going on from `holder_id`'s data (service.resume): the
        holder's delete is refused while it lives (`live_resumes`)."""
        await self.redis.sadd(keys.resumed_by(pipeline_id, holder_id), batch_id)

    async def resume_may_go_on(self, pipeline_id: str, holder_id: str, batch_id: str) -> bool:
        """After `note_resume`: whether the holder's data is still there to go on from, no
        DELETE of it under way and the holder not hidden. Otherwise the note is taken back.

        With `begin_delete` this is Dekker's handshake: each side writes its mark, then reads
        the other's. Redis runs them in one order, so of a resume and a DELETE of its holder
        racing, at least one sees the other and refuses."""
        if (not await self.redis.exists(keys.deletes(pipeline_id, holder_id))
                and is_visible(await self.fields(pipeline_id, holder_id))):
            return True
        await self.redis.srem(keys.resumed_by(pipeline_id, holder_id), batch_id)
        return False

    async def begin_delete(self, pipeline_id: str, batch_id: str) -> DeleteClaim:
        """Marks a DELETE of the batch under way (its own token: two DELETEs of one batch,
        a client's retry, never take back each other's), then reads its live resumes. With
        some, the delete must be refused, and its mark is taken back; else it stays (for
        its TTL) until the batch is hidden, or `end_delete` says the delete changed nothing."""
        marks, token = keys.deletes(pipeline_id, batch_id), uuid.uuid4().hex
        async with self.redis.pipeline(transaction=True) as tx:
            tx.sadd(marks, token)
            tx.expire(marks, DELETE_MARK_TTL_S)
            await tx.execute()
        claim = DeleteClaim(token, await self.live_resumes(pipeline_id, batch_id))
        if claim.resumes:
            await self.end_delete(pipeline_id, batch_id, token)
        return claim

    async def end_delete(self, pipeline_id: str, batch_id: str, token: str) -> None:
        """A DELETE that changed nothing (refused): resumes may go on again, unless another
        DELETE is under way."""
        await self.redis.srem(keys.deletes(pipeline_id, batch_id), token)

    async def live_resumes(self, pipeline_id: str, batch_id: str) -> list[str]:
        """The resumes going on from `batch_id`'s data that have not stopped (deleted ones
        left out, and those never created, once their create is surely over): its data must
        stay until they took it over."""
        members = sorted(cast(set[str], await self.redis.smembers(
            keys.resumed_by(pipeline_id, batch_id))))
        live = []
        for member in members:
            fields = await self.fields(pipeline_id, member)
            if fields is None:
                made_ms = batch_id_ms(member)
                if made_ms is not None and time.time() - made_ms / 1000 < RESUME_CREATE_WINDOW_S:
                    live.append(member)  # noted, its create maybe still under way
            elif is_visible(fields) and fields["state"] != "stop":
                live.append(member)
        return live

    # -- reads ---------------------------------------------------------------------------

    async def fields(self, pipeline_id: str, batch_id: str) -> dict[str, str] | None:
        """The whole hash (a packed one unpacked: `core.packing`), deleted ones included
        (the consumers need them); None if absent."""
        data = cast(dict[str, str], await self.redis.hgetall(keys.batch(pipeline_id, batch_id)))
        return unpacked(data) if data else None

    async def get(self, pipeline_id: str, batch_id: str) -> dict[str, Any] | None:
        data = await self.fields(pipeline_id, batch_id)
        if data is None or not is_visible(data):
            return None
        return render(data)

    async def latest(self, pipeline_id: str) -> dict[str, Any] | None:
        """The newest visible batch; None only once the index holds none.

        A batch hidden between the index read and its hash read is skipped, and the index
        read on below the last sequence read (not by rank: the hidden ones leave the index,
        which shifts ranks), LATEST_CHUNK at a time, until a visible batch or the index's
        end: deletes racing this read never make a pipeline with a batch answer none. The
        usual case is one index read and one hash read, as before."""
        index = keys.batch_index(pipeline_id)
        below = "+inf"
        while True:
            rows = cast(list[tuple[str, float]], await self.redis.zrevrangebyscore(
                index, below, "-inf", start=0, num=LATEST_CHUNK, withscores=True))
            for batch_id, _ in rows:
                batch = await self.get(pipeline_id, batch_id)
                if batch is not None:
                    return batch
            if len(rows) < LATEST_CHUNK:
                return None
            below = f"({int(rows[-1][1])}"

    async def page(self, pipeline_id: str, limit: int, token: str | None,
                   where: ListFilter = NO_FILTER) -> Page:
        """Newest first, restricted to `where`; the token continues the same list (its
        guarantees: `core.paging`). Raises BadToken."""
        return await self._pager.page(pipeline_id, limit, token, where)

    # -- events --------------------------------------------------------------------------

    async def apply(self, events: Iterable[Event], now: str | None = None
                    ) -> dict[tuple[str, str], int]:
        """Applies events (`core.applier`: a few script calls, the offsets events of one
        (batch, step) merged, the batches they finished packed). `now`: a test's clock (a
        batch stopped long ago). Returns, per (pipeline_id, batch_id), how many events
        changed it (-1: batch unknown or deleted, its events dropped)."""
        return await self._applier.apply(events, now)
