"""The three steps of `sales-pipeline`; offsets are records processed per partition.

    extract    source/<partition>.jsonl (generated if absent) -> staging/<partition>.jsonl
               (validated records) and rejects/<partition>.jsonl (invalid ones, with reasons)
    transform  staging/<partition>.jsonl -> partials/<partition>.json: revenue, orders and units
               per (region, day) of that partition
    load       partials/*.json -> SQLite table `daily_revenue`, summed over partitions, in one
               transaction that first removes the batch's earlier rows (a rerun replaces them)

The SDK's offset rule (an offset is reported once the records up to it are durable) is kept
through checkpoints (`Progress`): extract fsyncs its appended staging and rejects files and
notes their sizes, transform writes its running sums, each with the positions they cover, in
progress/<step>.json; only then are those positions reported. A resumed batch starts with
the files of the batch it resumes (`files.inherit`) and each step goes on from its last
checkpoint (at or past its start offsets): extract cuts its files back to the sizes saved
with it, transform takes the sums.
Load is one transaction: it reports when it commits, so it starts from zero or has nothing
left (if it committed and stopped before `success`, the resumed batch loads its own rows).
Each step notes in progress/<step>.json the records this run of it processed.

Steps are sync: the SDK runs them in a thread, so plain file and SQLite I/O is fine here.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any, Final

import orjson

from core.models import valid_id
from core.step_catalogue import shapes_data
from pipelines.sales.config import Layout, SalesConfig, partition_name, read_config
from pipelines.sales.files import (
    append_from,
    count_lines,
    inherit,
    inherited,
    jsonl_lines,
    sync,
    write_atomically,
)
from pipelines.sales.progress import Progress, interleave
from pipelines.sales.records import Invalid, Sale, generate_partition, partition_sizes, validate
from pipelines.sdk import StepContext, StepFailed

TABLE: Final = "daily_revenue"
SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS daily_revenue (
    batch_id      TEXT    NOT NULL,
    region        TEXT    NOT NULL,
    day           TEXT    NOT NULL,
    revenue_cents INTEGER NOT NULL,
    orders        INTEGER NOT NULL,
    units         INTEGER NOT NULL,
    PRIMARY KEY (batch_id, region, day)
)
"""
CLEAR: Final = "DELETE FROM daily_revenue WHERE batch_id = ?"
UPSERT: Final = """
INSERT INTO daily_revenue (batch_id, region, day, revenue_cents, orders, units)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (batch_id, region, day) DO UPDATE SET
    revenue_cents = revenue_cents + excluded.revenue_cents,
    orders = orders + excluded.orders,
    units = units + excluded.units
"""


def _setup(ctx: StepContext) -> tuple[SalesConfig, Layout]:
    layout = Layout.of(ctx)
    if ctx.resumed_from is not None:
        # The batches' directories are siblings (`Layout.of`); the id comes from the batch's
        # own record, and is checked as `Layout.of` checks the batch's.
        if not valid_id(ctx.resumed_from) or ctx.resumed_from in (".", ".."):
            raise StepFailed(f"resumed batch id {ctx.resumed_from!r} cannot name a directory")
        old = layout.root.parent / ctx.resumed_from
        if any(ctx.start_offsets.values()) and not old.is_dir() and not inherited(layout.root):
            # Taking nothing over would mark the files inherited for good, and the step
            # would fail further on with a reason that hides this one.
            raise StepFailed(f"{ctx.step}: goes on from {dict(ctx.start_offsets)} over the "
                             f"data of batch {ctx.resumed_from}, which is gone ({old})")
        # Before the config is read: a step that refuses it leaves the files taken over, so
        # a resume of this batch finds them here.
        inherit(old, layout.root)
    return read_config(ctx.config), layout


def _partitions(directory: Path, suffix: str, ctx: StepContext) -> dict[str, Path]:
    """The partition files a previous step left, by partition name, in numeric order. Every
    partition the step goes on from (its start offsets) must be there: one missing (a resume
    whose copy of the data it goes on from was cut short, that data removed since) would
    have the step end `success` over the others alone."""
    files = sorted(directory.glob(f"partition_*{suffix}"),
                   key=lambda p: int(p.name[len("partition_"):-len(suffix)]))
    if not files:
        raise StepFailed(f"{ctx.step}: no partitions in {directory}; did the previous step run?")
    found = {p.name[: -len(suffix)]: p for p in files}
    missing = sorted(set(ctx.start_offsets) - found.keys())
    if missing:
        raise StepFailed(f"{ctx.step}: goes on from {', '.join(missing)}, missing in "
                         f"{directory}: the data it goes on from is incomplete")
    return found


