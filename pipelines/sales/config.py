"""The sales pipeline's step config, and where a batch's files live."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.sdk import StepContext, StepFailed


class SalesConfig(BaseModel):
    """Every step of the pipeline gets the same keys; each step uses the ones it needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: int = Field(default=20_000, ge=0, le=10_000_000)
    partitions: int = Field(default=4, ge=1, le=256)
    seed: int = 42
    # Records per second per step; None runs at full speed. For demos and stop tests.
    throttle: float | None = Field(default=None, gt=0)
    # The name of a step that fails on purpose half way through its records.
    fail_at: str | None = None
    # Share of generated records made invalid on purpose, to exercise validation.
    invalid_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    # Base directory of batch data (each batch gets `<data_dir>/<batch_id>`); default
    # `<state_dir>/data`. The SQLite file defaults to `sales.db` in the batch's directory.
    data_dir: Path | None = None
    db_path: Path | None = None

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> SalesConfig:
        try:
            return cls.model_validate(dict(config))
        except ValidationError as exc:
            raise StepFailed(f"invalid sales step config: {exc}") from None


@dataclass(frozen=True, slots=True)
class Layout:
    """The files of one batch: source partitions, staged records, partial aggregates, db."""

    root: Path
    db: Path

    @property
    def source(self) -> Path:
        return self.root / "source"

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    @property
    def rejects(self) -> Path:
        return self.root / "rejects"

    @property
    def partials(self) -> Path:
        return self.root / "partials"

    @classmethod
    def of(cls, ctx: StepContext, config: SalesConfig) -> Layout:
        # One directory per batch, so concurrent batches never share staging files.
        base = config.data_dir or ctx.settings.state_dir / "data"
        root = base / ctx.batch_id
        return cls(root=root, db=config.db_path or root / "sales.db")


def partition_name(index: int) -> str:
    return f"partition_{index}"
