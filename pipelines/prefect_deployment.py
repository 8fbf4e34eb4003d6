"""Creating or updating a pipeline's Prefect deployment `run-pipeline/<pipeline name>`.

The deployment points the worker at this repository's checkout: a pull step sets the flow
run's working directory to the repository root (no copy of the code is made) and the
entrypoint is the flow's file. Parameters are validated by the Prefect server against the
flow's signature, so a malformed run request fails at creation instead of in the worker.

Start latency: by default a process worker starts each flow run through a supervisor
process that prepares the workspace and then execs the engine: two Python interpreters
importing Prefect (about 1 s each here) before the run is `Running`. The job variables
below give the engine command and working directory directly, so the worker starts the
engine at once (measured here: Scheduled -> Running about 2 s instead of about 5 s), and
cancellation hooks run inside the worker instead of yet another process. The command is
`pipelines.engine_command`, which takes a fork of an engine already imported from the
stack's fork server, or becomes `python -m prefect.engine` when there is none.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any, Final
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY
from prefect.utilities.callables import parameter_schema
from prefect.workers.process import ProcessWorker

from core.models import FLOW_NAME, TAG_DHUB, PipelineSpec
from core.settings import ROOT, Settings
from pipelines.flow import run_pipeline

ENTRYPOINT: Final = "pipelines/flow.py:run_pipeline"
WORK_POOL_TYPE: Final = "process"


@asynccontextmanager
async def prefect_client(settings: Settings) -> AsyncIterator[PrefectClient]:
    """A client on `settings.prefect_api_url`, whatever PREFECT_API_URL or a surrounding
    flow run's context say (`get_client()` would follow those)."""
    client = PrefectClient(settings.prefect_api_url, auth_string=PREFECT_API_AUTH_STRING.value(),
                           api_key=PREFECT_API_KEY.value())
    async with client:
        yield client


def local_job_variables() -> dict[str, Any]:
    """For a `process` pool on this machine: this interpreter, in this checkout; the engine
    forked from one already imported when the engine fork server is up (`engine_command`)."""
    return {"command": shlex.join([sys.executable, "-m", "pipelines.engine_command"]),
            "working_dir": str(ROOT)}


def desired(spec: PipelineSpec, settings: Settings,
            job_variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The deployment's fields as this module sets them (and compares them)."""
    return {
        "work_pool_name": settings.work_pool,
        "path": str(ROOT),
        "entrypoint": ENTRYPOINT,
        "pull_steps": [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
        ],
        "parameter_openapi_schema": parameter_schema(run_pipeline.fn).model_dump(
            exclude_unset=True
        ),
        "enforce_parameter_schema": True,
        "tags": [TAG_DHUB],
        "description": f"dhub pipeline {spec.name}: run-pipeline over its registered steps",
        "paused": False,
        "job_variables": dict(local_job_variables() if job_variables is None else job_variables),
    }


async def _ensure_work_pool(client: PrefectClient, name: str) -> None:
    """Creates the process pool if missing, with the worker type's default job template."""
    try:
        await client.read_work_pool(name)
        return
    except ObjectNotFound:
        pass
    template = ProcessWorker.get_default_base_job_template()
    with suppress(ObjectAlreadyExists):  # created concurrently: as good
        await client.create_work_pool(
            WorkPoolCreate(name=name, type=WORK_POOL_TYPE, base_job_template=template)
        )


async def ensure_deployment(spec: PipelineSpec, settings: Settings, *,
                            job_variables: Mapping[str, Any] | None = None) -> UUID:
    """Creates or updates `run-pipeline/<spec.name>` on `settings.work_pool`; its id.

    `job_variables` default to `local_job_variables()` (a process pool on this host; pass
    `{}` for the pool's own defaults). Idempotent: an up-to-date deployment is only read.
    Prefect's create is an upsert on (flow, name), so concurrent callers converge.
    """
    want = desired(spec, settings, job_variables)
    async with prefect_client(settings) as client:
        try:
            current = await client.read_deployment_by_name(f"{FLOW_NAME}/{spec.name}")
        except ObjectNotFound:
            pass
        else:
            if all(getattr(current, field) == value for field, value in want.items()):
                return current.id
        await _ensure_work_pool(client, settings.work_pool)
        flow_id = await client.create_flow_from_name(FLOW_NAME)
        return await client.create_deployment(flow_id=flow_id, name=spec.name, **want)
