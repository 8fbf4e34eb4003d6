"""The sales pipeline's step config (its model is declared in `pipelines.sales.plugin`, which
the API reads to check it), and where a batch's files live.

Where is a server-side setting (DHUB_DATA_DIR, default <state_dir>/data; each batch under
<data_dir>/<batch_id>, its SQLite file `sales.db` there): a step config comes from an API
client, and no value a client sends may choose a path on a worker's disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.step_catalogue import batch_dir
from pipelines.sales.plugin import SalesConfig
from pipelines.sdk import StepContext, StepFailed

__all__ = ["Layout", "SalesConfig", "partition_name", "read_config"]


def read_config(config: Mapping[str, Any]) -> SalesConfig:
    """The step's config as its model; a config the API would have refused fails the step."""
    try:
        return SalesConfig.model_validate(dict(config))
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
        # One directory per batch, so concurrent batches never share staging files.
        try:
            root = batch_dir(ctx.settings.data_root, ctx.batch_id)
        except ValueError as exc:
            raise StepFailed(str(exc)) from None
        return cls(root=root, db=root / "sales.db")


def partition_name(index: int) -> str:
    return f"partition_{index}"
