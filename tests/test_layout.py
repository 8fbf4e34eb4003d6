"""The batch hash layout has one owner: its state orders feed the Lua scripts."""

from __future__ import annotations

from core import layout
from core.models import BATCH_STATES, STEP_STATES
from core.scripts import APPLY_EVENTS


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
