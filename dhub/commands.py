"""The batch commands of `dhub`: run, watch, get, ls, stop, rm (the parser is `dhub.cli`).

Each takes the parsed arguments, a client and a rich console, prints its answer (JSON with
`--json`) and returns the exit code; `watch` and `run --watch` return the batch's outcome.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from dhub.client import DhubClient, run_again
from dhub.errors import DhubError
from dhub.models import EXIT_COMPLETED, EXIT_STOPPED, Batch, exit_code, is_final
from dhub.view import BatchView
from dhub.watch import WatchEvent

EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


class UsageError(Exception):
    """A mistake in the command's arguments the parser cannot see (exit 3, nothing sent)."""


def emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


# -- watching ------------------------------------------------------------------------------
def _watch(args: argparse.Namespace, api: DhubClient, console: Console, batch_id: str) -> int:
    seen: list[Batch] = []  # the last version handed out, for what Ctrl-C says
    try:
        return _follow(args, console, _recorded(api.watch(
            args.pipeline, batch_id, stream=not args.no_stream,
            reconnect_for=args.reconnect_for), seen))
    except KeyboardInterrupt:
        # Ctrl-C leaves the watch, not the batch. One already `stop` (Ctrl-C while the watch
        # waits out its settling, or a reconnect) is not said to run on.
        if seen and is_final(seen[-1]):
            outcome = seen[-1].get("outcome") or "stopped"
            sys.stderr.write(f"dhub: stopped watching; {batch_id} had stopped: {outcome}\n")
        else:
            sys.stderr.write(f"dhub: stopped watching; {batch_id} is not stopped "
                             f"(dhub stop {args.pipeline} {batch_id})\n")
        return EXIT_INTERRUPTED


def _recorded(events: Iterator[WatchEvent], seen: list[Batch]) -> Iterator[WatchEvent]:
    for event in events:
        if event.batch is not None:
            seen[:] = [event.batch]
        yield event


def _follow(args: argparse.Namespace, console: Console, events: Iterator[WatchEvent]) -> int:
    if args.json:
        return _watch_json(args, events)
    view = BatchView(args.pipeline, verbose=args.verbose > 0)
    last: WatchEvent | None = None
    if not console.is_terminal:
        # Piped (a CI log): one line per change of the batch's or a step's state, then the view.
        said: str | None = None
        for event in events:
            line = _state_line(event)
            if line != said:
                console.print(line, highlight=False, soft_wrap=True)
                said = line
            view.update(event.batch)
            last = event
        console.print(view)
        return _final(console, last)
    with Live(view, console=console, refresh_per_second=8, transient=False):
        for event in events:
            # Any other event (`connected` first) says the link is back: the note goes.
            note = f"reconnecting: {event.error}" if event.kind == "reconnecting" else None
            view.update(event.batch, note)
            last = event
    return _final(console, last)


def _state_line(event: WatchEvent) -> str:
    if event.kind == "reconnecting":
        return f"reconnecting: {event.error}"
    if event.kind == "connected":
        return "reconnected"
    if event.batch is None:
        return event.kind
    state = event.batch["state"]
    steps = " ".join(f"{name}={step['state']}" for name, step in state["steps"].items())
    return f"{event.batch['id']} {state['state']} {steps}"


def _watch_json(args: argparse.Namespace, events: Any) -> int:
    code = EXIT_STOPPED
    for event in events:
        line: dict[str, Any] = {"event": event.kind, "via": event.via, "etag": event.etag,
                                "batch": event.batch}
        if event.kind == "reconnecting":
            line = {"event": event.kind, "via": event.via, "error": event.error}
        elif event.kind == "connected":
            line = {"event": event.kind, "via": event.via}
        elif event.kind in ("end", "deleted"):
            # As `_final`: a version not `stop` has no outcome to exit with (`or 0` said
            # completed for it).
            outcome = None if event.kind == "deleted" or event.batch is None else (
                exit_code(event.batch))
            code = EXIT_STOPPED if outcome is None else outcome
            line["exit_code"] = code
        emit(line)
    return code


def _final(console: Console, last: WatchEvent | None) -> int:
    if last is None or last.batch is None:
        return EXIT_STOPPED
    if last.kind == "deleted":
        console.print(f"[yellow]{last.batch['id']} was deleted[/]")
        return EXIT_STOPPED
    batch = last.batch
    code = exit_code(batch)
    code = EXIT_STOPPED if code is None else code
    outcome = batch.get("outcome", "stopped")
    reason = batch.get("reason")
    style = {0: "green", 1: "red"}.get(code, "yellow")
    console.print(f"[{style}]{batch['id']} {outcome}[/]" + (f": {reason}" if reason and code else ""))
    return code


