"""Step implementations as plugins (entry-point group `dhub.steps`): how they are found, what a
broken or clashing plugin does, the config models' bounds, and the example plugin's steps and
clean-ups on real files (called directly: no Kafka, the SDK's publishing is tested elsewhere)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from core import step_catalogue
from core.settings import Settings
from core.step_catalogue import GROUP, StepDeclaration, config_problems, declarations, known_steps
from pipelines.offsets import OffsetBook
from pipelines.sales import PIPELINE_ID
from pipelines.sdk import StepContext, StepFailed
from pipelines.steps import STEPS, UnknownStep, resolve

SALES = {"sales.extract", "sales.transform", "sales.load"}
WORDCOUNT = {"wordcount.generate", "wordcount.count", "wordcount.merge"}
BATCH = "batch-plugin-test"


def test_both_installed_distributions_declare_their_steps_through_entry_points() -> None:
    by_dist = {(p.dist.name if p.dist else None, p.name) for p in entry_points(group=GROUP)}
    assert {("dhub-batches", n) for n in SALES} <= by_dist, "is the project installed (make setup)?"
    assert {("dhub-wordcount", n) for n in WORDCOUNT} <= by_dist, "is examples/wordcount installed?"
    assert known_steps() >= SALES | WORDCOUNT
    for name in SALES | WORDCOUNT:
        declared = declarations()[name]
        assert declared.name == name and issubclass(declared.config, BaseModel)
        assert declared.doc and "\n" not in declared.doc
        assert declared.cleanup is not None


def test_the_worker_imports_each_step_by_its_declared_path() -> None:
    from dhub_wordcount import steps as wordcount

    from pipelines.sales import steps as sales

    assert resolve("sales.load") is sales.load
    assert resolve("wordcount.merge") is wordcount.merge
    assert set(STEPS) == known_steps()
    with pytest.raises(UnknownStep, match="no step implementation"):
        resolve("os.system")
    with pytest.raises(KeyError):
        STEPS["os:system"]


GOOD = StepDeclaration(name="fake.good", doc="A good one.", config=BaseModel, run="os:getcwd")
WRONG_NAME = StepDeclaration(name="fake.other", doc="Named apart.", config=BaseModel, run="os:getcwd")
NOT_A_DECLARATION = object()


@pytest.fixture
def fake_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EntryPoint]]:
    points: list[EntryPoint] = []
    monkeypatch.setattr(step_catalogue, "entry_points", lambda group: points if group == GROUP else [])
    declarations.cache_clear()
    yield points
    declarations.cache_clear()


def test_a_broken_or_clashing_plugin_is_left_out_and_the_others_still_work(
        fake_plugins: list[EntryPoint]) -> None:
    here = __name__
    fake_plugins += [
        EntryPoint("fake.good", f"{here}:GOOD", GROUP),
        EntryPoint("fake.missing", "no_such_module_anywhere:X", GROUP),
        EntryPoint("fake.object", f"{here}:NOT_A_DECLARATION", GROUP),
        EntryPoint("fake.renamed", f"{here}:WRONG_NAME", GROUP),
        # Two declare the same name: which code runs must not depend on install order.
        EntryPoint("fake.other", f"{here}:WRONG_NAME", GROUP),
        EntryPoint("fake.other", f"{here}:WRONG_NAME", GROUP),
    ]
    assert known_steps() == {"fake.good"}
    assert config_problems("fake.other", {"anything": 1}) == []  # unknown: refused apart


@pytest.mark.parametrize("changes", [
    {"doc": "two\nlines"}, {"doc": " "}, {"run": "not a path"}, {"cleanup": "os.getcwd"},
])
def test_a_declaration_is_checked_when_made(changes: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"name": "x.y", "doc": "One line.", "config": BaseModel,
                              "run": "os:getcwd", **changes}
    with pytest.raises(ValueError, match=r"one line|module:function"):
        StepDeclaration(**fields)
    with pytest.raises(TypeError, match="pydantic model"):
        StepDeclaration(name="x.y", doc="One line.", config=dict, run="os:getcwd")  # type: ignore[arg-type]


@pytest.mark.parametrize(("uses", "config", "where"), [
    # A throttled step's time is bounded: 10M rows at 0.001 records/s would never end.
    ("sales.extract", {"rows": 10_000_000, "throttle": 0.001}, "config"),
    ("sales.extract", {"rows": 3001, "throttle": 5}, "config"),
    ("sales.load", {"partitions": 257}, "config.partitions"),
    ("wordcount.generate", {"lines": 100_001}, "config.lines"),
    ("wordcount.count", {"partitions": 17}, "config.partitions"),
    ("wordcount.count", {"words_per_line": 21}, "config.words_per_line"),
    ("wordcount.generate", {"partitions": 16, "lines": 100_000, "throttle": 1000}, "config"),
    ("wordcount.merge", {"data_dir": "/etc"}, "config"),
    ("wordcount.merge", {"output": "x"}, "config.output"),
])
def test_config_models_bound_what_one_request_can_ask(uses: str, config: dict[str, Any],
                                                      where: str) -> None:
    (problem,) = config_problems(uses, config)
    assert problem["loc"] == where, problem


def test_sizes_within_the_bounds_are_accepted() -> None:
    assert config_problems("sales.extract", {"rows": 3000, "throttle": 5}) == []
    assert config_problems("sales.extract", {"rows": 10_000_000}) == []  # full speed
    assert config_problems("wordcount.count", {"partitions": 16, "lines": 100_000,
                                               "words_per_line": 20, "throttle": 6000}) == []


def context(data_root: Path, step: str, batch_id: str = BATCH, **config: Any) -> StepContext:
    return StepContext(batch_id=batch_id, pipeline_id=PIPELINE_ID, step=step, config=config,
                       settings=Settings(state_dir=data_root / "state", data_dir=data_root),
                       book=OffsetBook(), on_change=lambda: None)


def test_the_example_pipeline_counts_the_words_it_generated(tmp_path: Path) -> None:
    config: dict[str, Any] = {"partitions": 3, "lines": 2_345, "words_per_line": 6, "seed": 3}
    offsets = {}
    for step in ("generate", "count", "merge"):
        ctx = context(tmp_path, step, **config)
        resolve(f"wordcount.{step}")(ctx)
        offsets[step] = ctx.offsets
        assert ctx.totals == dict.fromkeys(("part-0", "part-1", "part-2"), 2_345)
    assert all(o == dict.fromkeys(("part-0", "part-1", "part-2"), 2_345) for o in offsets.values())

    root = tmp_path / BATCH / "wordcount"
    # Counted here independently of the steps' code, from the generated files.
    expected: Counter[str] = Counter()
    for path in sorted((root / "text").glob("*.txt")):
        lines = path.read_text().splitlines()
        assert len(lines) == 2_345 and all(len(line.split()) == 6 for line in lines)
        expected.update(word for line in lines for word in line.split())
    result = orjson.loads((root / "result.json").read_bytes())
    assert result["counts"] == dict(expected) and result["words"] == 3 * 2_345 * 6
    assert list(result["counts"].values()) == sorted(result["counts"].values(), reverse=True)
    # Saved chunk by chunk: each offset the count step reported was a chunk already on disk.
    assert [p.name for p in sorted((root / "counts" / "part-0").iterdir())] == [
        "000000000-000001000.json", "000001000-000002000.json", "000002000-000002345.json"]
    # The same seed gives the same text: a rerun replaces the files with equal ones.
    before = (root / "text" / "part-1.txt").read_bytes()
    resolve("wordcount.generate")(context(tmp_path, "generate", **config))
    assert (root / "text" / "part-1.txt").read_bytes() == before


def test_merge_refuses_counts_that_do_not_cover_the_text(tmp_path: Path) -> None:
    config: dict[str, Any] = {"partitions": 1, "lines": 1_500}
    for step in ("generate", "count"):
        resolve(f"wordcount.{step}")(context(tmp_path, step, **config))
    (tmp_path / BATCH / "wordcount" / "counts" / "part-0" / "000000000-000001000.json").unlink()
    with pytest.raises(StepFailed, match="gap or overlap at line 0"):
        resolve("wordcount.merge")(context(tmp_path, "merge", **config))
    with pytest.raises(StepFailed, match="did the generate step run"):
        resolve("wordcount.count")(context(tmp_path, "count", batch_id="batch-other", **config))


def test_each_plugin_cleans_up_its_own_files_idempotently(tmp_path: Path) -> None:
    resolve("sales.extract")(context(tmp_path, "extract", rows=50, partitions=2))
    resolve("wordcount.generate")(context(tmp_path, "generate", partitions=1, lines=10))
    batch = tmp_path / BATCH
    assert {p.name for p in batch.iterdir()} >= {"source", "staging", "wordcount"}
    word_cleanup = step_catalogue.import_path(declarations()["wordcount.count"].cleanup or "")
    sales_cleanup = step_catalogue.import_path(declarations()["sales.load"].cleanup or "")

    word_cleanup(tmp_path, BATCH)
    assert not (batch / "wordcount").exists() and (batch / "source").exists()  # not its files
    sales_cleanup(tmp_path, BATCH)
    assert not batch.exists()
    for cleanup in (word_cleanup, sales_cleanup):  # a delete's pass may run again
        cleanup(tmp_path, BATCH)
        with pytest.raises(ValueError, match="cannot name a data directory"):
            cleanup(tmp_path, "..")
    assert tmp_path.exists()