def _saved(layout: Layout, ctx: StepContext) -> dict[str, dict[str, Any]]:
    """Per partition, what the step saved at its last checkpoint: where it goes on from.

    Also where the SDK says to start at 0, or below the checkpoint: the start offsets are
    the batch's record when the flow was planned, and a run of the same batch again (a
    flow run retried in Prefect) may be planned before the events consumer applied what an
    earlier attempt reported. Started over below, the step cut back files the batch's
    offsets (which only grow) still covered, and stopped early it left them ahead of the
    data. A checkpoint holds only what was durable, so going on from it is always sound."""
    path = layout.root / "progress" / f"{ctx.step}.json"
    if not path.exists():
        if any(ctx.start_offsets.values()):
            raise StepFailed(f"{ctx.step}: starts at {dict(ctx.start_offsets)} but saved no "
                             f"checkpoint ({path}); the data of the batch it resumes is gone")
        return {}
    saved: dict[str, dict[str, Any]] = orjson.loads(path.read_bytes())["partitions"]
    return saved


def _save_state(layout: Layout, step: str, partitions: Mapping[str, Any],
                processed: Mapping[str, int]) -> None:
    write_atomically(layout.root / "progress" / f"{step}.json",
                     orjson.dumps({"partitions": partitions, "processed": processed}))


def ensure_source(config: SalesConfig, layout: Layout) -> dict[str, Path]:
    """The source partitions, generated from the seed unless they exist already (this run
    of the step, or the batch it resumes, made them); their shape is noted first, so files
    made with another one are never mixed with new ones (the API refuses such a resume: this
    holds for any way a config reaches the step)."""
    shape = orjson.dumps({key: getattr(config, key) for key in sorted(shapes_data(SalesConfig))})
    noted = layout.source / "shape.json"
    if not noted.exists():
        write_atomically(noted, shape)
    elif noted.read_bytes() != shape:
        raise StepFailed(f"the source files were made with {noted.read_text()}; this step's "
                         f"config says {shape.decode()}: a resume cannot change them")
    paths = {}
    for index, count in enumerate(partition_sizes(config.rows, config.partitions)):
        path = layout.source / f"{partition_name(index)}.jsonl"
        if not path.exists():
            generate_partition(path, index, count, seed=config.seed,
                               invalid_rate=config.invalid_rate)
        paths[partition_name(index)] = path
    return paths


def extract(ctx: StepContext) -> None:
    config, layout = _setup(ctx)
    sources = ensure_source(config, layout)
    saved = _saved(layout, ctx)
    at = {p: saved.get(p, {"offset": 0, "staged": 0, "rejected": 0}) for p in sources}
    with ExitStack() as files:
        staged = {p: files.enter_context(append_from(layout.staging / f"{p}.jsonl",
                                                     at[p]["staged"])) for p in sources}
        rejected = {p: files.enter_context(append_from(layout.rejects / f"{p}.jsonl",
                                                       at[p]["rejected"])) for p in sources}
        start = {p: int(at[p]["offset"]) for p in sources}

        def save(offsets: Mapping[str, int]) -> None:
            state = {p: {"offset": offsets[p], "staged": sync(staged[p]),
                         "rejected": sync(rejected[p])} for p in sources}
            _save_state(layout, ctx.step, state,
                        {p: offsets[p] - start[p] for p in sources})

        progress = Progress(ctx, {p: count_lines(path) for p, path in sources.items()}, save,
                            start=start, throttle=config.throttle,
                            fail=config.fail_at == ctx.step)
        streams = {p: itertools.islice(jsonl_lines(path), start[p], None)
                   for p, path in sources.items()}
        for partition, line in interleave(streams):
            try:
                staged[partition].write(validate(line).to_json() + b"\n")
            except Invalid as exc:
                rejected[partition].write(orjson.dumps(
                    {"reason": str(exc), "line": line.decode(errors="replace")}) + b"\n")
            progress.advance(partition)
        progress.finish()