def cmd_watch(args: argparse.Namespace, api: DhubClient, console: Console) -> int:
    batch_id = args.batch or api.latest(args.pipeline)["id"]
    return _watch(args, api, console, batch_id)


def cmd_run(args: argparse.Namespace, api: DhubClient, console: Console) -> int:
    key = args.idempotency_key
    if key is not None and not (0 < len(key) <= 256 and key.isascii() and key.isprintable()):
        raise UsageError("--idempotency-key must be 1 to 256 printable ASCII characters")
    key = key or uuid.uuid4().hex
    try:
        batch_id = api.run(args.pipeline, args.version, idempotency_key=key)
    except KeyboardInterrupt:
        # Ctrl-C while a POST was sent (or retried): the API may have started the batch.
        sys.stderr.write(f"dhub: interrupted; a batch may have started. Ask again with the same "
                         f"key, which never starts a second one: "
                         f"{run_again(args.pipeline, args.version, key)}\n")
        return EXIT_INTERRUPTED
    if args.json:
        emit({"event": "created", "item": batch_id} if args.watch else {"item": batch_id})
    else:
        console.print(batch_id, highlight=False)
    return _watch(args, api, console, batch_id) if args.watch else EXIT_COMPLETED


# -- reading ---------------------------------------------------------------------------------
def cmd_get(args: argparse.Namespace, api: DhubClient, console: Console) -> int:
    batch = api.get(args.pipeline, args.batch) if args.batch else api.latest(args.pipeline)
    if args.json:
        emit(batch)
        return EXIT_COMPLETED
    view = BatchView(args.pipeline, verbose=args.verbose > 0)
    view.update(batch)
    console.print(view)
    if batch.get("reason") and exit_code(batch):
        console.print(f"reason: {batch['reason']}", highlight=False)
    return EXIT_COMPLETED


def _steps_summary(batch: Batch) -> str:
    marks = {"success": "✓", "failed": "✗", "running": "▶", "pending": "…", "none": "·"}
    return "".join(marks.get(step["state"], "?") for step in batch["state"]["steps"].values())


def _utc(stamp: str | None) -> str:
    """An API time to the second in UTC, as the column's header says: cutting the text kept
    the clock of whatever offset it carried, and no zone at all (read as local time)."""
    try:
        when = datetime.fromisoformat(stamp or "")
    except ValueError:
        return stamp or ""
    if when.tzinfo is None:
        return f"{stamp} (no zone)"  # not ours to guess, nor to show under UTC unmarked
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_ls(args: argparse.Namespace, api: DhubClient, console: Console) -> int:
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    batches = list(api.batches(args.pipeline, args.limit))
    if args.json:
        emit({"items": {b["id"]: b for b in batches}})
        return EXIT_COMPLETED
    table = Table(box=None, header_style="bold")
    for column in ("BATCH", "STATE", "OUTCOME", "CREATED (UTC)", "STEPS"):
        table.add_column(column, no_wrap=True)
    for b in batches:
        table.add_row(b["id"], b["state"]["state"], b.get("outcome") or "",
                      _utc(b.get("created_at")), _steps_summary(b))
    console.print(table)
    return EXIT_COMPLETED


# -- changing --------------------------------------------------------------------------------
def cmd_stop(args: argparse.Namespace, api: DhubClient, console: Console) -> int:
    # The API answers "Batch stopped successfully" once the stop is queued (and again for a
    # batch that had ended by itself): the batch runs on until the engine cancels its run, and
    # may complete first. So the batch is read after the stop, and what it is now is said.
    message = api.stop(args.pipeline, args.batch)
    try:
        batch: Batch | None = api.get(args.pipeline, args.batch)
    except DhubError:
        batch = None  # a token that may stop but not read, a batch deleted since: unknown
    state = batch["state"]["state"] if batch is not None else None
    outcome = batch.get("outcome") if batch is not None else None
    if args.json:
        emit({"message": message, "state": state, "outcome": outcome})
    elif batch is None:
        console.print(f"stop requested for {args.batch}", highlight=False)
    elif is_final(batch):
        console.print(f"{args.batch} is stopped: {outcome or 'stopped'}", highlight=False)
    else:
        console.print(f"stop requested: {args.batch} is {state} until its run is cancelled "
                      f"(dhub watch {args.pipeline} {args.batch})", highlight=False)
    return EXIT_COMPLETED


def cmd_rm(args: argparse.Namespace, api: DhubClient, console: Console) -> int:
    message = api.delete(args.pipeline, args.batch)
    if args.json:
        emit({"message": message})
    else:
        console.print(message, highlight=False)
    return EXIT_COMPLETED
