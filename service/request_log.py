"""The request a log line was written for: its id, and the pipeline and batch it names.

The edge middleware notes the request in a context variable (each request runs in its own
task, so its own context); a filter on the log handler copies the ids onto every record written
while the request is handled, and the JSON formatter (core.logs) prints them.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

from aiohttp import web

CURRENT_REQUEST: ContextVar[web.Request | None] = ContextVar("dhub_request", default=None)
REQUEST_ID = web.RequestKey("request_id", str)
# Set on a GET held by `?wait=` (service.conditional) once it waits: its latency is the
# wait, measured in a series of its own (`<route>.held`) so it never reads as a slow GET.
HELD = web.RequestKey("held", bool)


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
