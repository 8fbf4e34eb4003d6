"""The three word-count steps; offsets are lines per partition.

    generate  text/<partition>.txt: `lines` seeded random lines of `words_per_line` words
    count     counts/<partition>/<start>-<end>.json: the word counts of each chunk of lines,
              saved (atomically) before the chunk's end is reported as the offset; each
              run of the step notes the lines it counted in count-runs.jsonl
    merge     result.json: every chunk's counts summed, after checking the chunks of each
              partition cover its lines exactly once

A resumed batch (`POST .../resume`) starts from a copy of the files of the batch it resumes and
each step goes on from its start offsets (`ctx.start_offset`), or from further on where its
files already hold more (written before reported, or reported after the flow was planned).
Steps are sync (the SDK runs them in a thread), so plain file I/O and sleeps are fine.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import ExitStack
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from pydantic import ValidationError

from dhub_wordcount.plugin import WordCountConfig
from dhub_wordcount.text import (
    CHUNK,
    Layout,
    keep_lines,
    lines_of,
    make_dirs,
    partition_name,
    sync_path,
    write_atomically,
)
from pipelines.sdk import StepContext, StepFailed


def _config(config: Mapping[str, Any]) -> WordCountConfig:
    try:
        return WordCountConfig.model_validate(dict(config))
    except ValidationError as exc:  # the API refuses these; a hand-made run may not have
        raise StepFailed(f"invalid wordcount config: {exc}") from None


class Pace:
    """Sleeps so that the lines done so far take at least lines/throttle seconds."""

    def __init__(self, throttle: float | None) -> None:
        self._throttle = throttle
        self._done = 0
        self._started = time.monotonic()

    def advance(self, lines: int) -> None:
        self._done += lines
        if self._throttle:
            ahead = self._done / self._throttle - (time.monotonic() - self._started)
            if ahead > 0:
                time.sleep(ahead)


def _line_count(path: Path, step: str) -> int:
    if not path.exists():
        raise StepFailed(f"{step}: {path.name} missing; did the generate step run?")
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _whole_lines(path: Path) -> int:
    """The complete lines `path` holds (0 when it is not there)."""
    return _line_count(path, "generate") if path.exists() else 0


def _bounds(chunk: Path) -> tuple[int, int]:
    first, end = chunk.stem.split("-")
    return int(first), int(end)


def _go_on_from(chunks: Path, start: int) -> int:
    """Where count goes on with a partition: after the saved chunks that cover its lines
    from the first without a gap, when they reach its start offset (a chunk is saved before
    its end is reported; the start offsets are the batch's record when the flow was planned,
    which may not show yet what an earlier attempt of the batch reported); else its start
    offset. Chunks past that line are removed: counted again."""
    covered, chain = 0, set()
    for chunk in sorted(chunks.glob("*.json"), key=_bounds):
        first, end = _bounds(chunk)
        if first == covered:
            covered = end
            chain.add(chunk)
    go_on = covered if covered >= start else start
    for chunk in chunks.glob("*.json"):
        if _bounds(chunk)[1] > go_on or (covered >= start and chunk not in chain):
            chunk.unlink()
    return go_on


def _fail_half_way(config: WordCountConfig, ctx: StepContext, done: Mapping[str, int],
                   totals: Mapping[str, int]) -> None:
    """`fail_at`: this step fails once half its lines are done (after reporting them)."""
    if config.fail_at == ctx.step and sum(done.values()) >= sum(totals.values()) // 2:
        raise StepFailed(f"{ctx.step} failed on purpose (fail_at) at {dict(done)}")


def generate(ctx: StepContext) -> None:
    config, layout = _config(ctx.config), Layout.of(ctx)
    names = [partition_name(i) for i in range(config.partitions)]
    totals = dict.fromkeys(names, config.lines)
    # A resumed batch goes on from its start offsets: the text is the seed's, so the lines
    # after them are the generator's lines after them. Lines a run of this batch wrote past
    # them are kept (`_whole_lines`): the start offsets are the batch's record when the flow
    # was planned, which may not show yet what an earlier attempt of it reported.
    written = {name: max(ctx.start_offset(name),
                         min(_whole_lines(layout.text(name)), config.lines))
               for name in names}
    streams = {name: islice(lines_of(config.seed, i, config.lines, config.words_per_line),
                            written[name], None)
               for i, name in enumerate(names)}
    pace = Pace(config.throttle)
    with ExitStack() as files:
        out: dict[str, BinaryIO] = {}
        for name in names:
            path = layout.text(name)
            make_dirs(path.parent)
            if written[name]:
                keep_lines(path, written[name])
            out[name] = files.enter_context(path.open("ab" if written[name] else "wb"))
            # The lines kept, and the file's name, durable before they are reported.
            os.fsync(out[name].fileno())
            sync_path(path.parent)
            ctx.report(name, written[name], config.lines)
        # A chunk of each partition in turn, so every partition's offset grows together.
        while any(n < config.lines for n in written.values()):
            for name in names:
                chunk = list(islice(streams[name], CHUNK))
                if not chunk:
                    continue
                out[name].write(b"".join(chunk))
                # On disk before the offset says so (the SDK's offset rule): flushed only to
                # the OS, a power loss would leave the batch showing lines that are gone.
                out[name].flush()
                os.fsync(out[name].fileno())
                written[name] += len(chunk)
                ctx.report(name, written[name], config.lines)
                pace.advance(len(chunk))
                _fail_half_way(config, ctx, written, totals)


def count(ctx: StepContext) -> None:
    config, layout = _config(ctx.config), Layout.of(ctx)
    names = [partition_name(i) for i in range(config.partitions)]
    totals = {name: _line_count(layout.text(name), ctx.step) for name in names}
    start = {name: _go_on_from(layout.chunks(name), ctx.start_offset(name)) for name in names}
    done = dict(start)
    pace = Pace(config.throttle)
    try:
        with ExitStack() as files:
            text: dict[str, BinaryIO] = {}
            for name in names:
                text[name] = files.enter_context(layout.text(name).open("rb"))
                for _ in islice(text[name], start[name]):
                    pass
                ctx.report(name, start[name], totals[name])
            while any(done[n] < totals[n] for n in names):
                for name in names:
                    lines = list(islice(text[name], CHUNK))
                    if not lines:
                        continue
                    words = Counter(word.decode() for line in lines for word in line.split())
                    first, end = done[name], done[name] + len(lines)
                    write_atomically(layout.chunks(name) / f"{first:09d}-{end:09d}.json",
                                     orjson.dumps(words))
                    done[name] = end
                    ctx.report(name, end, totals[name])
                    pace.advance(len(lines))
                    _fail_half_way(config, ctx, done, totals)
    finally:
        # The lines this run counted, as the step saw them (a resumed batch adds its own).
        with (layout.root / "count-runs.jsonl").open("ab") as log:
            log.write(orjson.dumps({"batch": ctx.batch_id, "start": start,
                                    "counted": {n: done[n] - start[n] for n in names}}) + b"\n")


def merge(ctx: StepContext) -> None:
    config, layout = _config(ctx.config), Layout.of(ctx)
    names = [partition_name(i) for i in range(config.partitions)]
    totals = {name: _line_count(layout.text(name), ctx.step) for name in names}
    words: Counter[str] = Counter()
    for name in names:
        covered = 0
        for path in sorted(layout.chunks(name).glob("*.json")):
            start, end = (int(n) for n in path.stem.split("-"))
            if start != covered:
                raise StepFailed(f"{ctx.step}: {name} has a gap or overlap at line {covered}")
            words.update(orjson.loads(path.read_bytes()))
            covered = end
        if covered != totals[name]:
            raise StepFailed(f"{ctx.step}: {name} counted {covered} of {totals[name]} lines; "
                             "did the count step run?")
    result = {"lines": sum(totals.values()), "words": sum(words.values()),
              "partitions": totals, "counts": dict(words.most_common())}
    write_atomically(layout.result, orjson.dumps(result))
    # Reported once result.json holds them: an offset never runs ahead of what is written.
    for name in names:
        ctx.report(name, totals[name], totals[name])
