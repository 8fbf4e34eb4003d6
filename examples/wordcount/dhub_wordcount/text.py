"""The generated text and where a batch's files live: <data_root>/<batch_id>/wordcount/."""

from __future__ import annotations

import os
import random
import shutil
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


# The durable-write helpers below are the example's own, as a plugin's would be: it uses
# only the step SDK's API, so it loads in cores that predate any helper offered there (the
# sales pipeline has the same few lines in pipelines/sales/files.py).


def make_dirs(directory: Path) -> None:
    """`directory` and its missing parents, each new one's name durable: a file's fsync
    keeps its data, not its name (the directory holding it keeps that)."""
    missing: list[Path] = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        sync_path(new.parent)


def sync_path(path: Path) -> None:
    """fsync of a file (its data) or a directory (its names: new files, renames)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, body: bytes) -> None:
    """Readers see the old file or the whole new one, never a part; durable when this
    returns, its name too (the steps report an offset right after: the SDK's offset rule)."""
    make_dirs(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as out:
        out.write(body)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    # Without it a power loss may take the new name away under the offset reported over it.
    sync_path(path.parent)


def keep_lines(path: Path, lines: int) -> None:
    """Cuts `path` after its first `lines` lines: what a resumed step goes on from (a step
    may have written past the offset it last reported)."""
    body = path.read_bytes()
    end = 0
    for _ in range(lines):
        end = body.find(b"\n", end) + 1
        if end == 0:
            raise StepFailed(f"{path.name} holds fewer than the {lines} lines reported")
    with path.open("r+b") as f:
        f.truncate(end)


@dataclass(frozen=True, slots=True)
class Layout:
    root: Path

    @classmethod
    def of(cls, ctx: StepContext) -> Layout:
        """The batch's files; a resumed batch's first step starts them as a copy of the files
        of the batch it resumes (the steps then go on from their start offsets)."""
        try:
            layout = cls(batch_dir(ctx.settings.data_root, ctx.batch_id) / "wordcount")
            old = (batch_dir(ctx.settings.data_root, ctx.resumed_from) / "wordcount"
                   if ctx.resumed_from is not None else None)
        except ValueError as exc:
            raise StepFailed(str(exc)) from None
        if old is not None and not layout.root.exists():
            if old.is_dir():
                # Copied aside, then renamed: a copy cut short is never taken for the files.
                shutil.rmtree(layout.staging, ignore_errors=True)
                make_dirs(layout.staging.parent)
                shutil.copytree(old, layout.staging)
                _sync_tree(layout.staging)  # on disk before it is taken for the files
                os.replace(layout.staging, layout.root)
                sync_path(layout.root.parent)  # the rename too, before any offset over it
            elif any(ctx.start_offsets.values()):
                raise StepFailed(f"{ctx.step}: the files of {ctx.resumed_from}, which this batch "
                                 "resumes, are gone")
        return layout

    @property
    def staging(self) -> Path:
        """Where a resumed batch's copy is made (removed with the batch's files)."""
        return self.root.with_name(".wordcount.copy")

    def text(self, partition: str) -> Path:
        return self.root / "text" / f"{partition}.txt"

    def chunks(self, partition: str) -> Path:
        """counts/<partition>/<first line>-<end line>.json, one file per chunk."""
        return self.root / "counts" / partition

    @property
    def result(self) -> Path:
        return self.root / "result.json"


def _sync_tree(root: Path) -> None:
    """fsync of every file and directory under `root`, and of `root` itself."""
    # Files before their directories, `root` last.
    for path in [*sorted(root.rglob("*"), reverse=True), root]:
        sync_path(path)
