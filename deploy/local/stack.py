"""Run the local stack: Redis, Kafka (KRaft), Prefect server + worker, the API, the consumers.

    .venv/bin/python deploy/local/stack.py up|down|status|run [--parts redis kafka ...]

Each part runs in its own session, with a pid file in $DHUB_STATE_DIR/run and a log in
$DHUB_STATE_DIR/logs. What a part is (command, config, readiness) lives in parts.py. deploy/
is not a package: tests load this file with importlib and call `is_ready(part)`,
`up(parts)`, `down(parts)`; nothing runs at import time.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import ModuleType


def _load_parts() -> ModuleType:
    """parts.py sits next to this file; load it by path so that works however we are loaded."""
    name = "dhub_stack_parts"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("parts.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


P = _load_parts()
PARTS: tuple[str, ...] = P.PARTS
is_ready = P.is_ready
read_pid = P.read_pid


# ---------------------------------------------------------------- processes (Linux /proc)
def alive(pid: int) -> bool:
    st = P.proc_stat(pid)
    if st is not None and st[0] == "Z":  # our own exited child (in `run`): reap it
        with suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    return st is not None and st[0] != "Z"


def members(leader: int) -> set[int]:
    """A part's live processes: its session and group, plus descendants that started a
    session of their own (Prefect may run flow runs with start_new_session)."""
    procs = {
        pid: st
        for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
        if (st := P.proc_stat(pid)) is not None and st[0] != "Z"
    }
    found = {pid for pid, st in procs.items() if leader in (st[2], st[3])}
    while new := {pid for pid, st in procs.items() if st[1] in found} - found:
        found |= new
    return found


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, sig)


def stop(part: str) -> bool:
    """SIGTERM the part's processes, wait, SIGKILL what is left. False when no pid file."""
    pid_file = P.pid_file(part)
    try:
        leader, start = (int(x) for x in pid_file.read_text().split()[:2])
    except (OSError, ValueError):
        return False
    st = P.proc_stat(leader)
    if (st is not None and st[4] != start) or pid_file.stat().st_mtime < _boot_time():
        pid_file.unlink()  # the pid was reused or the machine rebooted: nothing of ours is left
        return False
    # A dead leader's pid stays the sid/pgrp of its leftovers, and the kernel does not reuse
    # a pid still in use as a sid, so leftovers of a crashed part are found safely.
    victims = members(leader)
    _signal(victims, signal.SIGTERM)
    deadline = time.monotonic() + (30 if part == "kafka" else 15)
    while any(alive(p) for p in victims) and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal({p for p in victims | members(leader) if alive(p)}, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def stack_pids() -> set[int]:
    """Every live process of every part that has a pid file (for memory sampling, checks)."""
    pids: set[int] = set()
    for part in PARTS:
        with suppress(OSError, ValueError, IndexError):
            pids |= members(int(P.pid_file(part).read_text().split()[0]))
    return pids


def tail(part: str, n: int = 40) -> str:
    try:
        return "\n".join(P.log_file(part).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _spawn(part: str) -> int:
    argv = P.COMMANDS[part]()
    log: Path = P.log_file(part)
    log.parent.mkdir(parents=True, exist_ok=True)
    if log.exists():
        log.replace(log.with_suffix(".log.1"))  # keep the previous run's log for post-mortems
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=P.ROOT,
            env=P.part_env(part),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: `down` stops it and all its children
        )
    st = P.proc_stat(proc.pid)
    P.pid_file(part).parent.mkdir(parents=True, exist_ok=True)
    P.pid_file(part).write_text(f"{proc.pid} {st[4] if st else 0}\n")
    return proc.pid


# ---------------------------------------------------------------- up / down / status / run
@contextmanager
def _locked() -> Iterator[None]:
    """One up/down at a time per state dir: two racing `up`s would both spawn a broker."""
    path = P.state() / "run" / "stack.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # O_CLOEXEC: the parts do not inherit it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another stack.py using {P.state()}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def up(parts: Iterable[str] = PARTS, started: list[str] | None = None) -> bool:
    """Start what is missing; True only when every part is ready. Parts of one wave start
    together, a wave once the previous one is ready. Appends what it started to `started`."""
    with _locked():
        return _up(parts, [] if started is None else started)


ERRORS = (OSError, RuntimeError, subprocess.CalledProcessError)


def _up(parts: Iterable[str], started: list[str]) -> bool:
    wanted = set(parts)
    for wave in P.WAVES:
        pending: dict[str, int] = {}  # part -> the pid whose readiness we wait for
        t0: dict[str, float] = {}  # per part, so one part's set-up is not another's time
        for part in (p for p in wave if p in wanted):
            t0[part] = time.monotonic()
            if not P.present(part):
                print(f"{part:<10} skipped: {P.MODULES[part]}/__main__.py does not exist yet")
                continue
            pid = read_pid(part)
            if is_ready(part):
                if not _finish(part, "already running" if pid else "external, reused", t0[part]):
                    return False
                continue
            if pid is None:  # else it is still starting (an earlier `up`): just wait
                try:
                    stop(part)  # drops a stale pid file and leftovers of a crashed run
                    P.BEFORE.get(part, lambda: None)()
                    pid = _spawn(part)
                except ERRORS as e:
                    return _failed(part, f"{type(e).__name__}: {e}")
                started.append(part)
            pending[part] = pid
        delay = 0.05  # poll fast at first: most parts are ready within a second or a few
        while pending:
            for part, pid in list(pending.items()):
                if is_ready(part):
                    del pending[part]
                    # "started" only for what this call spawned: callers stop exactly those.
                    verb = "started" if part in started else "ready (started by another up)"
                    if not _finish(part, verb, t0[part]):
                        return False
                elif not alive(pid):
                    return _failed(part, "exited")
                elif time.monotonic() - t0[part] > P.TIMEOUTS[part]:
                    return _failed(part, f"not ready after {P.TIMEOUTS[part]} s")
            if pending:
                time.sleep(delay)
                delay = min(delay * 1.5, 0.5)
    return True


def _finish(part: str, verb: str, t0: float) -> bool:
    try:
        P.AFTER.get(part, lambda: None)()  # idempotent: topics, work pool
    except ERRORS as e:
        return _failed(part, f"setting up: {type(e).__name__}: {e}")
    print(f"{part:<10} {verb} in {time.monotonic() - t0:.1f} s", flush=True)
    return True


def _failed(part: str, why: str) -> bool:
    print(f"{part:<10} FAILED ({why}); last lines of {P.log_file(part)}:")
    print(tail(part), flush=True)
    return False


def down(parts: Iterable[str] = PARTS) -> None:
    """Stop, in reverse order, the parts that have pid files; leave external ones alone."""
    with _locked():
        for part in reversed(tuple(parts)):
            t0 = time.monotonic()
            if stop(part):
                print(f"{part:<10} stopped in {time.monotonic() - t0:.1f} s")
            elif P.present(part) and is_ready(part):
                print(f"{part:<10} external (no pid file): left running")


def status(parts: Iterable[str] = PARTS) -> bool:
    ok = True
    for part in parts:
        pid = read_pid(part)
        if not P.present(part):
            word = "absent"
        elif is_ready(part):
            word = "up" if pid else "up (external)"
        else:
            word, ok = ("starting/unhealthy" if pid else "down"), False
        print(f"{part:<10} {word:<18} pid={pid or '-':<8} {P.urls()[part]}")
    return ok


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(parts: tuple[str, ...]) -> int:
    """`up`, then stay in the foreground; Ctrl-C/SIGTERM stops exactly what this started."""
    started: list[str] = []
    old = signal.signal(signal.SIGTERM, _interrupt), signal.getsignal(signal.SIGINT)
    try:
        if not up(parts, started):
            return 1
        u, token = P.urls(), P.state() / "api-token"
        print()
        if "api" in parts and P.present("api"):
            print(f"API         {u['api']}   (Authorization: Bearer $(cat {token}))")
            if "api" in started and token.exists():
                print(f"API token   {token.read_text().strip()}")
        print(f"Prefect UI  {u['prefect']}\nKafka       {u['kafka']}\nRedis       {u['redis']}")
        print(f"logs        {P.state() / 'logs'}\nCtrl-C stops what this command started.")
        while True:
            time.sleep(1)
            for part in [p for p in started if read_pid(p) is None]:
                print(f"{part} exited; last lines of its log:\n{tail(part, 10)}")
                started.remove(part)
    except KeyboardInterrupt:
        print()
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not abort cleanup
        down(started)
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])


