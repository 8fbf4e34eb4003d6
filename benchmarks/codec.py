"""Decode speed of the events consumer's hot path: msgspec tagged structs (what
`core.codec` uses) against an equivalent pydantic discriminated union.

    python -m benchmarks.codec [--records 200000] [--repeat 3]

The records look like a busy events topic: mostly `step.offsets` (four partitions), some
`step.state`, a few `batch.state`, over 50 batches. Each contender decodes and validates
every record into its typed class; the best of `--repeat` rounds is reported.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter

from core.codec import decode_event
from core.messages import MAX_REASON, MAX_TEXT
from core.models import ID_PATTERN, MAX_OFFSET

# -- the pydantic contender: the same rules as core.codec -----------------------------------
# ID_PATTERN with pydantic's default (Rust) regex engine, where `$` is the true end.
PId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]


class _PEvent(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    schema_: Literal[1] = Field(alias="schema")
    event_id: PId
    batch_id: PId
    pipeline_id: PId
    ts: float


class PBatchState(_PEvent):
    type: Literal["batch.state"]
    state: Literal["pending", "scheduled", "running", "stop"]
    outcome: Literal["completed", "failed", "cancelled", "crashed"] | None = None
    reason: Annotated[str, StringConstraints(max_length=MAX_REASON)] | None = None
    flow_run_id: Annotated[str, StringConstraints(max_length=MAX_TEXT)] | None = None


class PStepState(_PEvent):
    type: Literal["step.state"]
    step: PId
    state: Literal["none", "pending", "running", "success", "failed"]


class PStepOffsets(_PEvent):
    type: Literal["step.offsets"]
    step: PId
    offsets: Annotated[dict[PId, Annotated[int, Field(ge=0, le=MAX_OFFSET)]],
                       Field(min_length=1)]


PYDANTIC_EVENTS: TypeAdapter[PBatchState | PStepState | PStepOffsets] = TypeAdapter(
    Annotated[PBatchState | PStepState | PStepOffsets, Field(discriminator="type")])


def pydantic_decode(raw: bytes) -> Any:
    return PYDANTIC_EVENTS.validate_json(raw)


# -- the workload ---------------------------------------------------------------------------


def records(n: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    batches = [f"batch-01jd{rng.getrandbits(100):025x}"[:32] for _ in range(50)]
    out = []
    for i in range(n):
        base: dict[str, Any] = {"schema": 1, "event_id": f"{rng.getrandbits(128):032x}",
                                "batch_id": rng.choice(batches), "pipeline_id": "pipeline-sales",
                                "ts": 1.7e9 + i / 1000}
        roll = rng.random()
        if roll < 0.9:
            base.update(type="step.offsets", step=rng.choice(("extract", "transform", "load")),
                        offsets={f"partition_{p}": i * 4 + p for p in range(4)})
        elif roll < 0.98:
            base.update(type="step.state", step="load", state="running")
        else:
            base.update(type="batch.state", state="running",
                        flow_run_id="0f8e2c1a-7b5e-4c7e-9a51-3d0f4c6b2a10")
        out.append(orjson.dumps(base))
    return out


def timed(decode: Callable[[bytes], Any], raws: list[bytes]) -> float:
    started = time.perf_counter()
    for raw in raws:
        decode(raw)
    return time.perf_counter() - started


def best_of(contenders: dict[str, Callable[[bytes], Any]], raws: list[bytes],
            repeat: int) -> dict[str, float]:
    """Rounds alternate between contenders, so a busy machine slows each alike."""
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(repeat):
        for name, decode in contenders.items():
            best[name] = min(best[name], timed(decode, raws))
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    raws = records(args.records)
    contenders: dict[str, Callable[[bytes], Any]] = {
        "msgspec tagged structs (core.codec)": decode_event,
        "pydantic discriminated union": pydantic_decode,
    }
    for decode in contenders.values():
        decode(raws[0])  # warm up, and fail here if a contender refuses the workload
    results = best_of(contenders, raws, args.repeat)
    print(f"decode + validate {len(raws):,} event records, best of {args.repeat}:")
    for name, seconds in results.items():
        print(f"  {name:38s} {seconds:7.3f} s  {len(raws) / seconds:12,.0f} records/s")
    fastest = min(results, key=results.__getitem__)
    slowest = max(results, key=results.__getitem__)
    print(f"fastest: {fastest} ({results[slowest] / results[fastest]:.1f}x)")


if __name__ == "__main__":
    main()
