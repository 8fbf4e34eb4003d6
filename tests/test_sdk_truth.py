"""What a batch says of its steps' work against what they did: a step's percent, and its
offsets against what is on disk, through reruns of a step in the same batch and power
losses. Pure unit tests: no stack."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from core import layout
from core.settings import Settings
from pipelines.checkpoints import Checkpoints
from pipelines.offsets import OffsetBook
from pipelines.sales import PIPELINE_ID
from pipelines.sales.files import inherit
from pipelines.sales.steps import extract, transform
from pipelines.sdk import StepAborted, StepContext
from pipelines.steps import resolve

BATCH = "batch-sdk-truth"
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


class _Journal:
    """What a step did, in order: each fsync (by path), each rename's target, each report."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[tuple[str, str]] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            self.log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def replace(src: Any, dst: Any, **kw: Any) -> None:
            real_replace(src, dst, **kw)
            self.log.append(("replace", str(dst)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        journal = self

        class Book(OffsetBook):
            def record(self, partition: str, offset: int, total: int | None) -> bool:
                journal.log.append(("report", f"{partition}:{offset}"))
                return super().record(partition, offset, total)

        self.book = Book

    def check(self, step: str, dirs: list[Path]) -> None:
        """Before each report of records: every rename so far has its directory fsynced
        after it (or the new name may be gone after a power loss), and every directory in
        `dirs` (where the step created files) has been fsynced (its new entries)."""
        synced: set[str] = set()
        renamed: dict[str, int] = {}  # a directory -> renames in it not yet fsynced
        reports = 0
        for kind, what in self.log:
            if kind == "fsync":
                synced.add(what)
                renamed.pop(what, None)
            elif kind == "replace":
                parent = str(Path(what).parent)
                renamed[parent] = renamed.get(parent, 0) + 1
            elif not what.endswith(":0"):
                reports += 1
                assert not renamed, f"{step} reported {what} before fsyncing {renamed}"
                missing = [str(d) for d in dirs if str(d) not in synced]
                assert not missing, f"{step} reported {what}; its new entries in {missing} " \
                                    "were never made durable"
        assert reports, f"{step} reported no records"


def _context(tmp_path: Path, step: str, book: OffsetBook, pipeline: str = PIPELINE_ID,
             start: dict[str, int] | None = None, **config: Any) -> StepContext:
    return StepContext(batch_id=BATCH, pipeline_id=pipeline, step=step, config=config,
                       settings=Settings(state_dir=tmp_path / "state", data_dir=tmp_path),
                       book=book, on_change=lambda: None, start=start)


def test_the_sales_steps_make_their_new_files_names_durable_before_reporting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The offset rule says durably written. The sales steps fsynced their files but never
    the directories naming them: the checkpoint (progress/<step>.json, replaced by a rename
    at each save) and the new staging and rejects files could be gone after a power loss
    while the batch showed their records done (a resume then failed, or a `success`
    transform had no partials left for load)."""
    journal = _Journal(monkeypatch)
    root = tmp_path / BATCH
    config: dict[str, Any] = {"rows": 300, "partitions": 2}
    extract(_context(tmp_path, "extract", journal.book(), **config))
    journal.check("extract", [tmp_path, root, root / "staging", root / "rejects",
                              root / "progress"])
    journal.log.clear()
    transform(_context(tmp_path, "transform", journal.book(), **config))
    journal.check("transform", [root / "progress"])
    # The partials, written after the last report, are durable before the step returns
    # (its `success` follows).
    assert not [w for k, w in journal.log if k == "replace"
                and not any(k2 == "fsync" and w2 == str(Path(w).parent)
                            for k2, w2 in journal.log[journal.log.index((k, w)):])]


def test_the_example_plugin_makes_its_new_files_names_durable_before_reporting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for the word-count example: each chunk's counts file is new (a rename into
    counts/<partition>/) and its offset was reported with only the file fsynced; the text
    files' and result's names were never made durable either."""
    journal = _Journal(monkeypatch)
    root = tmp_path / BATCH / "wordcount"
    config: dict[str, Any] = {"partitions": 2, "lines": 2_500, "words_per_line": 3}
    where = {"generate": [tmp_path, root.parent, root, root / "text"],
             "count": [root, root / "counts"],  # each chunk's directory: by its rename
             "merge": [root]}
    for step, dirs in where.items():
        journal.log.clear()
        resolve(f"wordcount.{step}")(_context(tmp_path, step, journal.book(), "wordcount",
                                              **config))
        journal.check(step, dirs)


class _Stopping(StepContext):
    """A step cancelled once `after` records are reported in all: its next report raises
    `StepAborted`, as the SDK makes it when the step's task is cancelled."""

    def __init__(self, *args: Any, after: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._after = after

    def report(self, partition: str, offset: int, total: int | None = None) -> None:
        super().report(partition, offset, total)
        if sum(self.offsets.values()) >= self._after:
            self.abort()


def _stopping(tmp_path: Path, step: str, after: int, pipeline: str = PIPELINE_ID,
              **config: Any) -> _Stopping:
    return _Stopping(batch_id=BATCH, pipeline_id=pipeline, step=step, config=config,
                     settings=Settings(state_dir=tmp_path / "state", data_dir=tmp_path),
                     book=OffsetBook(), on_change=lambda: None, after=after)


def _highest(*runs: StepContext) -> dict[str, int]:
    """What the batch shows after these runs' reports: per partition the highest."""
    shown: dict[str, int] = {}
    for ctx in runs:
        for partition, offset in ctx.offsets.items():
            shown[partition] = max(shown.get(partition, 0), offset)
    return shown


@pytest.fixture
def every_record_saved(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints at every record instead of every 0.2 s: small runs stop mid-way."""
    monkeypatch.setattr(Checkpoints, "_next_due",
                        lambda self: 0.0 if self._every_s is not None else float("inf"))


@pytest.mark.usefixtures("every_record_saved")
def test_a_sales_rerun_planned_behind_its_reports_goes_on_from_its_checkpoint(
        tmp_path: Path) -> None:
    """The flow plans a step's start from the batch's record. A run of the same batch again
    (a failed flow run retried in Prefect) planned while the events consumer had not yet
    applied the first attempt's last reports started extract over from 0, truncating the
    staging files it had saved; stopped earlier than the first attempt, it left the batch
    showing the first attempt's higher offsets (they only grow) over data cut back below
    them: the resume that goes on from them failed ("records would be lost"). A step now
    goes on from its own checkpoint when it is ahead of its start offsets."""
    config: dict[str, Any] = {"rows": 200, "partitions": 2}
    first = _stopping(tmp_path, "extract", 150, **config)
    with pytest.raises(StepAborted):
        extract(first)
    again = _stopping(tmp_path, "extract", 50, **config)  # planned from a record at 0
    with pytest.raises(StepAborted):
        extract(again)
    shown = _highest(first, again)
    assert sum(shown.values()) >= 150

    resume = _context(tmp_path, "extract", OffsetBook(), start=shown, **config)
    extract(resume)
    root = tmp_path / BATCH
    for partition in ("partition_0", "partition_1"):
        source = (root / "source" / f"{partition}.jsonl").read_bytes().splitlines()
        staged = (root / "staging" / f"{partition}.jsonl").read_bytes().splitlines()
        rejected = (root / "rejects" / f"{partition}.jsonl").read_bytes().splitlines()
        assert len(staged) + len(rejected) == len(source), "every record staged once"
        assert resume.offsets[partition] == len(source)

    # Transform alike: its sums go on from its checkpoint, never counted twice.
    first = _stopping(tmp_path, "transform", 150, **config)
    with pytest.raises(StepAborted):
        transform(first)
    again = _stopping(tmp_path, "transform", 50, **config)
    with pytest.raises(StepAborted):
        transform(again)
    transform(_context(tmp_path, "transform", OffsetBook(), start=_highest(first, again),
                       **config))
    fresh = tmp_path / "fresh"
    extract(StepContext(batch_id=BATCH, pipeline_id=PIPELINE_ID, step="extract", config=config,
                        settings=Settings(state_dir=fresh / "state", data_dir=fresh),
                        book=OffsetBook(), on_change=lambda: None))
    transform(StepContext(batch_id=BATCH, pipeline_id=PIPELINE_ID, step="transform",
                          config=config,
                          settings=Settings(state_dir=fresh / "state", data_dir=fresh),
                          book=OffsetBook(), on_change=lambda: None))
    for partition in ("partition_0", "partition_1"):
        got = orjson.loads((root / "partials" / f"{partition}.json").read_bytes())
        want = orjson.loads((fresh / BATCH / "partials" / f"{partition}.json").read_bytes())
        assert got == want


@pytest.mark.usefixtures("every_record_saved")
def test_a_word_count_rerun_planned_behind_its_reports_goes_on_from_its_files(
        tmp_path: Path) -> None:
    """The example plugin alike: a rerun planned at 0 after an attempt that reported more
    rewrote its text from the first line (generate) and deleted every saved chunk (count);
    stopped earlier, the batch showed lines its files no longer held, and its resume failed
    ("holds fewer than the lines reported", "a gap at line ...")."""
    config: dict[str, Any] = {"partitions": 2, "lines": 3_000, "words_per_line": 3}
    for step, (ahead, behind) in {"generate": (4_000, 2_000), "count": (4_000, 2_000)}.items():
        run = resolve(f"wordcount.{step}")
        first = _stopping(tmp_path, step, ahead, "wordcount", **config)
        with pytest.raises(StepAborted):
            run(first)
        again = _stopping(tmp_path, step, behind, "wordcount", **config)
        with pytest.raises(StepAborted):
            run(again)
        shown = _highest(first, again)
        assert sum(shown.values()) >= ahead
        resume = _context(tmp_path, step, OffsetBook(), "wordcount", start=shown, **config)
        run(resume)
        assert resume.offsets == {"part-0": 3_000, "part-1": 3_000}
    merge = _context(tmp_path, "merge", OffsetBook(), "wordcount", **config)
    resolve("wordcount.merge")(merge)
    result = orjson.loads((tmp_path / BATCH / "wordcount" / "result.json").read_bytes())
    assert result["lines"] == 6_000 and result["words"] == 18_000


def test_a_resumed_batchs_taken_over_files_have_durable_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`inherit` created the resumed batch's directories with a plain mkdir and fsynced only
    the ones it copied into: the batch's own directory's name in the data root was never
    made durable, so after a power loss all of its files could be gone while its reports
    over them stood."""
    old, new = tmp_path / "old", tmp_path / "new"
    (old / "staging").mkdir(parents=True)
    (old / "staging" / "partition_0.jsonl").write_bytes(b"{}\n")
    (old / "progress").mkdir()
    (old / "progress" / "extract.json").write_bytes(b"{}")
    journal = _Journal(monkeypatch)
    inherit(old, new)
    synced = {what for kind, what in journal.log if kind == "fsync"}
    # Each new directory's name is in its parent: each parent is fsynced.
    assert {str(tmp_path), str(new), str(new / "staging"), str(new / "progress")} <= synced
