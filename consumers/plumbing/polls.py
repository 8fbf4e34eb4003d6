"""A poll of the events topic as the events consumer takes it (`consumers/events.py`): its
records decoded, each once (`decode`), and, when a permanent script error stops the poll's
apply, its events applied batch by batch (`apply_by_batch`), so that only the batches whose
data breaks the script go to the dead letters.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiokafka import TopicPartition
from redis.exceptions import ResponseError

from consumers.plumbing.kafka import Record
from core.codec import CodecError, Event, StepOffsets, decode_event, decode_events
from core.offsets_scan import new_scan
from core.retry import Verdict, classify

# The reason a dead letter gives for the events of a batch its data kept from applying.
UNAPPLICABLE = "could not apply: "
# Records decoded between two yields to the event loop (~10 ms of CPU here): see `decode`.
DECODE_SLICE = 2_000

Apply = Callable[[list[Event]], Awaitable[dict[tuple[str, str], int]]]


@dataclass(slots=True)
class Poll:
    batch: dict[TopicPartition, list[Record]]
    events: list[Event]
    bad: list[tuple[Record, str]]
    rekey: list[tuple[bytes, Record]]  # events keyed other than by their batch id, re-keyed
    epoch: int  # of the assignment it was fetched under
    # The offsets events the scanner took (`taken` records), merged (core.offsets_scan).
    merged: list[StepOffsets] = field(default_factory=list)
    taken: int = 0

    @property
    def applied(self) -> list[Event]:
        """What the poll applies: its decoded events, then the scanner's merge."""
        return [*self.events, *self.merged] if self.merged else self.events

    @property
    def count(self) -> int:
        """The events the poll holds: decoded, and taken by the scanner."""
        return len(self.events) + self.taken


async def decode(batch: dict[TopicPartition, list[Record]], epoch: int,
                 scan: bool = True) -> Poll:
    """Decodes a poll: its events, and its malformed records with their reasons. A record
    delivered again (a producer's retry, a replay) is decoded and applied like any other:
    applying it once more changes nothing (offsets by value, state events de-duplicated by
    id). Skipping repeated bytes cost more than it saved: hashing every record's bytes took
    ~0.2 µs a record, more than decoding the ~10% repeats of a real stream.

    With `scan`, the offsets events the C scanner reads exactly (`core.offsets_scan`) are
    taken by it and come merged (`Poll.merged`); the rest are decoded here. One case is
    decoded whole instead: a total of some (pipeline, batch, step) both in a record the
    scanner took and in one it left, since the merge would put the scanner's last whatever
    the records' order (the latest total wins).

    Yields to the event loop every DECODE_SLICE records: a poll of 20,000 takes ~100 ms of
    CPU here, and meanwhile the previous poll's scripts must reach Redis (a megabyte the
    socket takes only in part) and the next fetch be read; without the yields Redis started
    on a poll only once the next one was decoded."""
    events: list[Event] = []
    bad: list[tuple[Record, str]] = []
    rekey: list[tuple[bytes, Record]] = []
    append = events.append
    scanning = new_scan(scan)
    since_yield = 0  # records decoded since the last yield, across partitions
    for records in batch.values():
        start = 0
        while start < len(records):
            if since_yield >= DECODE_SLICE:
                await asyncio.sleep(0)
                since_yield = 0
            piece = records[start : start + DECODE_SLICE - since_yield]
            start += len(piece)
            since_yield += len(piece)
            values = [record.value for record in piece]
            if scanning is not None:
                left = scanning.feed(values, [record.key for record in piece])
                if len(left) < len(piece):
                    piece = [piece[n] for n in left]
                    values = [values[n] for n in left]
                    if not piece:
                        continue
            for record, event in zip(piece, decode_events(values), strict=True):
                if isinstance(event, CodecError):
                    bad.append((record, str(event)))
                    continue
                key = event.batch_id.encode()
                if record.key == key:
                    append(event)
                else:
                    rekey.append((key, record))  # see consumers.plumbing.rekey
    if scanning is None or not scanning.taken:
        return Poll(batch, events, bad, rekey, epoch)
    merged = scanning.merged()
    if _totals_of_both(events, merged):
        return await decode(batch, epoch, scan=False)
    return Poll(batch, events, bad, rekey, epoch, merged, scanning.taken)


def _totals_of_both(events: list[Event], merged: list[StepOffsets]) -> bool:
    """Whether a (pipeline, batch, step) has totals both among the events decoded here and
    in the scanner's merge."""
    decoded = {(e.pipeline_id, e.batch_id, e.step) for e in events if e.totals}
    return bool(decoded) and any((e.pipeline_id, e.batch_id, e.step) in decoded
                                 for e in merged if e.totals)


def bad_script_data(exc: BaseException) -> bool:
    """A script error that is about a batch's data (no retry can fix it), as opposed to
    Redis not taking writes now (READONLY, OOM, BUSY...: `classify` says UNAVAILABLE and
    `Backoff` waits those out, so they never reach the dead letters). Only what a script met
    in a batch's keys is the batch's: its own runtime error (`user_script:`, in Redis 6's and
    7's forms) or a key of another type. Any other permanent reply (EVALSHA renamed away, the
    script cache flushed under the call) is the server's, the same for every batch: taken for
    data, every poll went to the dead letters and was committed."""
    if not isinstance(exc, ResponseError) or classify(exc) is not Verdict.PERMANENT:
        return False
    text = str(exc)
    return text.startswith("WRONGTYPE") or "user_script" in text


async def apply_by_batch(batch: dict[TopicPartition, list[Record]],
                         bad: list[tuple[Record, str]], apply: Apply
                         ) -> dict[tuple[str, str], int]:
    """The poll's events applied with `apply` one batch at a time, after the whole poll's
    apply failed on some batch's data (`bad_script_data`): the records of each batch whose
    apply fails on its data are added to `bad` (the batch's result: 0); any other error is
    raised."""
    groups: dict[tuple[str, str], list[tuple[Record, Event]]] = defaultdict(list)
    for records in batch.values():
        for record in records:
            try:
                event = decode_event(record.value)
            except CodecError:
                continue  # already in `bad`
            if record.key != event.batch_id.encode():
                continue  # re-keyed, applied by its batch's owner
            groups[(event.pipeline_id, event.batch_id)].append((record, event))
    results: dict[tuple[str, str], int] = {}
    for key, pairs in groups.items():
        try:
            results.update(await apply([e for _, e in pairs]))
        except Exception as exc:
            if not bad_script_data(exc):
                raise
            bad.extend((record, f"{UNAPPLICABLE}{exc}") for record, _ in pairs)
            results[key] = 0
    return results