def _staged(path: Path, skip: int) -> Iterator[Sale]:
    return (Sale.from_json(line) for line in itertools.islice(jsonl_lines(path), skip, None))


Sums = dict[tuple[str, str], list[int]]  # (region, day) -> [revenue_cents, orders, units]


def _sums(rows: list[list[Any]]) -> Sums:
    sums: Sums = defaultdict(lambda: [0, 0, 0])
    for region, day, revenue, orders, units in rows:
        sums[(region, day)] = [revenue, orders, units]
    return sums


def transform(ctx: StepContext) -> None:
    config, layout = _setup(ctx)
    staging = _partitions(layout.staging, ".jsonl", ctx)
    saved = _saved(layout, ctx)
    sums = {p: _sums(saved[p]["sums"] if p in saved else []) for p in staging}
    start = {p: int(saved[p]["offset"]) if p in saved else 0 for p in staging}

    def save(offsets: Mapping[str, int]) -> None:
        # The sums and the positions they cover, in one atomic write.
        state = {p: {"offset": offsets[p], "sums": [[r, d, *v] for (r, d), v in sums[p].items()]}
                 for p in staging}
        _save_state(layout, ctx.step, state, {p: offsets[p] - start[p] for p in staging})

    progress = Progress(ctx, {p: count_lines(path) for p, path in staging.items()}, save,
                        start=start, throttle=config.throttle, fail=config.fail_at == ctx.step)
    for partition, sale in interleave({p: _staged(path, start[p])
                                       for p, path in staging.items()}):
        row = sums[partition][(sale.region, sale.day)]
        row[0] += sale.revenue_cents
        row[1] += 1
        row[2] += sale.quantity
        progress.advance(partition)
    progress.finish()
    # Derived from the saved sums: if the step stops before this, its rerun writes them.
    for partition, groups in sums.items():
        rows = [{"region": region, "day": day, "revenue_cents": revenue, "orders": orders,
                 "units": units}
                for (region, day), (revenue, orders, units) in sorted(groups.items())]
        write_atomically(layout.partials / f"{partition}.json", orjson.dumps(rows))


def load(ctx: StepContext) -> None:
    config, layout = _setup(ctx)
    partials = {p: orjson.loads(path.read_bytes())
                for p, path in _partitions(layout.partials, ".json", ctx).items()}
    layout.db.parent.mkdir(parents=True, exist_ok=True)
    # timeout: a batch's steps rerun (a retry) wait for each other's transaction.
    with closing(sqlite3.connect(layout.db, timeout=30, isolation_level=None)) as db:
        db.execute(SCHEMA)
        db.execute("BEGIN IMMEDIATE")

        # Offsets to start from mean an earlier run of this load committed everything (it
        # reports only when it commits), into the resumed batch's own database and rows:
        # the rows are written again for this batch, counted as done already.
        again = any(ctx.start_offsets.values())

        def commit(offsets: Mapping[str, int]) -> None:
            db.execute("COMMIT")
            _save_state(layout, ctx.step, {}, progress.processed)

        # Progress counts source records: each aggregate row stands for `orders` of them.
        # Its one save is the commit: every offset reported is committed.
        totals = {p: sum(r["orders"] for r in rows) for p, rows in partials.items()}
        try:
            progress = Progress(ctx, totals, commit, throttle=config.throttle,
                                fail=config.fail_at == ctx.step, keep_on_fail=False,
                                every_s=None)
            db.execute(CLEAR, (ctx.batch_id,))
            rows = {p: iter(r) for p, r in partials.items()}
            for partition, row in interleave(rows, chunk=1):
                db.execute(UPSERT, (ctx.batch_id, row["region"], row["day"],
                                    row["revenue_cents"], row["orders"], row["units"]))
                if not again:
                    progress.advance(partition, row["orders"])
            if again:
                # Every row is written again, so at the commit every partition is at its
                # total, also one still at 0: the earlier run reported its partitions one by
                # one and may have stopped among them (cancelled, killed, a send lost), and
                # a partition left at 0 would show a loaded step as never reaching it.
                progress.catch_up(totals)
            progress.finish()
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
