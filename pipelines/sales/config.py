"""The sales pipeline's step config, and where a batch's files live.

Where is a server-side setting (DHUB_DATA_DIR, default <state_dir>/data; each batch under
<data_dir>/<batch_id>, its SQLite file `sales.db` there): a step config comes from an API
client, and no value a client sends may choose a path on a worker's disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.models import valid_id
from pipelines.sdk import StepContext, StepFailed

PATH_KEYS: Final = frozenset({"data_dir", "db_path"})


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

    @model_validator(mode="before")
    @classmethod
    def _no_paths(cls, data: Any) -> Any:
        # Named apart from other unknown keys: these were accepted once, and a client still
        # sending one should learn why it is refused now.
        if isinstance(data, Mapping):
            named = sorted(PATH_KEYS & set(data))
            if named:
                raise ValueError(
                    f"{', '.join(named)} may not be set in a step config: data locations are "
                    "server settings (DHUB_DATA_DIR; each batch writes under "
                    "<data_dir>/<batch_id>)")
        return data

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
    def of(cls, ctx: StepContext) -> Layout:
        # One directory per batch, so concurrent batches never share staging files. Batch
        # ids are [A-Za-z0-9._-]; "." and ".." would name the data directory or its parent.
        if not valid_id(ctx.batch_id) or ctx.batch_id in (".", ".."):
            raise StepFailed(f"batch id {ctx.batch_id!r} cannot name a data directory")
        root = ctx.settings.data_root / ctx.batch_id
        return cls(root=root, db=root / "sales.db")


def partition_name(index: int) -> str:
    return f"partition_{index}"
