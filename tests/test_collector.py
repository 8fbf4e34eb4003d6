"""The consumers process's garbage-collector policy (`consumers.plumbing.collector`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from consumers import runner
from consumers.plumbing import collector


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_freezes_what_exists_and_collects_the_young_less_often(restored_gc: None) -> None:
    gc.unfreeze()
    _, older, oldest = gc.get_threshold()
    collector.settle(50_000)
    assert gc.get_threshold() == (50_000, older, oldest)
    assert gc.get_freeze_count() > 0


def test_zero_leaves_the_collector_as_python_set_it(restored_gc: None) -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    collector.settle(0)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


async def test_the_consumers_process_applies_its_option_at_start(
        restored_gc: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DHUB_GC_YOUNG_OBJECTS", "54321")
    ran: list[list[str]] = []

    async def run(self: runner.Runner) -> int:
        ran.append([p.name for p in self.parts])
        return 0

    monkeypatch.setattr(runner.Runner, "run", run)
    assert await runner.main("events") == 0
    assert ran and "events" in ran[0]
    assert gc.get_threshold()[0] == 54321
