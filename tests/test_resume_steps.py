"""Resuming at the level of the step code (no Kafka, no Prefect): the SDK's offset rule kept
through checkpoints, and the sales steps going on from their start offsets in a new batch
that takes over the old batch's files, processing exactly the records that remained."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.settings import Settings
from pipelines.checkpoints import Checkpoints
from pipelines.offsets import OffsetBook
from pipelines.sales import PIPELINE_ID
from pipelines.sales.steps import extract, load, transform
from pipelines.sdk import StepContext, StepFailed
from tests.test_pipelines_sales import expected_from_source

STEPS: dict[str, Callable[[StepContext], None]] = {
    "extract": extract, "transform": transform, "load": load}
OLD, NEW = "batch-old", "batch-new"


def context(tmp_path: Path, step: str, batch_id: str, start: Mapping[str, int] | None = None,
            resumed_from: str | None = None, **config: Any) -> StepContext:
    return StepContext(batch_id=batch_id, pipeline_id=PIPELINE_ID, step=step, config=config,
                       settings=Settings(state_dir=tmp_path / "state", data_dir=tmp_path),
                       book=OffsetBook(), on_change=lambda: None, start=start,
                       resumed_from=resumed_from)


def table(db: Path, batch_id: str) -> dict[tuple[str, str], tuple[int, int, int]]:
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT region, day, revenue_cents, orders, units "
                            "FROM daily_revenue WHERE batch_id = ?", (batch_id,)).fetchall()
    return {(r[0], r[1]): (r[2], r[3], r[4]) for r in rows}


def processed(tmp_path: Path, batch_id: str, step: str) -> dict[str, int]:
    counted: dict[str, int] = orjson.loads(
        (tmp_path / batch_id / "progress" / f"{step}.json").read_bytes())["processed"]
    return counted


@pytest.mark.parametrize("failing", ["extract", "transform"])
def test_a_step_failed_half_way_goes_on_from_its_offsets_in_the_resumed_batch(
        tmp_path: Path, failing: str) -> None:
    config: dict[str, Any] = {"rows": 3_001, "partitions": 3, "invalid_rate": 0.05}
    for name, fn in STEPS.items():
        ctx = context(tmp_path, name, OLD, fail_at=failing, **config)
        if name == failing:
            with pytest.raises(StepFailed, match="on purpose"):
                fn(ctx)
            break
        fn(ctx)
    half, sizes = ctx.offsets, ctx.totals
    assert sum(half.values()) == sum(sizes.values()) // 2
    assert all(0 < half[p] < sizes[p] for p in sizes)
    assert set(sizes) == {f"partition_{i}" for i in range(3)}

    # The new batch: steps before the failing one are done; the failing one starts from its
    # offsets; the later ones from zero. `fail_at` removed (an override to null).
    after = False
    for name, fn in STEPS.items():
        if name != failing and not after:
            continue
        start = half if name == failing else None
        ctx = context(tmp_path, name, NEW, start=start, resumed_from=OLD, fail_at=None, **config)
        fn(ctx)
        after = True
        assert ctx.offsets == ctx.totals, name
        expected = {p: sizes[p] - half[p] for p in sizes} if name == failing else ctx.totals
        assert processed(tmp_path, NEW, name) == expected, name
    assert table(tmp_path / NEW / "sales.db", NEW) == expected_from_source(tmp_path / NEW)
    # The old batch's files are as it left them: its steps' data is not the new batch's.
    assert processed(tmp_path, OLD, failing) == half
    assert not (tmp_path / OLD / "sales.db").exists()


def test_a_second_resume_of_the_same_batch_finds_its_data_untouched(tmp_path: Path) -> None:
    config: dict[str, Any] = {"rows": 800, "partitions": 2}
    ctx = context(tmp_path, "extract", OLD, fail_at="extract", **config)
    with pytest.raises(StepFailed):
        extract(ctx)
    half = ctx.offsets
    before = {p.name: p.read_bytes() for p in (tmp_path / OLD / "staging").iterdir()}
    for new in ("batch-a", "batch-b"):
        extract(context(tmp_path, "extract", new, start=half, resumed_from=OLD, **config))
        assert processed(tmp_path, new, "extract") == {p: 400 - half[p] for p in half}
    after = {p.name: p.read_bytes() for p in (tmp_path / OLD / "staging").iterdir()}
    assert after == before
    staged_a = sorted((tmp_path / "batch-a" / "staging").iterdir())
    staged_b = sorted((tmp_path / "batch-b" / "staging").iterdir())
    assert [p.read_bytes() for p in staged_a] == [p.read_bytes() for p in staged_b]


def test_a_resumed_step_without_its_saved_state_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(StepFailed, match=f"data of batch {OLD}, which is gone"):
        extract(context(tmp_path, "extract", NEW, start={"partition_0": 5}, resumed_from=OLD,
                        rows=10, partitions=1))
    (tmp_path / OLD).mkdir()
    with pytest.raises(StepFailed, match="saved no checkpoint"):
        extract(context(tmp_path, "extract", NEW, start={"partition_0": 5}, resumed_from=OLD,
                        rows=10, partitions=1))


def test_checkpoints_report_an_offset_only_after_saving_it(tmp_path: Path) -> None:
    events: list[tuple[str, Any]] = []

    class Book(OffsetBook):
        def record(self, partition: str, offset: int, total: int | None) -> bool:
            events.append(("report", (partition, offset)))
            return super().record(partition, offset, total)

    ctx = StepContext(batch_id=NEW, pipeline_id=PIPELINE_ID, step="s", config={},
                      settings=Settings(state_dir=tmp_path), book=Book(),
                      on_change=lambda: None, start={"a": 3})
    points = ctx.checkpoints({"a": 10, "b": 5}, lambda o: events.append(("save", dict(o))),
                             every_s=None)
    assert events == [("report", ("a", 3)), ("report", ("b", 0))]
    events.clear()
    points.advance("a", 2)
    points.advance("b")
    assert events == [], "nothing reported before it is saved"
    points.save()
    assert events == [("save", {"a": 5, "b": 1}), ("report", ("a", 5)), ("report", ("b", 1))]
    assert points.processed == {"a": 2, "b": 1}
    with pytest.raises(ValueError, match="records would be lost"):
        Checkpoints(ctx, {"a": 10}, lambda o: None, start={"a": 1})


def test_the_flow_runs_what_the_batch_record_says() -> None:
    from core.models import PipelineSpec
    from pipelines.flow import plan

    spec = PipelineSpec.model_validate({"name": "n", "version": "1", "steps": [
        {"name": "extract", "uses": "sales.extract", "config": {"rows": 1}},
        {"name": "transform", "uses": "sales.transform", "config": {"rows": 2}},
        {"name": "load", "uses": "sales.load", "config": {"rows": 3}}]})
    # A batch recorded before run-time config: the registered config, nothing done.
    older = plan(spec, {"step:extract": "none"})
    assert [(s.name, s.config, s.done, s.start) for s in older] == [
        ("extract", {"rows": 1}, False, {}), ("transform", {"rows": 2}, False, {}),
        ("load", {"rows": 3}, False, {})]
    resumed = plan(spec, {
        "config": orjson.dumps({"extract": {"rows": 9}, "transform": {"fail_at": None},
                                "load": {}}).decode(),
        "step:extract": "success", "off:extract:partition_0": "5",
        "step:transform": "none", "off:transform:partition_0": "2",
        "off:transform:partition_1": "0", "step:load": "none"})
    assert [(s.name, s.config, s.done, s.start) for s in resumed] == [
        ("extract", {"rows": 9}, True, {"partition_0": 5}),
        ("transform", {"fail_at": None}, False, {"partition_0": 2, "partition_1": 0}),
        ("load", {}, False, {})]


def test_source_files_are_never_mixed_with_others_of_another_shape(tmp_path: Path) -> None:
    """However a config reaches it, extract does not go on over source files made with
    other rows/partitions/seed than its own: it would load a mix of both."""
    with pytest.raises(StepFailed, match="on purpose"):
        extract(context(tmp_path, "extract", OLD, rows=40, partitions=2, fail_at="extract"))
    with pytest.raises(StepFailed, match="source files were made with"):
        extract(context(tmp_path, "extract", NEW, resumed_from=OLD, rows=40, partitions=4))
    assert sorted(p.name for p in (tmp_path / NEW / "source").glob("partition_*")) == [
        "partition_0.jsonl", "partition_1.jsonl"]  # nothing generated from the other split
