"""The generated text and where a batch's files live: <data_root>/<batch_id>/wordcount/."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from core.step_catalogue import batch_dir
from pipelines.sdk import StepContext, StepFailed

# A small vocabulary with Zipf-like weights: counts differ enough to rank.
VOCABULARY: Final = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "they", "you", "were", "her", "she", "there", "been", "one", "all", "we", "their", "has",
    "data", "batch", "offset", "partition", "step",
)
WEIGHTS: Final = [1 / (rank + 1) for rank in range(len(VOCABULARY))]
# Lines per chunk: the count step saves each chunk's counts before reporting its offset.
CHUNK: Final = 1_000


def partition_name(index: int) -> str:
    return f"part-{index}"


def lines_of(seed: int, index: int, lines: int, words_per_line: int) -> Iterator[bytes]:
    """The text of one partition: the same seed and index give the same lines."""
    rng = random.Random(f"{seed}:{index}")
    for _ in range(lines):
        yield " ".join(rng.choices(VOCABULARY, WEIGHTS, k=words_per_line)).encode() + b"\n"


def write_atomically(path: Path, body: bytes) -> None:
    """Readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(body)
    os.replace(tmp, path)


@dataclass(frozen=True, slots=True)
class Layout:
    root: Path

    @classmethod
    def of(cls, ctx: StepContext) -> Layout:
        try:
            return cls(batch_dir(ctx.settings.data_root, ctx.batch_id) / "wordcount")
        except ValueError as exc:
            raise StepFailed(str(exc)) from None

    def text(self, partition: str) -> Path:
        return self.root / "text" / f"{partition}.txt"

    def chunks(self, partition: str) -> Path:
        """counts/<partition>/<first line>-<end line>.json, one file per chunk."""
        return self.root / "counts" / partition

    @property
    def result(self) -> Path:
        return self.root / "result.json"
