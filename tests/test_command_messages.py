"""Command fields a decoder checks beyond their type: a command's time (it decides against a
run's own end, so one far ahead would outrank every real end) and the abandoner's mark on a
delete (a rebuild reads it; absent from every other command)."""

from __future__ import annotations

import time

import orjson
import pytest

from core.codec import CodecError, Command, decode_command
from core.command_messages import Delete
from core.messages import MAX_TS_AHEAD_S


def _raw(kind: str, **changes: object) -> bytes:
    base = orjson.loads(Command(kind, "batch-1", "pipe").encode())
    base.update(changes)
    return orjson.dumps(base)


@pytest.mark.parametrize("kind", ["run", "stop", "delete"])
@pytest.mark.parametrize(("ts", "reason"), [
    (-1.0, r"Expected `float` >= 0.0 - at `\$.ts`"), (-1e12, ">= 0.0"),
    (1e12, "ts 1000000000000.0 is more than 86400 s ahead"),  # milliseconds
    # Taken at collection (room to spare); its id says what it is, the same in every
    # process (`pytest -n` compares the ids its workers collected).
    pytest.param(time.time() + 2 * MAX_TS_AHEAD_S, "ahead of now", id="two-days-ahead")])
def test_a_command_time_negative_or_over_a_day_ahead_is_refused(kind: str, ts: float,
                                                                 reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        decode_command(_raw(kind, ts=ts))


def test_a_command_time_from_now_to_a_day_ahead_decodes() -> None:
    now = time.time()
    for ts in (0.0, now, now + MAX_TS_AHEAD_S - 60):
        assert decode_command(_raw("stop", ts=ts)).ts == ts


def test_only_an_abandoners_delete_says_abandoned() -> None:
    plain = Command("delete", "batch-1", "pipe")
    assert b"abandoned" not in plain.encode()
    marked = decode_command(Command("delete", "batch-1", "pipe", abandoned=True).encode())
    assert isinstance(marked, Delete) and marked.abandoned is True
    with pytest.raises(CodecError):
        decode_command(_raw("delete", abandoned="yes"))
