"""What the engine fork server prepares once, so that every forked flow run has it for free.

The modules: what a flow run imports before its first step and right after it, found by
listing the modules a forked run added to `sys.modules`. Only libraries: the project's and
the pipelines' own code is imported afresh by each run (see `engine_forks`).

Prefect's TLS contexts: each Prefect API client builds an `ssl` context that loads certifi's
whole CA bundle (~60 ms here), and a flow run makes about eight clients, four of them before
it is Running. Within Prefect's client module only, a verifying context for the same CA file
is made once per thread and shared by that thread's clients (the stack's worker does the
same: `prefect_worker`). Per thread, because httpcore sets the context's ALPN protocols on
each TLS connect, which must not race another thread's; Prefect's clients all use one
`http2` setting and add no client certificate (none of its settings makes httpx load one),
and a forked child gets its own copy.
"""

from __future__ import annotations

import os
import ssl
import sys
import threading
from types import ModuleType
from typing import Any

PRELOAD = (
    "prefect.engine", "prefect.flow_engine", "prefect.task_engine", "prefect._internal.metrics",
    "prefect.runner", "prefect.deployments.steps.core", "prefect.deployments.steps.pull",
    "prefect.deployments.steps.utility", "prefect.concurrency._asyncio",
    "prefect.concurrency._sync", "prefect.concurrency.services", "prefect.locking._filelock",
    "prefect.utilities.visualization", "prefect._internal.observers", "prefect._internal.states",
    "prefect._internal.installation", "prefect._internal.integrations",
    "prefect._internal.infrastructure_exit_codes", "prefect._internal._observation_delivery",
    "pydantic.v1", "anyio._backends._asyncio", "anyio.streams.memory", "anyio.streams.stapled",
    "anyio.streams.tls", "sqlite3", "encodings.idna", "stringprep", "rich._emoji_codes",
    "pydantic_settings", "redis.asyncio", "aiokafka", "orjson", "msgspec",
)
PREFECT_CLIENT_MODULE = "prefect.client.orchestration"


class SharedVerifyingContexts:
    """Stands in for the `ssl` module where it is installed: `create_default_context` for a
    server's certificate against a CA file answers one context per (file, its mtime, the
    calling thread); anything else is the `ssl` module's own."""

    def __init__(self) -> None:
        self._made: dict[tuple[str, int, int], ssl.SSLContext] = {}

    def create_default_context(self, purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH, *,
                               cafile: str | None = None, capath: str | None = None,
                               cadata: str | bytes | None = None) -> ssl.SSLContext:
        if purpose != ssl.Purpose.SERVER_AUTH or cafile is None or capath or cadata:
            return ssl.create_default_context(purpose, cafile=cafile, capath=capath,
                                              cadata=cadata)
        # A changed file: made anew. A thread's own: see the module's docstring.
        key = (os.path.abspath(cafile), os.stat(cafile).st_mtime_ns, threading.get_ident())
        made = self._made.get(key)
        if made is None:
            made = self._made[key] = ssl.create_default_context(purpose, cafile=cafile)
        return made

    def __getattr__(self, name: str) -> Any:
        return getattr(ssl, name)


def share_verifying_contexts(module: ModuleType) -> SharedVerifyingContexts:
    shared = SharedVerifyingContexts()
    module.ssl = shared  # type: ignore[attr-defined]
    return shared


def share_prefect_client_tls() -> SharedVerifyingContexts | None:
    """Installs the sharing in Prefect's client module if it is imported and still uses the
    `ssl` module as this expects; None if not (then nothing changes)."""
    client_module = sys.modules.get(PREFECT_CLIENT_MODULE)
    if client_module is None or getattr(client_module, "ssl", None) is not ssl:
        return None
    return share_verifying_contexts(client_module)


def prepare() -> None:
    """Once, in the server, after the preloads; its children inherit the result."""
    shared = share_prefect_client_tls()
    if shared is not None:
        import certifi

        shared.create_default_context(cafile=certifi.where())  # made before any fork
