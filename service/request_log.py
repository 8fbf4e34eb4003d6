"""The request a log line was written for: its id, and the pipeline and batch it names.

The edge (service.errors) notes the request in a context variable (each request runs in its own
task, so its own context); a filter on the log handler copies the ids onto every record written
while the request is handled, and the JSON formatter (core.logs) prints them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from contextvars import Context, ContextVar
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")

CURRENT_REQUEST: ContextVar[web.Request | None] = ContextVar("dhub_request", default=None)
REQUEST_ID = web.RequestKey("request_id", str)
# Set on a GET held by `?wait=` (service.conditional) once it waits: its latency is the
# wait, measured in a series of its own (`<route>.held`) so it never reads as a slow GET.
HELD = web.RequestKey("held", bool)


def detached(coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
    """A task of no request: work shared by several requests (a send turn, a shared read) or
    outliving the one that started it (Kafka's watcher). Made from the request's context,
    its log lines would carry that request's id, pipeline and batch."""
    return asyncio.get_running_loop().create_task(coro, name=name, context=Context())


class RequestContext(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        request = CURRENT_REQUEST.get()
        if request is not None:
            record.request_id = request.get(REQUEST_ID)
            match = request.match_info
            for name in ("pipeline_id", "batch_id"):
                if name in match:
                    setattr(record, name, match[name])
        return True
