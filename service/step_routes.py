"""`GET /api/v1/steps`: the step implementations a pipeline's `uses` may name, with the JSON
Schema of each one's `config` and its one-line doc. Read from the plugins' declarations
(`core.step_catalogue`): no step code, SDK or Prefect is imported to answer."""

from __future__ import annotations

import functools
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field

from core.step_catalogue import declarations, published_schema


class StepImplementation(BaseModel):
    uses: str = Field(examples=["sales.extract"], description="the name a step's `uses` gives")
    doc: str = Field(description="one line: what the step does")
    config_schema: dict[str, Any] = Field(
        description="JSON Schema of the step's `config`, checked at registration and at run")


class StepList(BaseModel):
    """The installed step implementations (entry-point group `dhub.steps`), by name."""

    items: dict[str, StepImplementation] = Field(
        description="`uses` -> the implementation, sorted by name (as other lists, keyed by id)")


@functools.cache
def _body() -> bytes:
    # Plugins are read once per process (core.step_catalogue), so the answer is fixed too.
    steps = StepList(items={
        name: StepImplementation(uses=name, doc=declared.doc.strip(),
                                 config_schema=published_schema(declared.config))
        for name, declared in declarations().items()})
    return steps.model_dump_json().encode()


async def list_steps(request: web.Request) -> web.Response:
    return web.Response(body=_body(), content_type="application/json")
