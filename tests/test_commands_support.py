"""Helpers for the commands consumer's fault tests (no tests here): an HTTP proxy in front of
the real Prefect server that breaks chosen calls in chosen ways, and a test context."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from redis.asyncio import Redis

from consumers.commands import CommandsConsumer
from core.keys import CLEANUP_DUE, CLEANUP_SINCE
from core.settings import Settings
from tests.conftest import eventually
from tests.test_consumers_support import (
    Deployer,
    PipelineCtx,
    committed,
    flow_runs,
    options,
    prefect,
    unique,
)

CREATE_RUN = re.compile(r"^/api/deployments/[^/]+/create_flow_run$")
SET_STATE = re.compile(r"^/api/flow_runs/[^/]+/set_state$")
# What the proxy does with one request: pass it on; answer 500 after Prefect did it
# ("done-500"); answer 500 at once and pass it on `later` seconds afterwards, as a request
# still in flight inside Prefect would land ("late-500"; or once `release` is set, when the
# test says so); answer 500 without passing it on
# ("500"); pass it on `later` seconds late, as a slow Prefect ("slow").
Action = str
Rule = Callable[[str, str], Action]


def passing(method: str, path: str) -> Action:
    return "pass"


@dataclass
class PrefectProxy:
    upstream: str  # e.g. http://127.0.0.1:4200
    rule: Rule = passing
    later: float = 3.0
    seen: list[tuple[str, str, Action]] = field(default_factory=list)
    release: asyncio.Event | None = None
    landed: list[int] = field(default_factory=list)  # statuses of late requests passed on
    url: str = ""
    _late: set[asyncio.Task[None]] = field(default_factory=set)
    _session: aiohttp.ClientSession | None = None

    async def _forward(self, session: aiohttp.ClientSession, request: web.Request,
                       body: bytes) -> tuple[int, bytes, str]:
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", "transfer-encoding")}
        async with session.request(request.method, self.upstream + request.path_qs,
                                   data=body, headers=headers) as response:
            return response.status, await response.read(), response.content_type

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            return await self._handle_one(request)
        except aiohttp.ClientConnectionError:
            # Prefect itself is unreachable: so is the proxy (a dropped connection, which
            # the client sees as Prefect unavailable, not as a server error).
            if request.transport is not None:
                request.transport.abort()
            raise

    async def _handle_one(self, request: web.Request) -> web.Response:
        body = await request.read()
        action = self.rule(request.method, request.path)
        self.seen.append((request.method, request.path, action))
        session = self._session
        assert session is not None
        if action == "late-500":
            async def land() -> None:
                if self.release is not None:
                    await self.release.wait()
                else:
                    await asyncio.sleep(self.later)
                with contextlib.suppress(aiohttp.ClientError):
                    status, _, _ = await self._forward(session, request, body)
                    self.landed.append(status)
            task = asyncio.create_task(land())
            self._late.add(task)
            task.add_done_callback(self._late.discard)
            return web.json_response({"detail": "injected"}, status=500)
        if action == "500":
            return web.json_response({"detail": "injected"}, status=500)
        if action == "slow":
            await asyncio.sleep(self.later)
        status, data, ctype = await self._forward(session, request, body)
        if action == "done-500":
            return web.json_response({"detail": "injected after the effect"}, status=500)
        return web.Response(status=status, body=data, content_type=ctype)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[PrefectProxy]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        async with aiohttp.ClientSession() as session:
            self._session = session
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}/api"
            try:
                yield self
            finally:
                for task in list(self._late):
                    with contextlib.suppress(BaseException):
                        await task
                await runner.cleanup()


def proxy_for(settings: Settings, rule: Rule, later: float = 3.0) -> PrefectProxy:
    return PrefectProxy(settings.prefect_api_url.removesuffix("/api"), rule, later)


class CommandsCtx(PipelineCtx):
    def consumer(self, settings: Settings | None = None, **opts: Any) -> CommandsConsumer:
        return CommandsConsumer(settings or self.settings, options(**opts),
                                ensure=self.deployer.ensure)

    async def processed(self, count: int, timeout: float = 30) -> None:
        async def done() -> bool:
            s = self.settings
            return await committed(s, s.group_commands, s.topic_commands) >= count
        await eventually(done, timeout=timeout)

    async def no_cleanup_left(self, timeout: float = 30) -> None:
        async def empty() -> bool:
            return not await self.redis.exists(CLEANUP_DUE, CLEANUP_SINCE)
        await eventually(empty, timeout=timeout, interval=0.1)


@contextlib.asynccontextmanager
async def commands_ctx(topics: Settings, redis: Redis, prefix: str) -> AsyncIterator[CommandsCtx]:
    """A test's pipeline (`prefix` and a unique tail) on `topics`; its flow runs and
    deployments removed on leaving."""
    context = CommandsCtx(topics, redis, Deployer(topics), unique(prefix))
    try:
        yield context
    finally:
        await context.deployer.cleanup(context.batches)


async def states_of(ctx: CommandsCtx, batch_id: str) -> list[str]:
    """The state types of the batch's flow runs; a run Prefect is still creating or
    deleting can be read without a state yet ("NONE")."""
    async with prefect(ctx.settings) as client:
        return [r.state.type.value if r.state is not None else "NONE"
                for r in await flow_runs(client, batch_id)]
