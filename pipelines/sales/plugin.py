"""The sales steps' declarations (entry points `dhub.steps` in pyproject.toml): their config
model and where their code is. The API imports this module, so it imports pydantic and
`core` only; the steps themselves are `pipelines.sales.steps`, imported by the worker.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Final

from pydantic import ConfigDict, Field, model_validator
from pydantic.config import JsonDict

from core.step_catalogue import NoPaths, StepDeclaration, batch_dir

# A throttled step runs rows/throttle seconds: bounded so one request cannot hold a worker
# for hours (10M rows at 0.001 records/s would never end).
MAX_THROTTLED_S: Final = 600.0


# `core.step_catalogue.SHAPES_DATA`, spelt out: a process that loaded an older core before
# this module still loads it. The records themselves come from these keys (extract makes
# them; the later steps work on what it made); fail_at and throttle change how a step runs.
_SHAPES: Final[JsonDict] = {"shapes_data": True}


class SalesConfig(NoPaths):
    """The config of every `sales.*` step: each step uses the keys it needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: int = Field(default=20_000, ge=0, le=10_000_000, description="records generated",
                      json_schema_extra=_SHAPES)
    partitions: int = Field(default=4, ge=1, le=256, json_schema_extra=_SHAPES,
                            description="source files, one per partition")
    seed: int = Field(default=42, json_schema_extra=_SHAPES,
                      description="the generator's seed: same seed, same records")
    throttle: float | None = Field(
        default=None, gt=0,
        description=f"records per second per step (None: full speed); rows/throttle at most "
                    f"{MAX_THROTTLED_S:.0f} s")
    fail_at: str | None = Field(
        default=None, description="the name of a step that fails on purpose half way")
    invalid_rate: float = Field(default=0.0, ge=0.0, le=1.0, json_schema_extra=_SHAPES,
                                description="share of generated records made invalid on purpose")

    @model_validator(mode="after")
    def _bounded_time(self) -> SalesConfig:
        if self.throttle is not None and self.rows / self.throttle > MAX_THROTTLED_S:
            raise ValueError(
                f"rows/throttle = {self.rows / self.throttle:.0f} s: a throttled step may take "
                f"at most {MAX_THROTTLED_S:.0f} s (raise throttle or lower rows)")
        return self


def remove_batch(data_root: Path, batch_id: str) -> None:
    """A deleted batch's files: its directory (sources, staging, partials, sales.db)."""
    path = batch_dir(data_root, batch_id)
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        # Already gone (a repeated delete) is done; anything else fails the pass, retried.
        if path.exists():
            raise


def _declare(step: str, doc: str) -> StepDeclaration:
    return StepDeclaration(name=f"sales.{step}", doc=doc, config=SalesConfig,
                           run=f"pipelines.sales.steps:{step}",
                           cleanup="pipelines.sales.plugin:remove_batch")


EXTRACT: Final = _declare("extract", "Generates (once) and validates sales records per partition "
                                     "into staging; invalid ones go to rejects.")
TRANSFORM: Final = _declare("transform", "Sums revenue, orders and units per (region, day) "
                                         "of each partition.")
LOAD: Final = _declare("load", "Loads the partitions' sums into the batch's SQLite table "
                               "daily_revenue, replacing earlier rows.")
