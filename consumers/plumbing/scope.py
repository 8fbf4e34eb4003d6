"""One resource scope for a process's parts: the shared clients opened first, the parts
started on them and run as tasks; on leaving, every part asked to stop, awaited (cancelled
after the shutdown timeout), closed, and the shared clients closed last — in reverse of
opening. The runner and the tests go through this same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from consumers.plumbing.part import Clients, Part, open_clients
from core.settings import Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Serving:
    clients: Clients
    scope: contextlib.AsyncExitStack  # for the caller's own resources, closed before the parts
    tasks: dict[asyncio.Task[None], Part] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def serving(parts: list[Part], settings: Settings,
                  shutdown_timeout_s: float) -> AsyncIterator[Serving]:
    """The parts running on one Redis client and one producer (see the module's doc)."""
    async with contextlib.AsyncExitStack() as scope:
        clients = await open_clients(scope, settings)
        started: list[Part] = []
        tasks: dict[asyncio.Task[None], Part] = {}
        scope.push_async_callback(_shutdown, started, tasks, shutdown_timeout_s)
        for part in parts:
            started.append(part)  # closed even if its start fails half-way
            await part.start(clients)
        tasks.update({asyncio.create_task(p.run(), name=p.name): p for p in parts})
        serving = Serving(clients, await scope.enter_async_context(contextlib.AsyncExitStack()),
                          tasks)
        yield serving


async def _shutdown(started: list[Part], tasks: dict[asyncio.Task[None], Part],
                    grace_s: float) -> None:
    """Stops fetching everywhere first, lets each part finish (and commit) what it is doing,
    then closes the parts in reverse of their start."""
    ended_before = {task for task in tasks if task.done()}  # the runner reported those
    for part in started:
        part.request_stop()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for task in pending:
            log.warning("part %s did not stop in time; cancelled", tasks[task].name)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A part whose last work (a final flush or commit) failed while stopping must not
        # end silently: what it applied may be left uncommitted.
        for task, part in tasks.items():
            error = failure(task)
            if error is not None and task not in ended_before:
                log.error("part %s failed while stopping", part.name, exc_info=error)
    for part in reversed(started):
        await part.close()


def failure(task: asyncio.Task[None]) -> BaseException | None:
    """The exception a finished part's task ended with (a cancel is not one)."""
    if not task.done() or task.cancelled():
        return None
    return task.exception()
