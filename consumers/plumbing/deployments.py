"""The Prefect deployment of each pipeline version, ensured once per process.

`pipelines.prefect_deployment.ensure_deployment(spec, settings) -> UUID` creates or updates
deployment `run-pipeline/<spec.name>`; an `EnsureFn` may be a coroutine function or a plain
one (then it runs in a thread, since Prefect's sync APIs must not run on this loop). Its id is cached per
(pipeline, version) and forgotten when Prefect says the deployment is gone.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

from core.models import PipelineSpec
from core.settings import Settings

EnsureFn = Callable[[PipelineSpec, Settings], "Awaitable[UUID] | UUID"]


def default_ensure() -> EnsureFn:
    # Imported when the commands part starts, not with this module: it pulls in Prefect's
    # deployment API and the flow, which the other parts of the process never need.
    from pipelines.prefect_deployment import ensure_deployment

    return ensure_deployment


class Deployments:
    def __init__(self, settings: Settings, ensure: EnsureFn) -> None:
        self._settings = settings
        self._ensure = ensure
        self._ids: dict[tuple[str, str], UUID] = {}

    async def id_for(self, pipeline_id: str, spec: PipelineSpec) -> UUID:
        key = (pipeline_id, spec.version)
        cached = self._ids.get(key)
        if cached is not None:
            return cached
        result: Any
        if inspect.iscoroutinefunction(self._ensure):
            result = await self._ensure(spec, self._settings)
        else:
            result = await asyncio.to_thread(self._ensure, spec, self._settings)
            if inspect.isawaitable(result):
                result = await result
        deployment_id = result if isinstance(result, UUID) else UUID(str(result))
        self._ids[key] = deployment_id
        return deployment_id

    def forget(self, pipeline_id: str, version: str) -> None:
        self._ids.pop((pipeline_id, version), None)
