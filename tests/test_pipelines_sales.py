"""The sales pipeline's steps on small real data: files, validation, aggregates, SQLite.

The steps are called directly with a context whose reports are only recorded (no Kafka):
these tests are about the data; the SDK's publishing is tested in test_pipelines_sdk.py.
"""

from __future__ import annotations

import sqlite3
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import closing
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from core.settings import Settings
from core.step_catalogue import CATALOGUE, config_problems, known_steps
from pipelines.offsets import OffsetBook
from pipelines.sales import PIPELINE_ID, PIPELINE_NAME, demo_spec
from pipelines.sales.config import SalesConfig
from pipelines.sales.files import count_lines
from pipelines.sales.records import Invalid, partition_sizes, validate
from pipelines.sales.steps import extract, load, transform
from pipelines.sdk import StepContext, StepFailed
from pipelines.steps import STEPS, UnknownStep, resolve

BATCH = "batch-sales-test"


def context(tmp_path: Path, step: str, batch_id: str = BATCH, **config: Any) -> StepContext:
    """A step of batch `batch_id` whose data goes under `tmp_path` (the DHUB_DATA_DIR)."""
    return StepContext(batch_id=batch_id, pipeline_id=PIPELINE_ID, step=step, config=config,
                       settings=Settings(state_dir=tmp_path / "state", data_dir=tmp_path),
                       book=OffsetBook(), on_change=lambda: None)


def run_all(tmp_path: Path, **config: Any) -> dict[str, StepContext]:
    done = {}
    fns: dict[str, Callable[[StepContext], None]] = {
        "extract": extract, "transform": transform, "load": load}
    for name, fn in fns.items():
        ctx = context(tmp_path, name, **config)
        fn(ctx)
        done[name] = ctx
    return done


