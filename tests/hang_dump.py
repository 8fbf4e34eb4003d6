"""A test about to hit its pytest-timeout prints every asyncio task's stack first.

pytest-timeout's own dump shows the main thread idle in the event loop's `select`, which
says nothing about what the test waits for; the tasks' stacks do. The dump lands in the
test's captured stderr, shown with its failure.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
from collections.abc import Iterator

import pytest

_BEFORE_TIMEOUT_S = 5.0


def _dump_tasks() -> None:
    # From the timer's thread: reading the tasks of a running loop is racy, but good enough
    # for a diagnosis, and the test is lost anyway.
    for loop in [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]:
        if not loop.is_running():
            continue
        print("--- asyncio tasks before the test's timeout ---", file=sys.stderr)
        for task in list(asyncio.all_tasks(loop)):
            print(f"task {task.get_name()}: {task!r:.300}", file=sys.stderr)
            for frame in task.get_stack(limit=25):
                print(f"    {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}",
                      file=sys.stderr)
    sys.stderr.flush()


def _timeout_s(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    return float(item.config.getini("timeout") or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    timeout_s = _timeout_s(item)
    timer = None
    if timeout_s > _BEFORE_TIMEOUT_S:
        timer = threading.Timer(timeout_s - _BEFORE_TIMEOUT_S, _dump_tasks)
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
