"""What a batch says of its steps' work against what they did: a step's percent, and its
offsets against what is on disk, through reruns of a step in the same batch and power
losses. Pure unit tests: no stack."""

from __future__ import annotations

from core import layout

STARTED, MOVED = "2026-12-01T10:00:00.000Z", "2026-12-01T10:00:10.000Z"


def test_a_percent_is_never_said_over_partitions_without_a_total() -> None:
    """`report(partition, offset, total)` takes a total per partition, optional. A step that
    gave totals for some partitions only (one it cannot count ahead) read 100.0 with eta 0
    once those were done, while it went on with the others: the percent counted only the
    partitions with a total. Without every partition's total the percent is not known."""
    got = layout.progress({"p0": 100, "p1": 50}, {"p0": 100}, STARTED, MOVED)
    assert got["percent"] is None and got["eta_s"] is None
    assert got["records_per_s"] == 15.0  # the rate is still known
    # Partitions with a total and no offset yet are at 0 of it, as before.
    assert layout.progress({"p0": 50}, {"p0": 100, "p1": 100}, STARTED, MOVED)["percent"] == 25.0
