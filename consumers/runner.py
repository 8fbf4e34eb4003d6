"""Runs a set of parts in one process: start, heartbeat, graceful shutdown on a signal.

The parts share one Redis client and one producer, opened and closed around them by
`consumers.plumbing.scope.serving`. SIGTERM/SIGINT: every part stops fetching, finishes (and
commits) what it is doing, then closes; the shared clients close last. A part that dies
takes the process down with exit code 1, so the supervisor restarts it rather than
leaving a half-working process that looks alive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from typing import Final

import orjson
from redis.asyncio import Redis

from consumers.bridge import PrefectBridge
from consumers.commands import CommandsConsumer
from consumers.events import EventsConsumer
from consumers.plumbing import collector
from consumers.plumbing.metrics import serve
from consumers.plumbing.options import ConsumerOptions
from consumers.plumbing.part import Part
from consumers.plumbing.scope import failure, serving
from consumers.reconciler import Reconciler
from consumers.retention import RetentionSweeper
from core import keys
from core.logs import scrub
from core.settings import Settings

log = logging.getLogger(__name__)
CHOICES: Final = ("commands", "events", "bridge", "all")


def build(which: str, settings: Settings, options: ConsumerOptions) -> list[Part]:
    """The parts behind a command-line choice; the reconciler goes with the bridge (both
    bring Prefect's view into the events topic), the retention sweeper with the events
    consumer (both write batches and their snapshots; its steps are idempotent, so one per
    events process is safe)."""
    parts: list[Part] = []
    if which in ("events", "all"):
        parts.append(EventsConsumer(settings, options))
    if which in ("commands", "all"):
        parts.append(CommandsConsumer(settings, options))
    if which in ("bridge", "all"):
        parts += [PrefectBridge(settings, options), Reconciler(settings, options)]
    if which in ("events", "all"):
        parts.append(RetentionSweeper(settings, options))
    if not parts:
        raise ValueError(f"unknown part {which!r}; choose from {', '.join(CHOICES)}")
    return parts


class Runner:
    def __init__(self, parts: list[Part], settings: Settings, options: ConsumerOptions) -> None:
        self.parts = parts
        self.settings = settings
        self.options = options
        self.stopping = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        names = ",".join(p.name for p in self.parts)
        log.info("consumers starting: %s (kafka %s, redis %s, prefect %s)", names,
                 self.settings.kafka_bootstrap, scrub(self.settings.redis_url),
                 scrub(self.settings.prefect_api_url))
        failed = False
        tasks: dict[asyncio.Task[None], Part] = {}
        try:
            async with serving(self.parts, self.settings,
                               self.options.shutdown_timeout_s) as live:
                tasks = live.tasks
                await serve(live.scope, self.settings, self.parts)
                heartbeat = asyncio.create_task(self._heartbeat(live.clients.redis, names),
                                                name="heartbeat")
                stop = asyncio.create_task(self._until_stopping())
                done, _ = await asyncio.wait({*tasks, stop}, return_when=asyncio.FIRST_COMPLETED)
                for task in done & tasks.keys():
                    failed = True
                    log.error("part %s ended unexpectedly: %r", tasks[task].name,
                              task.exception() if not task.cancelled() else "cancelled")
                stop.cancel()
                heartbeat.cancel()
        except Exception:
            log.exception("consumers failed to start")
            failed = True
        # A part that failed while stopping (logged by the scope) fails the process too: the
        # supervisor and the operator must not read "all committed" from a clean exit code.
        if any(failure(task) is not None for task in tasks):
            failed = True
        log.info("consumers stopped")
        return 1 if failed else 0

    async def _until_stopping(self) -> None:
        await self.stopping.wait()

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("received %s, shutting down", sig.name)
        self.stopping.set()

    async def _heartbeat(self, redis: Redis, names: str) -> None:
        """A key with a TTL: present while this process (or another consumer process) is
        alive and its parts are running; it lapses on its own when the process dies."""
        body = orjson.dumps({"host": socket.gethostname(), "pid": os.getpid(), "parts": names})
        while True:
            try:
                await redis.set(keys.HEARTBEAT_CONSUMERS, body, ex=self.options.heartbeat_ttl_s)
            except Exception as exc:
                log.warning("heartbeat not written: %s", exc)
            await asyncio.sleep(self.options.heartbeat_every_s)


async def main(which: str = "all") -> int:
    settings = Settings()
    options = ConsumerOptions()
    collector.settle(options.gc_young_objects)
    return await Runner(build(which, settings, options), settings, options).run()