def select(names: Iterable[str]) -> tuple[str, ...]:
    """Parts from `--parts`/DHUB_STACK_PARTS items (space or comma separated), in start order."""
    wanted = {p for item in names for p in item.replace(",", " ").split()}
    if unknown := wanted - set(PARTS):
        raise SystemExit(f"unknown parts: {' '.join(sorted(unknown))} (known: {' '.join(PARTS)})")
    return tuple(p for p in PARTS if p in wanted) or PARTS


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.getLogger("aiokafka").addHandler(logging.NullHandler())  # refused = not up yet
    # A shell starting us in the background ignores SIGINT, and exec keeps it ignored in the
    # parts; Prefect's worker turns SIGTERM into SIGINT, so it would then never stop.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("command", choices=["up", "down", "status", "run"])
    ap.add_argument("--parts", nargs="+", default=[], help="subset of: " + " ".join(PARTS))
    args = ap.parse_args(argv)
    parts = select(args.parts or [os.environ.get("DHUB_STACK_PARTS", "")])
    if problem := P.check_ports():
        raise SystemExit(problem)
    if args.command == "up":
        return 0 if up(parts) else 1
    if args.command == "down":
        down(parts)
        return 0
    if args.command == "status":
        return 0 if status(parts) else 3
    return run(parts)


if __name__ == "__main__":
    sys.exit(main())
