"""The shapes of the API's answers, as pydantic models: the OpenAPI document's response schemas
are generated from them (`service.openapi`), and the tests validate real answers against that
document, so a shape is written down once. Requests are validated with `core.models`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.models import BatchStateName, OutcomeName, PipelineSpec, StepStateName
from service.step_routes import StepList


class ErrorBody(BaseModel):
    code: str = Field(examples=["not_found"], description="stable, machine-readable")
    message: str = Field(description="for people; may change")
    request_id: str = Field(description="also in the X-Request-Id header; quote it in reports")
    details: dict[str, Any] | None = Field(
        default=None, description="what was wrong, when known (e.g. pydantic's problems)")


class Error(BaseModel):
    """Every error answer: 4xx and 5xx, from handlers, routing and the HTTP parser alike."""

    error: ErrorBody


class Step(BaseModel):
    state: StepStateName
    offsets: dict[str, Annotated[int, Field(ge=0)]] = Field(
        description="partition name -> records processed; only grows")


class BatchState(BaseModel):
    state: BatchStateName
    steps: dict[str, Step] = Field(description="step name -> its state, in pipeline order")


class Batch(BaseModel):
    """The batch object of the contract, plus fields beside it that clients may ignore."""

    id: str = Field(examples=["batch-01jd3x5y6z7a8b9c0d1e2f3g4h"])
    name: str = Field(description="the pipeline's name")
    deployment: str = Field(examples=["run-pipeline/sales-pipeline"])
    state: BatchState
    pipeline_id: str
    pipeline_version: str
    created_at: datetime
    updated_at: datetime
    outcome: OutcomeName | None = Field(description="why a stopped batch stopped")
    reason: str | None
    flow_run_id: str | None
    config: dict[str, dict[str, Any]] | None = Field(
        default=None, description="the effective config of each step for this batch: the "
                                  "registered one with the run's overrides (absent on batches "
                                  "created before run-time config)")
    resumed_from: str | None = Field(
        default=None, description="the batch this one resumes (absent unless resumed)")


class BatchPage(BaseModel):
    items: dict[str, Batch] = Field(description="batch id -> batch, newest first")
    token: str | None = Field(description="the next page's token; null on the last page")


class RunAccepted(BaseModel):
    item: str = Field(description="the new batch id (or the earlier one, for a repeated "
                                  "Idempotency-Key)")


class Message(BaseModel):
    message: str


class PipelineVersion(PipelineSpec):
    model_config = ConfigDict(extra="forbid", frozen=True, title="PipelineVersion")

    latest: bool


class Pipeline(BaseModel):
    id: str
    name: str = Field(description="the latest version's name")
    deployment: str = Field(examples=["run-pipeline/sales-pipeline"])
    latest: str = Field(description="the latest version")
    versions: list[PipelineVersion] = Field(description="in registration order")
    created: bool | None = Field(default=None, description="PUT only: whether this call added "
                                                            "the version")


class PipelineList(BaseModel):
    items: dict[str, Pipeline]


class Health(BaseModel):
    status: Literal["ok"]


class ReadyChecks(BaseModel):
    redis: bool = Field(description="Redis takes a write")
    kafka: bool = Field(description="the commands topic can be written")
    topics: dict[str, bool | None] = Field(
        description="each topic the API writes -> it exists with a leader for every partition "
                    "(the commands topic's leaders also answer a connection; null: Kafka known "
                    "unreachable, not probed). Only the commands topic decides readiness: the "
                    "others fail every instance alike")


class Ready(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: ReadyChecks


class WebhookAccepted(BaseModel):
    accepted: int = Field(ge=0, description="events forwarded")


class MessageSchemaRef(BaseModel):
    title: str
    url: str = Field(examples=["/api/v1/schemas/command.run"])


class MessageSchemaList(BaseModel):
    items: dict[str, MessageSchemaRef] = Field(
        description="name -> where its JSON Schema is; `commands` and `events` cover every kind")


RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    Error, Batch, BatchPage, RunAccepted, Message, Pipeline, PipelineList, Health, Ready,
    WebhookAccepted, MessageSchemaList, StepList,
)
