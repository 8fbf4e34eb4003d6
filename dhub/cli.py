"""`dhub`: the Batches API on the command line.

    dhub run PIPELINE [--version V] [--watch]    dhub watch PIPELINE [BATCH]
    dhub ls PIPELINE [--limit N]                 dhub get PIPELINE [BATCH]
    dhub stop PIPELINE BATCH                     dhub rm PIPELINE BATCH
    dhub pipelines ls | show PIPELINE | register FILE [--id ID]

Exit codes: 0 completed (or done), 1 failed, 2 cancelled, stopped or deleted (`watch` and
`run --watch` exit with the batch's outcome), 3 usage, auth, connection or API errors; 130 when
Ctrl-C ends a watch (the batch keeps running).
`--json` prints machine-readable output (one JSON object; `watch` one per line, NDJSON);
errors go to stderr (as `{"error": ...}` with `--json`). `DHUB_URL` and `DHUB_TOKEN` choose
the API (`dhub.config`).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

from dhub.client import DhubClient
from dhub.config import ConfigError
from dhub.errors import ApiError, ConnectionFailed, DhubError
from dhub.models import EXIT_COMPLETED, EXIT_ERROR, EXIT_STOPPED, Batch, exit_code
from dhub.view import BatchView
from dhub.watch import WatchEvent

EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
Handler = Callable[[argparse.Namespace, DhubClient, Console], int]


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """Usage errors exit 3 (argparse's own is 2, which means `cancelled` here)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def _emit(args: argparse.Namespace, obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


# -- watching ------------------------------------------------------------------------------
def _watch(args: argparse.Namespace, api: DhubClient, console: Console, batch_id: str) -> int:
    try:
        return _follow(args, api, console, batch_id)
    except KeyboardInterrupt:
        # Ctrl-C leaves the watch, not the batch: it keeps running (`dhub stop` stops it).
        sys.stderr.write(f"dhub: stopped watching; {batch_id} is not stopped "
                         f"(dhub stop {args.pipeline} {batch_id})\n")
        return EXIT_INTERRUPTED


def _follow(args: argparse.Namespace, api: DhubClient, console: Console, batch_id: str) -> int:
    events = api.watch(args.pipeline, batch_id, stream=not args.no_stream,
                       reconnect_for=args.reconnect_for)
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
            note = f"reconnecting: {event.error}" if event.kind == "reconnecting" else None
            view.update(event.batch, note)
            last = event
    return _final(console, last)


def _state_line(event: WatchEvent) -> str:
    if event.kind == "reconnecting":
        return f"reconnecting: {event.error}"
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
        elif event.kind in ("end", "deleted"):
            code = EXIT_STOPPED if event.kind == "deleted" or event.batch is None else (
                exit_code(event.batch) or EXIT_COMPLETED)
            line["exit_code"] = code
        _emit(args, line)
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
    batch_id = api.run(args.pipeline, args.version)
    if args.json:
        _emit(args, {"event": "created", "item": batch_id} if args.watch else {"item": batch_id})
    else:
        console.print(batch_id, highlight=False)
    return _watch(args, api, console, batch_id) if args.watch else EXIT_COMPLETED


# -- reading ---------------------------------------------------------------------------------
def cmd_get(args: argparse.Namespace, api: DhubClient, console: Console) -> int:
    batch = api.get(args.pipeline, args.batch) if args.batch else api.latest(args.pipeline)
    if args.json:
        _emit(args, batch)
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


def cmd_ls(args: argparse.Namespace, api: DhubClient, console: Console) -> int:
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    batches = list(api.batches(args.pipeline, args.limit))
    if args.json:
        _emit(args, {"items": {b["id"]: b for b in batches}})
        return EXIT_COMPLETED
    table = Table(box=None, header_style="bold")
    for column in ("BATCH", "STATE", "OUTCOME", "CREATED", "STEPS"):
        table.add_column(column, no_wrap=True)
    for b in batches:
        created = b.get("created_at", "")[:19].replace("T", " ")
        table.add_row(b["id"], b["state"]["state"], b.get("outcome", ""), created, _steps_summary(b))
    console.print(table)
    return EXIT_COMPLETED


# -- changing --------------------------------------------------------------------------------
def cmd_stop(args: argparse.Namespace, api: DhubClient, console: Console) -> int:
    message = api.stop(args.pipeline, args.batch)
    if args.json:
        _emit(args, {"message": message})
    else:
        console.print(message, highlight=False)
    return EXIT_COMPLETED


def cmd_rm(args: argparse.Namespace, api: DhubClient, console: Console) -> int:
    message = api.delete(args.pipeline, args.batch)
    if args.json:
        _emit(args, {"message": message})
    else:
        console.print(message, highlight=False)
    return EXIT_COMPLETED


# -- pipelines -------------------------------------------------------------------------------
def cmd_pipelines_ls(args: argparse.Namespace, api: DhubClient, console: Console) -> int:
    items = api.pipelines()
    if args.json:
        _emit(args, {"items": items})
        return EXIT_COMPLETED
    table = Table(box=None, header_style="bold")
    for column in ("PIPELINE", "NAME", "LATEST", "VERSIONS", "STEPS"):
        table.add_column(column)
    for pipeline_id, p in sorted(items.items()):
        latest = next((v for v in p["versions"] if v["latest"]), p["versions"][-1])
        steps = " → ".join(str(s.get("name")) for s in latest["steps"])
        table.add_row(pipeline_id, p["name"], p["latest"], str(len(p["versions"])), steps)
    console.print(table)
    return EXIT_COMPLETED


def cmd_pipelines_show(args: argparse.Namespace, api: DhubClient, console: Console) -> int:
    pipeline = api.pipeline(args.pipeline)
    if args.json:
        _emit(args, pipeline)
    else:
        console.print_json(data=pipeline)
    return EXIT_COMPLETED


def read_spec(path: str) -> dict[str, Any]:
    """A pipeline definition from a YAML or JSON file (`-`: stdin); JSON is YAML too, but a
    `.json` file is read strictly."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        spec = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if path.endswith(".json") else "YAML"
        raise UsageError(f"{path} is not valid {kind}: {exc}") from None
    if not isinstance(spec, dict):
        raise UsageError(f"{path}: a pipeline definition is a mapping (name, version, steps)")
    return spec


def cmd_pipelines_register(args: argparse.Namespace, api: DhubClient, console: Console) -> int:
    spec = read_spec(args.file)
    # The id: --id, else an `id` key of the file (not part of the definition), else its name.
    file_id = spec.pop("id", None)
    pipeline_id = args.id or file_id or spec.get("name")
    if not isinstance(pipeline_id, str) or not pipeline_id:
        raise UsageError("no pipeline id: give --id, or `id` or `name` in the file")
    pipeline = api.register(pipeline_id, spec)
    if args.json:
        _emit(args, pipeline)
    else:
        what = "registered" if pipeline.get("created") else "unchanged:"
        console.print(f"{what} {pipeline_id} version {spec.get('version')} "
                      f"(latest {pipeline['latest']})", highlight=False)
    return EXIT_COMPLETED


# -- the parser ------------------------------------------------------------------------------
def build_parser() -> Parser:
    # Options accepted before and after the command (`dhub --json ls p`, `dhub ls p --json`);
    # SUPPRESS keeps a subcommand's absent option from overwriting the one given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output (JSON; NDJSON for watch)")
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help="the API's base URL (default: $DHUB_URL, else http://127.0.0.1:8080)")
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="watch/get: one bar per partition too")
    parser = Parser(prog="dhub", parents=[common], description="The Batches API on the command line.",
                    epilog="exit codes: 0 completed, 1 failed, 2 cancelled/stopped/deleted, "
                           "3 usage/auth/connection/API errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=Parser)

    def add(name: str, handler: Handler, help_: str, sub: Any = commands) -> Parser:
        command: Parser = sub.add_parser(name, parents=[common], help=help_, description=help_)
        command.set_defaults(handler=handler)
        return command

    run = add("run", cmd_run, "start a batch of PIPELINE (prints its id)")
    run.add_argument("pipeline", metavar="PIPELINE")
    run.add_argument("--version", help="the pipeline version (default: the latest)")
    run.add_argument("--watch", action="store_true", help="then watch it; exit with its outcome")
    run.add_argument("--no-stream", action="store_true", help="long-poll instead of the push stream")
    run.add_argument("--reconnect-for", type=float, default=60.0, metavar="SECONDS",
                        help="give up (exit 3) after the API is unreachable this long (default 60)")

    watch = add("watch", cmd_watch, "live progress of a batch until it stops; exit with its outcome")
    watch.add_argument("pipeline", metavar="PIPELINE")
    watch.add_argument("batch", metavar="BATCH", nargs="?", help="default: the latest batch")
    watch.add_argument("--no-stream", action="store_true", help="long-poll instead of the push stream")
    watch.add_argument("--reconnect-for", type=float, default=60.0, metavar="SECONDS",
                        help="give up (exit 3) after the API is unreachable this long (default 60)")

    ls = add("ls", cmd_ls, "the pipeline's batches, newest first")
    ls.add_argument("pipeline", metavar="PIPELINE")
    ls.add_argument("--limit", type=int, default=20, help="at most N batches (default 20)")

    get = add("get", cmd_get, "one batch (default: the latest)")
    get.add_argument("pipeline", metavar="PIPELINE")
    get.add_argument("batch", metavar="BATCH", nargs="?")

    for name, handler, help_ in (("stop", cmd_stop, "stop a batch"),
                                 ("rm", cmd_rm, "delete a batch (a running one is stopped first)")):
        command = add(name, handler, help_)
        command.add_argument("pipeline", metavar="PIPELINE")
        command.add_argument("batch", metavar="BATCH")

    pipelines = add("pipelines", cmd_pipelines_ls, "registered pipelines: ls, show, register")
    sub = pipelines.add_subparsers(dest="pipelines_command", metavar="ls|show|register",
                                   required=True, parser_class=Parser)
    add("ls", cmd_pipelines_ls, "every pipeline and its latest version", sub)
    show = add("show", cmd_pipelines_show, "a pipeline's versions and definitions", sub)
    show.add_argument("pipeline", metavar="PIPELINE")
    register = add("register", cmd_pipelines_register,
                   "register a definition (YAML or JSON; - reads stdin)", sub)
    register.add_argument("file", metavar="FILE")
    register.add_argument("--id", help="the pipeline id (default: the file's `id`, else its `name`)")
    return parser


def _fail(args: argparse.Namespace | None, kind: str, message: str, **extra: Any) -> int:
    if args is not None and args.json:
        sys.stderr.write(json.dumps({"error": {"code": kind, "message": message, **extra}}) + "\n")
    else:
        sys.stderr.write(f"dhub: {message}\n")
    return EXIT_ERROR


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    # Set here, not with set_defaults: the common options' actions are shared by every
    # subparser, and a default there would overwrite the value given before the command.
    for name, default in (("json", False), ("url", None), ("verbose", 0)):
        if not hasattr(args, name):
            setattr(args, name, default)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    console = Console(highlight=False)
    try:
        with DhubClient(args.url) as api:
            handler: Handler = args.handler
            return handler(args, api, console)
    except UsageError as exc:
        return _fail(args, "usage", str(exc))
    except ConfigError as exc:
        return _fail(args, "config", str(exc))
    except ConnectionFailed as exc:
        return _fail(args, "connection", str(exc))
    except ApiError as exc:
        return _fail(args, exc.code, f"{exc.status} {exc.code}: {exc.message}", status=exc.status)
    except DhubError as exc:
        return _fail(args, "error", str(exc))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        # A bug of ours must not exit 1, which says "the batch failed".
        traceback.print_exc()
        return _fail(args, "internal", f"internal error: {exc!r}")


def entry() -> NoReturn:
    sys.exit(main())
