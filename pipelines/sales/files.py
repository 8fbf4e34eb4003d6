"""File helpers of the sales pipeline: atomic writes, JSONL partitions, appends made durable
at checkpoints, and a resumed batch's files taken over from the batch it resumes."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from core.step_catalogue import batch_dir


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


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old file or the whole new one, never a half-written one; durable
    when this returns, its name too (a step reports what it covers right after)."""
    make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    # Without it a power loss may bring the old file back (or none) under offsets the step
    # reported over the new one.
    sync_path(path.parent)


def jsonl_lines(path: Path) -> Iterator[bytes]:
    """The non-empty lines of a JSONL file, streamed."""
    with path.open("rb") as src:
        for line in src:
            line = line.strip()
            if line:
                yield line


def count_lines(path: Path) -> int:
    return sum(1 for _ in jsonl_lines(path))


def append_from(path: Path, size: int) -> BinaryIO:
    """`path` opened to append after its first `size` bytes (what a checkpoint said was
    durable; anything after them was written but never reported, and is written again)."""
    make_dirs(path.parent)
    out = path.open("r+b" if size else "wb")
    out.truncate(size)
    out.seek(size)
    # Its name durable before any checkpoint covers what is appended (`sync` keeps the data).
    sync_path(path.parent)
    return out


def sync(out: BinaryIO) -> int:
    """Everything written to `out` made durable; returns its size."""
    out.flush()
    os.fsync(out.fileno())
    return out.tell()


# Files a resumed batch takes over from the batch it resumes: every one but the SQLite file,
# whose rows are keyed by the batch that loaded them (a resumed `load` writes its own).
_NOT_INHERITED = ("sales.db",)
INHERITED_MARK = ".inherited"
# Which batch's files a resumed batch is taking over, written before the first one: a copy
# cut short (the batch stopped mid-copy, a disk error) leaves it without INHERITED_MARK.
INHERITING_MARK = ".inheriting-from"


def inherited(new_root: Path) -> bool:
    """Whether `new_root` took its files over already (`inherit`)."""
    return (new_root / INHERITED_MARK).exists()


def inherit(old_root: Path, new_root: Path) -> None:
    """Makes `new_root` start with the files of `old_root` (once: a mark file says it is
    done). Files never changed after they are written (source partitions, anything replaced
    atomically) are hard links; files appended to in place are copies, so the resumed
    batch's writes never change the data of the batch it resumes (which may be resumed
    again)."""
    mark = new_root / INHERITED_MARK
    if mark.exists():
        return
    # A resume of a resume that stopped while taking its files over (the API names it as
    # the holder once one of its steps started): its copy is finished first, from the batch
    # it went on from, so this one does not go on from part of the files.
    source = old_root / INHERITING_MARK
    if not inherited(old_root) and source.exists():
        inherit(batch_dir(old_root.parent, source.read_text()), old_root)
    make_dirs(new_root)
    write_atomically(new_root / INHERITING_MARK, old_root.name.encode())
    touched: set[Path] = set()
    if old_root.is_dir():
        for src in sorted(old_root.rglob("*")):
            rel = src.relative_to(old_root)
            if not src.is_file() or rel.name.startswith((".", *_NOT_INHERITED)):
                continue
            dst = new_root / rel
            make_dirs(dst.parent)  # the batch's own directory's name too, in the data root
            dst.unlink(missing_ok=True)
            touched.add(dst.parent)
            if rel.parts[0] == "source" or rel.suffix == ".json":
                try:
                    os.link(src, dst)
                    continue
                except OSError:
                    pass  # another file system: a copy does as well
            shutil.copy2(src, dst)
            sync_path(dst)
    # The mark says the files were taken over: they (and the entries naming them) are on disk
    # first, or after a power loss a copy shorter than its offsets would be gone on from.
    for directory in sorted(touched):
        sync_path(directory)
    write_atomically(mark, b"")


def sync_path(path: Path) -> None:
    """fsync of a file or a directory (its entries) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
