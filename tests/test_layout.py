"""The batch hash layout has one owner: its state orders feed the Lua scripts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from core import layout
from core.apply_script import APPLY_EVENTS
from core.models import BATCH_STATES, STEP_STATES


def test_the_scripts_rank_states_in_the_models_order() -> None:
    assert list(layout.BATCH_RANK) == list(BATCH_STATES)
    assert sorted(layout.BATCH_RANK.values()) == list(range(len(BATCH_STATES)))
    assert set(layout.STEP_RANK) == set(STEP_STATES)
    assert layout.STEP_RANK["success"] == layout.STEP_RANK["failed"] > layout.STEP_RANK["running"]
    assert f"local BATCH_RANK = {layout.lua_rank(layout.BATCH_RANK)}" in APPLY_EVENTS
    assert f"local STEP_RANK = {layout.lua_rank(layout.STEP_RANK)}" in APPLY_EVENTS
    assert "RANK_TABLE" not in APPLY_EVENTS


def test_visibility_and_running_steps_read_the_hash() -> None:
    fields = {"id": "b", "state": "running", layout.step_field("extract"): "success",
              layout.step_field("load"): "running", layout.offset_field("load", "p0"): "5"}
    assert layout.is_visible(fields)
    assert not layout.is_visible({**fields, layout.DELETED: "1"})
    assert not layout.is_visible(None) and not layout.is_visible({})
    assert layout.running_steps(fields) == {"load"}


def test_progress_percent_rate_and_time_left() -> None:
    started, moved = "2026-12-01T10:00:00.000Z", "2026-12-01T10:00:10.000Z"
    assert layout.progress({"p0": 50, "p1": 50}, {"p0": 100, "p1": 300}, started, moved) == {
        "percent": 25.0, "records_per_s": 10.0, "eta_s": 30.0}
    # Without totals only the rate is known; without a start, nothing.
    assert layout.progress({"p0": 50}, None, started, moved) == {
        "percent": None, "records_per_s": 5.0, "eta_s": None}
    assert layout.progress({"p0": 5}, None, None, moved) == {
        "percent": None, "records_per_s": None, "eta_s": None}
    assert layout.progress({"p0": 100}, {"p0": 100}, started, moved)["eta_s"] == 0.0
    # A resumed step's rate counts only the records done since it started.
    assert layout.progress({"p0": 50, "p1": 50}, {"p0": 100, "p1": 300}, started, moved,
                           before=60) == {"percent": 25.0, "records_per_s": 4.0, "eta_s": 75.0}


def test_progress_reads_100_only_when_every_record_is_done() -> None:
    """9,996 of 10,000 records was 100.0 (rounded to one decimal): a step with records
    left read as done. The percent is rounded down."""
    started, moved = "2026-12-01T10:00:00.000Z", "2026-12-01T10:00:10.000Z"
    short = layout.progress({"p0": 9_996}, {"p0": 10_000}, started, moved)
    assert short["percent"] == 99.9
    assert layout.progress({"p0": 9_999, "p1": 1}, {"p0": 10_000, "p1": 1}, started,
                           moved)["percent"] == 99.9
    assert layout.progress({"p0": 10_000}, {"p0": 10_000}, started, moved)["percent"] == 100.0
    assert layout.progress({"p0": 1}, {"p0": 3}, started, moved)["percent"] == 33.3


def _running_batch(moved: str) -> dict[str, str]:
    return {"id": "b", "name": "n", "deployment": "d", "state": "running", "pipeline_id": "p",
            "pipeline_version": "1", "created_at": "t", "updated_at": "t",
            "steps": '["extract"]', "step:extract": "running", "off:extract:p0": "5",
            "started:extract": "2026-12-01T10:00:00.000Z", "moved:extract": moved}


def test_a_running_step_that_has_not_moved_for_the_stall_time_is_stalled() -> None:
    now = datetime.now(UTC)
    old = (now - timedelta(seconds=layout.stall_after_s() + 5)).isoformat()
    fresh = now.isoformat()
    stalled = layout.render(_running_batch(old))
    assert stalled["stalled"] is True and stalled["state"]["steps"]["extract"]["stalled"]
    moving = layout.render(_running_batch(fresh))
    assert "stalled" not in moving and "stalled" not in moving["state"]["steps"]["extract"]
    stopped = layout.render({**_running_batch(old), "state": "stop"})
    assert "stalled" not in stopped


def test_render_orders_partitions_naturally_and_keeps_only_the_batch_steps() -> None:
    fields = {**_running_batch("2026-12-01T10:00:10.000Z"), "steps": '["extract", "load"]',
              "step:load": "pending"}
    for part, offset in (("partition_10", 10), ("partition_9", 9), ("partition_0", 0),
                         ("zone:eu:1", 7), ("q", 3)):
        fields[layout.offset_field("extract", part)] = str(offset)
    fields[layout.total_field("extract", "partition_10")] = "20"
    fields[layout.total_field("extract", "partition_9")] = "18"
    fields[layout.offset_field("gone", "partition_1")] = "4"  # a step the batch does not have
    fields["offset"] = "1"  # a field that only looks like one
    steps = layout.render(fields)["state"]["steps"]
    assert list(steps) == ["extract", "load"]
    extract = steps["extract"]
    assert list(extract["offsets"].items()) == [
        ("p0", 5), ("partition_0", 0), ("partition_9", 9), ("partition_10", 10), ("q", 3),
        ("zone:eu:1", 7)]
    assert list(extract["totals"].items()) == [("partition_9", 18), ("partition_10", 20)]
    assert steps["load"] == {"state": "pending", "offsets": {}, "progress": {
        "percent": None, "records_per_s": None, "eta_s": None}}


def test_partitions_whose_numbers_tie_render_alike_whatever_the_hashs_order() -> None:
    """`p1` and `p01` tie on their natural key; sorted by it alone they kept the hash's
    order, which differs between Redis's insertion order, a packed hash's and a published
    one's: the same batch rendered in two ETags (a long-poll woken for nothing)."""
    base = _running_batch("2026-12-01T10:00:10.000Z")
    orders = [("p1", 5), ("p01", 3)], [("p01", 3), ("p1", 5)]
    rendered = []
    for order in orders:
        fields = dict(base)
        for part, offset in order:
            fields[layout.offset_field("extract", part)] = str(offset)
        rendered.append(list(layout.render(fields)["state"]["steps"]["extract"]["offsets"]))
    assert rendered[0] == rendered[1] == ["p0", "p01", "p1"]


def test_a_step_left_running_in_a_batch_that_stopped_unsuccessfully_shows_failed() -> None:
    # Its process went with the flow (a cancel, a crash) and nothing will end it; the hash
    # keeps `running` (the highest state sent, whatever the events' order).
    fields = {**_running_batch("2026-12-01T10:00:10.000Z"), "steps": '["extract", "load"]',
              "step:extract": "success", "step:load": "running"}
    for outcome in ("cancelled", "crashed", "failed"):
        steps = layout.render({**fields, "state": "stop", "outcome": outcome})["state"]["steps"]
        assert (steps["extract"]["state"], steps["load"]["state"]) == ("success", "failed")
    # A completed batch's running step has its success on the way; a live batch's runs.
    completed = layout.render({**fields, "state": "stop", "outcome": "completed"})
    assert completed["state"]["steps"]["load"]["state"] == "running"
    assert layout.render(fields)["state"]["steps"]["load"]["state"] == "running"
