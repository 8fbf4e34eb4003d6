"""What a batch says of its steps' work against what they did: a step's percent, and its
offsets against what is on disk, through reruns of a step in the same batch and power
losses. Pure unit tests: no stack."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from core import layout
from core.settings import Settings
from pipelines.offsets import OffsetBook
from pipelines.sales import PIPELINE_ID
from pipelines.sales.steps import extract, transform
from pipelines.sdk import StepContext
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
