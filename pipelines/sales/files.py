"""File helpers of the sales pipeline: atomic writes and JSONL partitions."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old file or the whole new one, never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def jsonl_lines(path: Path) -> Iterator[bytes]:
    """The non-empty lines of a JSONL file, streamed."""
    with path.open("rb") as src:
        for line in src:
            line = line.strip()
            if line:
                yield line


def count_lines(path: Path) -> int:
    return sum(1 for _ in jsonl_lines(path))
