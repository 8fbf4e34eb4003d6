"""`sales-pipeline`: the demo pipeline that moves real records through three steps."""

from __future__ import annotations

from typing import Any, Final

from core.models import PipelineSpec, StepSpec

PIPELINE_ID: Final = "pipeline-sales"
PIPELINE_NAME: Final = "sales-pipeline"
STEPS: Final = ("extract", "transform", "load")


def demo_spec(*, name: str = PIPELINE_NAME, version: str = "1", **config: Any) -> PipelineSpec:
    """The demo definition; `config` (rows, partitions, throttle, fail_at, seed, ...) is
    given to every step, so one call makes a small, slow or failing variant for tests."""
    # Throttled so a watcher sees the offsets grow: ~4 s a step, about 15 s a batch.
    defaults: dict[str, Any] = {"rows": 20_000, "partitions": 4, "seed": 42, "throttle": 5_000}
    defaults.update(config)
    return PipelineSpec(
        name=name,
        version=version,
        steps=[StepSpec(name=step, uses=f"sales.{step}", config=defaults) for step in STEPS],
    )
