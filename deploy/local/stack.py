"""Run the local stack: Redis, Kafka (KRaft), Prefect server + worker, the API, the consumers.

    .venv/bin/python deploy/local/stack.py up|down|status|run [--parts redis kafka ...]
    .venv/bin/python -m deploy.local.stack ...   (the same)

Each part runs in its own session, with a pid file in $DHUB_STATE_DIR/run and a log in
$DHUB_STATE_DIR/logs. What a part is (command, environment, readiness, hooks) is its
declaration in parts/; this module starts, waits for and stops them. Nothing runs at import.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file (the Makefile's way): sys.path[0] is this folder, where `redis.py` and
    # such would shadow real packages; the repository root is where `deploy` and `core` are.
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from core.logs import scrub
from deploy.local.config import StackConfig
from deploy.local.part import Part
from deploy.local.parts import BY_NAME, NAMES, PARTS, environment, waves
from deploy.local.procs import alive, read_pid, stop, write_pid


def tail(c: StackConfig, part: str, n: int = 40) -> str:
    try:
        return "\n".join(c.log_file(part).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _spawn(c: StackConfig, part: Part) -> int:
    argv = part.command(c)
    log = c.log_file(part.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    if log.exists():
        log.replace(log.with_suffix(".log.1"))  # keep the previous run's log for post-mortems
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=c.root,
            env=environment(part, c),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: `down` stops it and all its children
        )
    write_pid(c, part.name, proc.pid)
    return proc.pid


# ---------------------------------------------------------------- up / down / status / run
@contextmanager
def _locked(c: StackConfig) -> Iterator[None]:
    """One up/down at a time per state dir: two racing `up`s would both spawn a broker."""
    path = c.state / "run" / "stack.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # O_CLOEXEC: the parts do not inherit it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another stack.py using {c.state}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def up(c: StackConfig, parts: Iterable[Part] = PARTS, started: list[str] | None = None) -> bool:
    """Start what is missing; True only when every part is ready. Parts of one wave start
    together, a wave once the previous one is ready. Appends what it started to `started`."""
    with _locked(c):
        return _up(c, parts, [] if started is None else started)


ERRORS = (OSError, RuntimeError, subprocess.CalledProcessError)


def _up(c: StackConfig, parts: Iterable[Part], started: list[str]) -> bool:
    for wave in waves(parts):
        pending: dict[Part, int] = {}  # part -> the pid whose readiness we wait for
        t0: dict[str, float] = {}  # per part, so one part's set-up is not another's time
        for part in wave:
            t0[part.name] = time.monotonic()
            if not part.present(c):
                print(f"{part.name:<10} skipped: {part.module}/__main__.py does not exist yet")
                continue
            pid = read_pid(c, part.name)
            if part.is_ready(c):
                verb = "already running" if pid else "external, reused"
                if not _finish(c, part, verb, t0[part.name]):
                    return False
                continue
            if pid is None:  # else it is still starting (an earlier `up`): just wait
                try:
                    stop(c, part.name, part.stop_timeout_s)  # a stale pid file, a crash's leftovers
                    if part.before is not None:
                        part.before(c)
                    pid = _spawn(c, part)
                except ERRORS as e:
                    return _failed(c, part.name, f"{type(e).__name__}: {e}")
                started.append(part.name)
            pending[part] = pid
        delay = 0.05  # poll fast at first: most parts are ready within a second or a few
        while pending:
            for part, pid in list(pending.items()):
                if part.is_ready(c):
                    del pending[part]
                    # "started" only for what this call spawned: callers stop exactly those.
                    verb = "started" if part.name in started else "ready (started by another up)"
                    if not _finish(c, part, verb, t0[part.name]):
                        return False
                elif not alive(pid):
                    return _failed(c, part.name, "exited")
                elif time.monotonic() - t0[part.name] > part.timeout_s:
                    return _failed(c, part.name, f"not ready after {part.timeout_s:g} s")
            if pending:
                time.sleep(delay)
                delay = min(delay * 1.5, 0.5)
    return True


def _finish(c: StackConfig, part: Part, verb: str, t0: float) -> bool:
    try:
        if part.after is not None:
            part.after(c)  # idempotent: topics, work pool
    except ERRORS as e:
        return _failed(c, part.name, f"setting up: {type(e).__name__}: {e}")
    print(f"{part.name:<10} {verb} in {time.monotonic() - t0:.1f} s", flush=True)
    return True


def _failed(c: StackConfig, part: str, why: str) -> bool:
    print(f"{part:<10} FAILED ({why}); last lines of {c.log_file(part)}:")
    print(tail(c, part), flush=True)
    return False


def down(c: StackConfig, parts: Iterable[Part] = PARTS) -> None:
    """Stop, in reverse order, the parts that have pid files; leave external ones alone."""
    with _locked(c):
        for part in reversed(tuple(parts)):
            t0 = time.monotonic()
            if stop(c, part.name, part.stop_timeout_s):
                print(f"{part.name:<10} stopped in {time.monotonic() - t0:.1f} s")
            elif part.present(c) and part.is_ready(c):
                print(f"{part.name:<10} external (no pid file): left running")


def status(c: StackConfig, parts: Iterable[Part] = PARTS) -> bool:
    ok = True
    for part in parts:
        pid = read_pid(c, part.name)
        if not part.present(c):
            word = "absent"
        elif part.is_ready(c):
            word = "up" if pid else "up (external)"
        else:
            word, ok = ("starting/unhealthy" if pid else "down"), False
        print(f"{part.name:<10} {word:<18} pid={pid or '-':<8} {scrub(part.url(c))}")
    return ok


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(c: StackConfig, parts: tuple[Part, ...]) -> int:
    """`up`, then stay in the foreground; Ctrl-C/SIGTERM stops exactly what this started."""
    started: list[str] = []
    old = signal.signal(signal.SIGTERM, _interrupt), signal.getsignal(signal.SIGINT)
    try:
        if not up(c, parts, started):
            return 1
        token, api = c.state / "api-token", BY_NAME["api"]
        print()
        if api in parts and api.present(c):
            print(f"API         {scrub(api.url(c))}   (Authorization: Bearer $(cat {token}))")
            if "api" in started and token.exists():
                print(f"API token   {token.read_text().strip()}")
        # Printed on purpose: through the one masking rule (an external Redis's password).
        print(f"Prefect UI  {scrub(BY_NAME['prefect'].url(c))}\n"
              f"Kafka       {scrub(BY_NAME['kafka'].url(c))}")
        print(f"Redis       {scrub(BY_NAME['redis'].url(c))}")
        print(f"logs        {c.state / 'logs'}\nCtrl-C stops what this command started.")
        while True:
            time.sleep(1)
            for name in [p for p in started if read_pid(c, p) is None]:
                print(f"{name} exited; last lines of its log:\n{tail(c, name, 10)}")
                started.remove(name)
    except KeyboardInterrupt:
        print()
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not abort cleanup
        down(c, [BY_NAME[name] for name in NAMES if name in started])
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])


def select(names: Iterable[str]) -> tuple[Part, ...]:
    """Parts from `--parts`/DHUB_STACK_PARTS items (space or comma separated), in start order."""
    wanted = {p for item in names for p in item.replace(",", " ").split()}
    if unknown := wanted - set(NAMES):
        raise SystemExit(f"unknown parts: {' '.join(sorted(unknown))} (known: {' '.join(NAMES)})")
    return tuple(p for p in PARTS if p.name in wanted) or PARTS


def main(argv: list[str] | None = None) -> int:
    import logging

    from core.settings import get_settings

    logging.getLogger("aiokafka").addHandler(logging.NullHandler())  # refused = not up yet
    # A shell starting us in the background ignores SIGINT, and exec keeps it ignored in the
    # parts; Prefect's worker turns SIGTERM into SIGINT, so it would then never stop.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("command", choices=["up", "down", "status", "run"])
    ap.add_argument("--parts", nargs="+", default=[], help="subset of: " + " ".join(NAMES))
    args = ap.parse_args(argv)
    parts = select(args.parts or [os.environ.get("DHUB_STACK_PARTS", "")])
    c = StackConfig(get_settings())  # read once; every part is handed this
    if problem := c.port_mismatch():
        raise SystemExit(problem)
    if args.command == "up":
        return 0 if up(c, parts) else 1
    if args.command == "down":
        down(c, parts)
        return 0
    if args.command == "status":
        return 0 if status(c, parts) else 3
    return run(c, parts)


if __name__ == "__main__":
    sys.exit(main())
