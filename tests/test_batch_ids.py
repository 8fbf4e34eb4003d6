"""Batch ids: `batch-` + 26 lower-case Crockford digits of (ms time << 80 | 80 random bits)."""

from __future__ import annotations

import os
import re
from unittest import mock

from core.models import new_batch_id, valid_id

CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def reference(value: int) -> str:
    """The definition, one 5-bit digit at a time."""
    return "batch-" + "".join(CROCKFORD[value >> (5 * n) & 31] for n in range(25, -1, -1))


def test_an_id_is_its_time_and_random_bits_in_crockford_base32() -> None:
    for _ in range(2000):
        random, now = os.urandom(10), 1_700_000_000.123 + int.from_bytes(os.urandom(3), "big")
        with mock.patch("os.urandom", return_value=random), mock.patch("time.time",
                                                                        return_value=now):
            value = (int(now * 1000) << 80) | int.from_bytes(random, "big")
            assert new_batch_id() == reference(value)


def test_ids_are_unique_valid_and_sort_by_time() -> None:
    ids = [new_batch_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"batch-[0-9a-hjkmnp-tv-z]{26}", i) and valid_id(i) for i in ids)
    with mock.patch("time.time", return_value=1_800_000_000.0):
        later = new_batch_id()
    assert max(ids) < later
