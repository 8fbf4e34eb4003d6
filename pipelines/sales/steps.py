"""The three steps of `sales-pipeline`; offsets are records processed per partition.

    extract    source/<partition>.jsonl (generated if absent) -> staging/<partition>.jsonl
               (validated records) and rejects/<partition>.jsonl (invalid ones, with reasons)
    transform  staging/<partition>.jsonl -> partials/<partition>.json: revenue, orders and units
               per (region, day) of that partition
    load       partials/*.json -> SQLite table `daily_revenue`, summed over partitions, in one
               transaction that first removes the batch's earlier rows (a rerun replaces them)

Steps are sync: the SDK runs them in a thread, so plain file and SQLite I/O is fine here.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Final

import orjson

from pipelines.sales.config import Layout, SalesConfig, partition_name, read_config
from pipelines.sales.files import count_lines, jsonl_lines, write_atomically
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
    config = read_config(ctx.config)
    return config, Layout.of(ctx)


def _partitions(directory: Path, suffix: str, step: str) -> dict[str, Path]:
    """The partition files a previous step left, by partition name, in numeric order."""
    files = sorted(directory.glob(f"partition_*{suffix}"),
                   key=lambda p: int(p.name[len("partition_"):-len(suffix)]))
    if not files:
        raise StepFailed(f"{step}: no partitions in {directory}; did the previous step run?")
    return {p.name[: -len(suffix)]: p for p in files}


def ensure_source(config: SalesConfig, layout: Layout) -> dict[str, Path]:
    """The source partitions, generated from the seed unless they exist already."""
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
    progress = Progress(ctx, {p: count_lines(path) for p, path in sources.items()},
                        throttle=config.throttle, fail=config.fail_at == ctx.step)
    staged: dict[str, list[bytes]] = {p: [] for p in sources}
    rejected: dict[str, list[bytes]] = {p: [] for p in sources}
    streams = {p: jsonl_lines(path) for p, path in sources.items()}
    for partition, line in interleave(streams):
        try:
            staged[partition].append(validate(line).to_json())
        except Invalid as exc:
            rejected[partition].append(orjson.dumps({"reason": str(exc),
                                                     "line": line.decode(errors="replace")}))
        progress.advance(partition)
    # Written at the end, atomically: a failed extract leaves no half staging area behind.
    for partition in sources:
        for directory, lines in ((layout.staging, staged), (layout.rejects, rejected)):
            body = b"\n".join(lines[partition])
            write_atomically(directory / f"{partition}.jsonl", body + b"\n" if body else b"")


def _staged(path: Path) -> Iterator[Sale]:
    return (Sale.from_json(line) for line in jsonl_lines(path))


def transform(ctx: StepContext) -> None:
    config, layout = _setup(ctx)
    staging = _partitions(layout.staging, ".jsonl", ctx.step)
    progress = Progress(ctx, {p: count_lines(path) for p, path in staging.items()},
                        throttle=config.throttle, fail=config.fail_at == ctx.step)
    # (region, day) -> [revenue_cents, orders, units], per partition
    sums: dict[str, dict[tuple[str, str], list[int]]] = {
        p: defaultdict(lambda: [0, 0, 0]) for p in staging
    }
    for partition, sale in interleave({p: _staged(path) for p, path in staging.items()}):
        row = sums[partition][(sale.region, sale.day)]
        row[0] += sale.revenue_cents
        row[1] += 1
        row[2] += sale.quantity
        progress.advance(partition)
    for partition, groups in sums.items():
        rows = [{"region": region, "day": day, "revenue_cents": revenue, "orders": orders,
                 "units": units}
                for (region, day), (revenue, orders, units) in sorted(groups.items())]
        write_atomically(layout.partials / f"{partition}.json", orjson.dumps(rows))


def load(ctx: StepContext) -> None:
    config, layout = _setup(ctx)
    partials = {p: orjson.loads(path.read_bytes())
                for p, path in _partitions(layout.partials, ".json", ctx.step).items()}
    # Progress counts source records: each aggregate row stands for `orders` of them.
    progress = Progress(ctx, {p: sum(r["orders"] for r in rows) for p, rows in partials.items()},
                        throttle=config.throttle, fail=config.fail_at == ctx.step)
    layout.db.parent.mkdir(parents=True, exist_ok=True)
    # timeout: a batch's steps rerun (a retry) wait for each other's transaction.
    with closing(sqlite3.connect(layout.db, timeout=30, isolation_level=None)) as db:
        db.execute(SCHEMA)
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(CLEAR, (ctx.batch_id,))
            rows = {p: iter(r) for p, r in partials.items()}
            for partition, row in interleave(rows, chunk=1):
                db.execute(UPSERT, (ctx.batch_id, row["region"], row["day"],
                                    row["revenue_cents"], row["orders"], row["units"]))
                progress.advance(partition, row["orders"])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
