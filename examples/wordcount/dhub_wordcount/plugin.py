"""The declarations of the word-count steps (entry points `dhub.steps` in this package's
pyproject.toml). dhub's API imports this module to list the steps and check their config, so
it imports pydantic and dhub's declaration type only; the steps are in `steps.py`.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Final

from pydantic import ConfigDict, Field, model_validator
from pydantic.config import JsonDict

from core.step_catalogue import NoPaths, StepDeclaration, batch_dir

# Sizes a request may ask for, bounded so one batch cannot hold a worker for long: at most
# 16 x 100k lines of 20 words (32M words: under two minutes a step here), and a throttled step
# at most MAX_THROTTLED_S.
MAX_THROTTLED_S: Final = 300.0


# `core.step_catalogue.SHAPES_DATA`, spelt out: this plugin still loads in a core from
# before the mark (there, only the mark is missing from its schema).
_SHAPES: Final[JsonDict] = {"shapes_data": True}


class WordCountConfig(NoPaths):
    """The config of every `wordcount.*` step: each uses the keys it needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The text itself comes from these: a resume may not change them.
    partitions: int = Field(default=4, ge=1, le=16, description="text files, one per partition",
                            json_schema_extra=_SHAPES)
    lines: int = Field(default=10_000, ge=1, le=100_000, description="lines per partition",
                       json_schema_extra=_SHAPES)
    words_per_line: int = Field(default=8, ge=1, le=20, json_schema_extra=_SHAPES)
    seed: int = Field(default=7, description="same seed, same text", json_schema_extra=_SHAPES)
    throttle: float | None = Field(
        default=None, gt=0,
        description=f"lines per second per step (None: full speed); partitions*lines/throttle "
                    f"at most {MAX_THROTTLED_S:.0f} s")
    fail_at: str | None = Field(
        default=None, description="the name of a step that fails on purpose half way (to try "
                                  "resume: POST .../resume with this set to null)")

    @model_validator(mode="after")
    def _bounded_time(self) -> WordCountConfig:
        if self.throttle is not None and self.partitions * self.lines / self.throttle > MAX_THROTTLED_S:
            raise ValueError(f"partitions*lines/throttle: a throttled step may take at most "
                             f"{MAX_THROTTLED_S:.0f} s (raise throttle or lower lines)")
        return self


def remove_batch(data_root: Path, batch_id: str) -> None:
    """A deleted batch's word-count files; its directory too once nothing else is in it."""
    root = batch_dir(data_root, batch_id)
    for path in (root / "wordcount", root / ".wordcount.copy"):  # text.Layout's
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            if path.exists():
                raise
    # Another plugin's steps of the same batch may keep files there: theirs to remove.
    with contextlib.suppress(FileNotFoundError, OSError):
        root.rmdir()


def _declare(step: str, doc: str) -> StepDeclaration:
    return StepDeclaration(name=f"wordcount.{step}", doc=doc, config=WordCountConfig,
                           run=f"dhub_wordcount.steps:{step}",
                           cleanup="dhub_wordcount.plugin:remove_batch")


GENERATE: Final = _declare("generate", "Writes seeded random text, one file per partition "
                                       "(offsets: lines written).")
COUNT: Final = _declare("count", "Counts the words of each partition in chunks of lines, each "
                                 "chunk's counts saved before its offset is reported.")
MERGE: Final = _declare("merge", "Sums every partition's chunk counts into result.json "
                                 "(offsets: lines covered).")
