"""The events consumer's fast path for `step.offsets` records, in C (`core/_offsets_scan.c`).

Most of a real events stream is offsets events, and the apply keeps of them only each
partition's highest offset and latest total per (pipeline, batch, step)
(`core.applier.script_entries`). Decoding each into a msgspec struct (five strings, a float,
a dict, the struct) cost the consumer ~0.8 µs a record, about as much as aiokafka's whole
read of it; checking its ids and merging it cost another ~0.6 µs.

A `Scanner` reads a poll's records and takes those it can read exactly: compact JSON (no
whitespace, no escapes, ASCII only), the known fields of a `step.offsets` event once each,
every id, offset and `ts` within what the decode and `core.messages.check_event` accept,
keyed by the event's batch id. It keeps only the merge of what it took. Everything else is
left to the usual decode (`core.codec.decode_events`), which also gives a refusal's
reason: the scanner never refuses a record, so what a poll applies and dead-letters is the
same with it or without it (tests/test_offsets_scan.py compares the two on mutated
records).

`DHUB_EVENTS_SCAN=false` turns it off; so does a build without the extension (a warning
says so once), and the consumer then decodes every record as before.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Final

from core.messages import MAX_TS_AHEAD_S, SCHEMA, StepOffsets
from core.models import MAX_OFFSET

try:
    from core._offsets_scan import Scanner
except ImportError:  # built without the C extension
    Scanner = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

# The event id of a merged event: never read (offsets apply by value, not de-duplicated by
# id), a valid id all the same.
MERGED_ID: Final = "merged-offsets"
# The struct's own constructor (mypy reads Event's facade signature: core.messages). Direct
# construction, as a decode makes them: what the scanner took passed every check already.
_MERGED: Any = StepOffsets
# The scanner's hash key, this process's own: ids come from producers, and a hash nobody can
# predict keeps crafted ones from piling into one probe run of its tables (core/_offsets_scan.c).
_HASH_KEY: Final = os.urandom(16)
_warned = False


class Scan:
    """One poll's scan: `feed` each slice of its records, then `merged` once."""

    def __init__(self) -> None:
        self._scanner = Scanner(MAX_OFFSET, _HASH_KEY)

    def feed(self, values: list[bytes | None], keys: list[bytes | None]) -> list[int]:
        """Takes the records it can read exactly; returns the places of the others."""
        # A `ts` past this is left to the decode, which refuses it (core.messages.check_ts).
        return self._scanner.feed(values, keys, time.time() + MAX_TS_AHEAD_S)

    @property
    def taken(self) -> int:
        return self._scanner.taken

    def merged(self) -> list[StepOffsets]:
        """What the records taken apply: one event per (pipeline, batch, step) holding each
        partition's highest offset and latest total, in the order first met. Empties the
        scan."""
        return [_MERGED(schema=SCHEMA, event_id=MERGED_ID, batch_id=batch_id,
                            pipeline_id=pipeline_id, ts=0.0, step=step, offsets=offsets,
                            totals=totals)
                for pipeline_id, batch_id, step, offsets, totals in self._scanner.drain()]


def new_scan(enabled: bool) -> Scan | None:
    """A scan for one poll, or None (off, or the extension missing: decode everything)."""
    global _warned
    if not enabled:
        return None
    if Scanner is None:
        if not _warned:
            _warned = True
            log.warning("core._offsets_scan is not built: every event is decoded in Python "
                        "(`make setup` builds it)")
        return None
    return Scan()
