"""`dhub`: the Batches API on the command line.

    dhub run PIPELINE [--version V] [--idempotency-key KEY] [--watch]
    dhub watch PIPELINE [BATCH]
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
from typing import Any, NoReturn

from rich.console import Console

from dhub.client import DhubClient, RunUnsettled
from dhub.commands import (
    EXIT_INTERRUPTED,
    UsageError,
    cmd_get,
    cmd_ls,
    cmd_rm,
    cmd_run,
    cmd_stop,
    cmd_watch,
)
from dhub.config import ConfigError
from dhub.errors import ApiError, ConnectionFailed, DhubError
from dhub.models import EXIT_ERROR
from dhub.pipeline_commands import cmd_pipelines_ls, cmd_pipelines_register, cmd_pipelines_show

Handler = Callable[[argparse.Namespace, DhubClient, Console], int]


class Parser(argparse.ArgumentParser):
    """Usage errors exit 3 (argparse's own is 2, which means `cancelled` here)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


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
    run.add_argument("--idempotency-key", metavar="KEY",
                     help="the POST's Idempotency-Key (default: a new one): the same key again "
                          "answers the batch it started, never a second one")
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
    except RunUnsettled as exc:
        return _fail(args, "unsettled", str(exc), idempotency_key=exc.idempotency_key)
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
