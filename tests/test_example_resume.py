"""The example plugin's steps resumed from their offsets (called directly, as the flow calls
them for a resumed batch: the batch it resumes and the start offsets in the context)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.settings import Settings
from pipelines.offsets import OffsetBook
from pipelines.sdk import StepContext, StepFailed
from pipelines.steps import resolve

CONFIG: dict[str, Any] = {"partitions": 2, "lines": 5_500, "words_per_line": 4, "seed": 11}
PARTS = ("part-0", "part-1")


def run(data_root: Path, batch_id: str, step: str, *, start: Mapping[str, int] | None = None,
        resumed_from: str | None = None, **overrides: Any) -> StepContext:
    ctx = StepContext(batch_id=batch_id, pipeline_id="wordcount", step=step,
                      config={**CONFIG, **overrides}, book=OffsetBook(), on_change=lambda: None,
                      settings=Settings(state_dir=data_root / "state", data_dir=data_root),
                      start=start, resumed_from=resumed_from)
    resolve(f"wordcount.{step}")(ctx)
    return ctx


def failed(data_root: Path, batch_id: str, step: str, **kwargs: Any) -> dict[str, int]:
    """The offsets a step run with `fail_at` reported before failing half way."""
    book = OffsetBook()
    ctx = StepContext(batch_id=batch_id, pipeline_id="wordcount", step=step,
                      config={**CONFIG, "fail_at": step}, book=book, on_change=lambda: None,
                      settings=Settings(state_dir=data_root / "state", data_dir=data_root),
                      **kwargs)
    with pytest.raises(StepFailed, match="on purpose"):
        resolve(f"wordcount.{step}")(ctx)
    return ctx.offsets


def test_count_resumed_counts_exactly_the_lines_that_remained(tmp_path: Path) -> None:
    for step in ("generate", "count", "merge"):
        run(tmp_path, "batch-clean", step)
    run(tmp_path, "batch-a", "generate")
    reached = failed(tmp_path, "batch-a", "count")
    assert 0 < sum(reached.values()) < 11_000 and all(v % 1000 == 0 for v in reached.values())

    resumed = run(tmp_path, "batch-b", "count", start=reached, resumed_from="batch-a")
    assert resumed.offsets == dict.fromkeys(PARTS, 5_500)
    run(tmp_path, "batch-b", "merge", resumed_from="batch-a")

    root = tmp_path / "batch-b" / "wordcount"
    runs = [orjson.loads(line) for line in (root / "count-runs.jsonl").read_bytes().splitlines()]
    assert [r["batch"] for r in runs] == ["batch-a", "batch-b"]
    assert runs[1]["start"] == reached
    assert runs[1]["counted"] == {p: 5_500 - reached[p] for p in PARTS}  # the step's own count
    assert runs[0]["counted"] == reached  # it failed right after reporting them
    clean = orjson.loads((tmp_path / "batch-clean" / "wordcount" / "result.json").read_bytes())
    assert orjson.loads((root / "result.json").read_bytes()) == clean
    # The batch it resumes keeps its own files as they were.
    assert not (tmp_path / "batch-a" / "wordcount" / "result.json").exists()


def test_generate_resumed_writes_the_same_text_as_a_clean_run(tmp_path: Path) -> None:
    run(tmp_path, "batch-clean", "generate")
    reached = failed(tmp_path, "batch-a", "generate")
    assert 0 < sum(reached.values()) < 11_000
    run(tmp_path, "batch-b", "generate", start=reached, resumed_from="batch-a")
    for part in PARTS:
        assert (tmp_path / "batch-b" / "wordcount" / "text" / f"{part}.txt").read_bytes() == \
            (tmp_path / "batch-clean" / "wordcount" / "text" / f"{part}.txt").read_bytes()


def test_a_resume_whose_old_files_are_gone_fails_plainly(tmp_path: Path) -> None:
    with pytest.raises(StepFailed, match="which this batch resumes, are gone"):
        run(tmp_path, "batch-b", "count", start={"part-0": 1000}, resumed_from="batch-gone")
    with pytest.raises(StepFailed, match="cannot name a data directory"):
        run(tmp_path, "batch-b", "count", start={"part-0": 1000}, resumed_from="..")
