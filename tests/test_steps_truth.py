"""What the running steps report against what they wrote: offsets neither ahead of the data
(a resume would skip records) nor behind it (a resume would load records again), through
reruns of a step in the same batch (a flow retried in Prefect) and resumes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
from dhub_wordcount.text import Layout

from core.settings import ROOT, Settings
from core.step_catalogue import batch_dir
from pipelines.offsets import OffsetBook, OffsetPump
from pipelines.publisher import EventPublisher
from pipelines.sales import PIPELINE_ID, files
from pipelines.sales.steps import extract, load, transform
from pipelines.sdk import StepContext, StepFailed
from pipelines.steps import resolve
from tests.test_pipelines_sales import expected_from_source
from tests.test_resume_steps import table

BATCH = "batch-truth"


def context(tmp_path: Path, step: str, start: dict[str, int] | None = None,
            **config: Any) -> StepContext:
    return StepContext(batch_id=BATCH, pipeline_id=PIPELINE_ID, step=step, config=config,
                       settings=Settings(state_dir=tmp_path / "state", data_dir=tmp_path),
                       book=OffsetBook(), on_change=lambda: None, start=start)


def test_a_load_rerun_after_half_its_commit_report_shows_every_partition_loaded(
        tmp_path: Path) -> None:
    """Load commits every partition in one transaction, then reports each partition's total:
    the reports go out one after the other, so a run stopped among them (cancelled: the next
    report raises; killed; the flush not delivered) leaves the batch showing some partitions
    at their total and others at 0. A rerun (the flow retried, or a resume) loads all rows
    again but counted only the partitions already shown, so the batch ended `success` with
    partition_1 at 0 of its records, all of them loaded."""
    config: dict[str, Any] = {"rows": 600, "partitions": 3}
    extract(context(tmp_path, "extract", **config))
    transform(context(tmp_path, "transform", **config))
    first = context(tmp_path, "load", **config)
    load(first)
    totals = first.offsets
    assert totals == first.totals and all(totals.values())
    # What reached the batch before the run stopped: the first partition's report only.
    shown = {p: (n if p == "partition_0" else 0) for p, n in totals.items()}

    again = context(tmp_path, "load", start=shown, **config)
    load(again)
    assert table(tmp_path / BATCH / "sales.db", BATCH) == expected_from_source(tmp_path / BATCH)
    assert again.offsets == totals, "every row is committed: every partition is at its total"


def test_a_report_lower_than_the_offset_shown_is_refused_not_silently_dropped(
        tmp_path: Path) -> None:
    """A batch's offsets only grow (the contract: a lower update is ignored). A step that
    reported 100 records of a partition and then 40 (it went back over them) was told nothing:
    the batch went on showing 100, a resume started there and skipped records 40..100. Below
    the offset it started from (the batch shows that one from its start) is the same lie."""
    ctx = context(tmp_path, "extract", start={"partition_1": 50})
    ctx.report("partition_0", 100)
    ctx.report("partition_0", 100)  # the same offset again is no step back
    with pytest.raises(ValueError, match="only grow"):
        ctx.report("partition_0", 40)
    with pytest.raises(ValueError, match="only grow"):
        ctx.report("partition_1", 10)
    ctx.report("partition_1", 50)
    assert ctx.offsets == {"partition_0": 100, "partition_1": 50}


def test_prefect_default_retries_never_rerun_a_step_from_its_stale_start(tmp_path: Path) -> None:
    """PREFECT_TASKS_DEFAULT_RETRIES (or the flows') set in the worker's environment made
    Prefect rerun a failed step's task with the start offsets the flow planned before its
    first attempt: a step started at 0 truncated its files and began again while the batch
    kept showing the first attempt's offsets (they only grow), so if the retry stopped
    earlier the batch showed offsets ahead of its data, and every resume of it failed
    ("records would be lost"). A failed step fails its run; dhub's resume goes on from it."""
    code = ("from pipelines.flow import run_pipeline, step_task; "
            "print(step_task.retries, run_pipeline.retries)")
    env = {**os.environ, "PREFECT_TASKS_DEFAULT_RETRIES": "3",
           "PREFECT_FLOWS_DEFAULT_RETRIES": "2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=120).stdout.split()
    assert out == ["0", "0"]


def test_the_example_plugin_makes_its_lines_durable_before_reporting_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The offset rule: an offset is reported once its records are durably written. The
    example plugin (the model for steps written outside dhub) only flushed its text to the
    OS and wrote its chunk counts and result without fsync: after a power loss the batch
    showed offsets over lines and counts that were never on disk, and its resume failed
    ("holds fewer than the lines reported") or merged empty counts."""
    log: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    class Book(OffsetBook):
        def record(self, partition: str, offset: int, total: int | None) -> bool:
            log.append(("report", f"{partition}:{offset}"))
            return super().record(partition, offset, total)

    monkeypatch.setattr(os, "fsync", fsync)
    config = {"partitions": 2, "lines": 2_500, "words_per_line": 3}
    written = {"generate": "/text/", "count": "/counts/", "merge": "/result.json"}
    for step, where in written.items():
        log.clear()
        ctx = StepContext(batch_id=BATCH, pipeline_id="wordcount", step=step, config=config,
                          settings=Settings(state_dir=tmp_path / "state", data_dir=tmp_path),
                          book=Book(), on_change=lambda: None)
        resolve(f"wordcount.{step}")(ctx)
        synced = False
        for kind, what in log:
            if kind == "fsync" and where in what:
                synced = True
            elif kind == "report" and not what.endswith(":0"):
                assert synced, f"{step} reported {what} before fsyncing what it wrote"
                synced = step == "merge"  # one file covers all its reports


def test_a_resumes_copies_are_on_disk_before_its_mark_says_they_were_taken_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files a resume copies from the batch it resumes were only written to the OS
    before the fsynced mark said they were taken over: after a power loss, a copy shorter
    than the offsets it goes on from had `append_from(size)` extend it with zero bytes, and
    the resumed batch (and every later resume) failed. Copies and their directories are now
    fsynced before the mark, in both plugins."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    old = tmp_path / "old"
    for rel in ("source/partition_0.jsonl", "staging/partition_0.jsonl", "staging/p1.jsonl"):
        (old / rel).parent.mkdir(parents=True, exist_ok=True)
        (old / rel).write_bytes(b'{"order": 1}\n' * 10)
    monkeypatch.setattr(os, "fsync", fsync)
    files.inherit(old, tmp_path / "new")
    mark = next(n for n, path in enumerate(synced) if ".inherited" in path)
    before = set(synced[:mark])
    copied = {str(tmp_path / "new" / "staging" / name) for name in ("partition_0.jsonl", "p1.jsonl")}
    assert copied <= before, synced
    assert str(tmp_path / "new" / "staging") in before  # their directory entries too

    # The example plugin's copy: every file of it synced before it is renamed into place.
    synced.clear()
    words = tmp_path / "data"
    old_files = batch_dir(words, "batch-old") / "wordcount" / "text"
    old_files.mkdir(parents=True)
    (old_files / "p0.txt").write_text("a b c\n" * 5)
    ctx = StepContext(batch_id="batch-new", pipeline_id="wordcount", step="count",
                      config={}, settings=Settings(state_dir=tmp_path / "state", data_dir=words),
                      book=OffsetBook(), on_change=lambda: None, resumed_from="batch-old")
    layout = Layout.of(ctx)
    assert layout.text("p0").read_text() == "a b c\n" * 5
    assert any(path.endswith("/.wordcount.copy/text/p0.txt") for path in synced), synced


async def test_a_cancel_arriving_while_the_offsets_are_flushed_is_not_swallowed() -> None:
    """The step's end stops its offsets pump and waits for the event in flight. A cancel of
    the waiting task (the step being cancelled) landed in `suppress(CancelledError)` and was
    lost: the step went on to report `success` as if never cancelled."""
    sending = asyncio.Event()

    class Stuck:
        async def step_offsets(self, *args: Any) -> None:
            sending.set()
            await asyncio.Event().wait()  # Kafka never answers

    book = OffsetBook()
    pump = OffsetPump(cast(EventPublisher, Stuck()), "extract", book, interval_s=0.01)
    pump.start()
    book.record("p0", 5, None)
    pump.notify()
    await asyncio.wait_for(sending.wait(), timeout=5)
    ending = asyncio.create_task(pump.stop(graceful=True))
    await asyncio.sleep(0)  # it is waiting for the send in flight
    ending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(ending, timeout=5)


def test_a_resume_of_a_resume_cut_short_while_taking_its_files_over_gets_them_all(
        tmp_path: Path) -> None:
    """B, a resume of A, stopped while copying A's files (a step had started: the API names
    B as the holder of the data). C, a resume of B, took B's partial directory over and
    marked it taken for good: it went on without the partitions B never got."""
    names = ("source/partition_0.jsonl", "staging/partition_0.jsonl",
             "staging/partition_1.jsonl")
    a, b, c = (tmp_path / name for name in ("batch-a", "batch-b", "batch-c"))
    for rel in names:
        (a / rel).parent.mkdir(parents=True, exist_ok=True)
        (a / rel).write_bytes(b'{"order": 1}\n' * 10)
    # B's copy, cut short after its first file.
    files.inherit(a, b)
    (b / files.INHERITED_MARK).unlink()
    (b / names[2]).unlink()
    files.inherit(b, c)
    for rel in names:
        assert (c / rel).read_bytes() == (a / rel).read_bytes(), rel
    assert files.inherited(b) and files.inherited(c)


@pytest.mark.parametrize("step", ["transform", "load"])
def test_a_step_whose_input_lacks_a_partition_it_goes_on_from_fails(tmp_path: Path,
                                                                   step: str) -> None:
    """A resume whose copy of the data it goes on from was cut short, that data deleted since
    (the review's sequence: the holder's DELETE is let through once the resume stopped),
    found one staging partition of two: transform and load ended `success` over it alone,
    with half the orders loaded. A partition the step goes on from must be there."""
    config: dict[str, Any] = {"rows": 400, "partitions": 2}
    extract(context(tmp_path, "extract", **config))
    transform(context(tmp_path, "transform", **config))
    directory = tmp_path / BATCH / ("staging" if step == "transform" else "partials")
    suffix = ".jsonl" if step == "transform" else ".json"
    (directory / f"partition_1{suffix}").unlink()
    start = {"partition_0": 1, "partition_1": 1}
    with pytest.raises(StepFailed, match="partition_1, missing"):
        {"transform": transform, "load": load}[step](
            context(tmp_path, step, start=start, **config))