def expected_from_source(root: Path) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(region, day) -> (revenue cents, orders, units), computed independently of the steps."""
    sums: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for path in sorted((root / "source").glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            rec = orjson.loads(line)
            try:
                validate(line)
            except Invalid:
                continue
            key = (rec["region"], rec["ts"][:10])
            cents = int(Decimal(rec["unit_price"]) * 100)
            sums[key][0] += rec["quantity"] * cents
            sums[key][1] += 1
            sums[key][2] += rec["quantity"]
    return {k: (v[0], v[1], v[2]) for k, v in sums.items()}


def table(db: Path) -> dict[tuple[str, str], tuple[int, int, int]]:
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT region, day, revenue_cents, orders, units "
                            "FROM daily_revenue WHERE batch_id = ?", (BATCH,)).fetchall()
    return {(r[0], r[1]): (r[2], r[3], r[4]) for r in rows}


def test_partition_sizes_cover_every_row() -> None:
    assert partition_sizes(10, 4) == [3, 3, 2, 2]
    assert partition_sizes(3, 4) == [1, 1, 1, 0]
    assert sum(partition_sizes(20_000, 7)) == 20_000


def test_generator_is_seeded(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for root, seed in ((a, 1), (b, 1), (c, 2)):
        extract(context(root, "extract", rows=300, partitions=2, seed=seed))
    src = Path(BATCH) / "source" / "partition_1.jsonl"
    assert (a / src).read_bytes() == (b / src).read_bytes()
    assert (a / src).read_bytes() != (c / src).read_bytes()


def test_pipeline_totals_in_sqlite_match_generated_records(tmp_path: Path) -> None:
    ctxs = run_all(tmp_path, rows=1_003, partitions=3, seed=7)
    root = tmp_path / BATCH
    sizes = dict(zip(["partition_0", "partition_1", "partition_2"],
                     partition_sizes(1_003, 3), strict=True))
    # offsets: records processed per partition, equal to the partition sizes for every step
    for name, ctx in ctxs.items():
        assert ctx.offsets == sizes, name
        assert ctx.totals == sizes, name
    expected = expected_from_source(root)
    loaded = table(root / "sales.db")
    assert loaded == expected
    assert sum(v[1] for v in loaded.values()) == 1_003


def test_extract_rejects_invalid_records_with_reasons(tmp_path: Path) -> None:
    ctxs = run_all(tmp_path, rows=2_000, partitions=2, seed=3, invalid_rate=0.05)
    root = tmp_path / BATCH
    rejects = [orjson.loads(line) for p in sorted((root / "rejects").glob("*.jsonl"))
               for line in p.read_bytes().splitlines()]
    staged = sum(len(p.read_bytes().splitlines()) for p in (root / "staging").glob("*.jsonl"))
    assert 40 < len(rejects) < 200
    assert staged + len(rejects) == 2_000
    reasons = Counter(r["reason"].split(" ")[0] for r in rejects)
    assert set(reasons) <= {"quantity", "unknown", "unit_price", "ts"}
    # extract processed every record; transform and load only the valid ones
    assert sum(ctxs["extract"].offsets.values()) == 2_000
    assert sum(ctxs["transform"].offsets.values()) == staged
    assert sum(ctxs["load"].offsets.values()) == staged
    assert table(root / "sales.db") == expected_from_source(root)


@pytest.mark.parametrize(("line", "reason"), [
    (b'{"order_id": "x", "ts": "2024-01-02T00:00:00Z", "region": "emea", "product": "p",'
     b' "quantity": 2, "unit_price": "1.005"}', "not an amount in cents"),
    (b'{"order_id": "x", "ts": "2024-01-02T00:00:00", "region": "emea", "product": "p",'
     b' "quantity": 2, "unit_price": "1.00"}', "no time zone"),
    (b'{"order_id": "x", "ts": "2024-01-02T00:00:00Z", "region": "emea", "product": "p",'
     b' "quantity": true, "unit_price": "1.00"}', "quantity"),
    (b"[1, 2]", "not a JSON object"),
    (b"{oops", "not JSON"),
])
def test_validate_explains_what_is_wrong(line: bytes, reason: str) -> None:
    with pytest.raises(Invalid, match=reason):
        validate(line)


def test_validate_normalises_a_good_record() -> None:
    sale = validate(b'{"order_id": "o1", "ts": "2024-01-02T23:30:00-02:00", "region": "apac",'
                    b' "product": "dock", "quantity": 3, "unit_price": "19.99"}')
    assert (sale.day, sale.price_cents, sale.revenue_cents) == ("2024-01-03", 1999, 5997)


def test_load_replaces_the_batch_rows_on_rerun(tmp_path: Path) -> None:
    run_all(tmp_path, rows=500, partitions=2)
    load(context(tmp_path, "load", rows=500, partitions=2))
    root = tmp_path / BATCH
    assert table(root / "sales.db") == expected_from_source(root)


@pytest.mark.parametrize("step", ["extract", "transform", "load"])
def test_fail_at_fails_that_step_half_way(tmp_path: Path, step: str) -> None:
    config: dict[str, Any] = {"rows": 400, "partitions": 2, "fail_at": step}
    fns: dict[str, Callable[[StepContext], None]] = {
        "extract": extract, "transform": transform, "load": load}
    for name, fn in fns.items():
        ctx = context(tmp_path, name, **config)
        if name != step:
            fn(ctx)
            continue
        with pytest.raises(StepFailed, match="on purpose"):
            fn(ctx)
        break
    root = tmp_path / BATCH
    if step == "load":
        # One transaction: nothing committed, so nothing reported.
        assert sum(ctx.offsets.values()) == 0
        assert table(root / "sales.db") == {}
        return
    # Half way, saved before failing: the offsets reported are the records whose output is
    # on disk, exactly.
    assert sum(ctx.offsets.values()) == 200
    saved = orjson.loads((root / "progress" / f"{step}.json").read_bytes())
    assert {p: s["offset"] for p, s in saved["partitions"].items()} == ctx.offsets
    assert saved["processed"] == ctx.offsets
    if step == "extract":
        staged = {p: count_lines(root / "staging" / f"{p}.jsonl") +
                  count_lines(root / "rejects" / f"{p}.jsonl") for p in ctx.offsets}
        assert staged == ctx.offsets


def test_transform_without_extract_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(StepFailed, match="did the previous step run"):
        transform(context(tmp_path, "transform"))


def test_bad_config_is_a_step_failure(tmp_path: Path) -> None:
    with pytest.raises(StepFailed, match="invalid sales step config"):
        extract(context(tmp_path, "extract", rows=-1))
    with pytest.raises(StepFailed, match="invalid sales step config"):
        extract(context(tmp_path, "extract", colour="blue"))


def test_default_data_dir_is_per_batch_under_the_state_dir(tmp_path: Path) -> None:
    ctx = StepContext(batch_id=BATCH, pipeline_id=PIPELINE_ID, step="extract",
                      config={"rows": 10, "partitions": 1},
                      settings=Settings(state_dir=tmp_path), book=OffsetBook(),
                      on_change=lambda: None)
    extract(ctx)
    assert (tmp_path / "data" / BATCH / "staging" / "partition_0.jsonl").exists()


@pytest.mark.parametrize("config", [
    {"data_dir": "/etc"}, {"db_path": "/home/someone/.bashrc"},
    {"data_dir": "relative/dir", "db_path": "x.db"}, {"data_dir": None},
])
def test_a_step_config_may_not_choose_a_path(tmp_path: Path, config: dict[str, Any]) -> None:
    for fn in (extract, transform, load):
        with pytest.raises(StepFailed, match="data locations are server settings") as refused:
            fn(context(tmp_path, fn.__name__, rows=10, **config))
        assert all(key in str(refused.value) for key in config)
    with pytest.raises(ValidationError, match="may not be set in a step config"):
        SalesConfig.model_validate(config)
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere


def test_data_locations_are_a_server_setting(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DHUB_DATA_DIR", str(tmp_path / "from-env"))
    settings = Settings(state_dir=tmp_path / "state")
    assert settings.data_root == tmp_path / "from-env"
    for fn in (extract, transform, load):
        fn(StepContext(batch_id=BATCH, pipeline_id=PIPELINE_ID, step=fn.__name__,
                       config={"rows": 10, "partitions": 1}, settings=settings,
                       book=OffsetBook(), on_change=lambda: None))
    root = tmp_path / "from-env" / BATCH
    assert (root / "staging" / "partition_0.jsonl").exists()
    assert table(root / "sales.db") == expected_from_source(root)
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("batch_id", ["..", ".", "", "a/b", "../escape"])
def test_a_batch_id_cannot_leave_the_data_directory(tmp_path: Path, batch_id: str) -> None:
    with pytest.raises(StepFailed, match="cannot name a data directory"):
        extract(context(tmp_path / "data", "extract", batch_id=batch_id, rows=10))
    assert not tmp_path.joinpath("source").exists() and not (tmp_path / "data").exists()


def test_demo_spec_and_step_registry() -> None:
    spec = demo_spec()
    assert (PIPELINE_ID, spec.name, spec.version) == ("pipeline-sales", PIPELINE_NAME, "1")
    assert spec.step_names == ["extract", "transform", "load"]
    assert [s.uses for s in spec.steps] == ["sales.extract", "sales.transform", "sales.load"]
    assert spec.steps[0].config["rows"] == 20_000
    assert demo_spec(rows=10, throttle=None, fail_at="load").steps[2].config == {
        "rows": 10, "partitions": 4, "seed": 42, "throttle": None, "fail_at": "load"}
    assert {s.uses for s in spec.steps} <= known_steps()
    assert resolve("sales.load") is load
    with pytest.raises(UnknownStep, match="no step implementation"):
        resolve("os.system")


def test_a_definition_naming_a_path_is_refused_at_registration() -> None:
    """What the pipeline routes check before registering a definition (400)."""
    assert config_problems("sales.extract", {"rows": 10}) == []
    assert config_problems("unknown.step", {"data_dir": "/"}) == []  # refused elsewhere
    (problem,) = config_problems("sales.load", {"db_path": "/etc/x.db"}, "steps.2.config")
    assert problem["loc"] == "steps.2.config"
    assert "db_path may not be set" in problem["msg"] and "DHUB_DATA_DIR" in problem["msg"]
    (problem,) = config_problems("sales.extract", {"rows": -1})
    assert problem["loc"] == "config.rows"
    assert {s.uses for s in demo_spec().steps} <= set(CATALOGUE)


def test_the_catalogue_names_exactly_the_steps_that_run() -> None:
    """The API admits what `core.step_catalogue` lists; the worker runs `pipelines.steps`."""
    assert known_steps() == set(STEPS)
    for uses, fn in STEPS.items():
        assert resolve(uses) is fn
