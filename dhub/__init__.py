"""The Batches API's Python client (`DhubClient`; on asyncio `dhub.aio.AsyncDhubClient`) and the
`dhub` command line (`dhub.cli`).

Standalone on purpose: it imports httpx (and, for the command line, rich and PyYAML), never the
service's own packages, so upstream services can use the client without the server's code.
"""

from __future__ import annotations

from dhub.client import DhubClient, RunUnsettled
from dhub.errors import ApiError, AuthError, ConnectionFailed, DhubError, NotFound
from dhub.models import Batch, Page, Pipeline, Step, exit_code
from dhub.watch import WatchEvent

__all__ = ["ApiError", "AuthError", "Batch", "ConnectionFailed", "DhubClient", "DhubError", "NotFound",
           "Page", "Pipeline", "RunUnsettled", "Step", "WatchEvent", "exit_code"]
