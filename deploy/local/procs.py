"""A part's processes, found through Linux /proc: its pid file, its members, stopping them."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

from deploy.local.config import StackConfig


def proc_stat(pid: int) -> tuple[str, int, int, int, int] | None:
    """(state, ppid, pgrp, session, starttime) from /proc, or None when the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and ')'
    return f[0], int(f[1]), int(f[2]), int(f[3]), int(f[19])


def read_pid(config: StackConfig, part: str) -> int | None:
    """The part's pid if that very process still runs (its start time guards pid reuse)."""
    try:
        pid, start = (int(x) for x in config.pid_file(part).read_text().split()[:2])
    except (OSError, ValueError):
        return None
    st = proc_stat(pid)
    return pid if st is not None and st[0] != "Z" and st[4] == start else None


def write_pid(config: StackConfig, part: str, pid: int) -> None:
    st = proc_stat(pid)
    path = config.pid_file(part)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid} {st[4] if st else 0}\n")


def alive(pid: int) -> bool:
    st = proc_stat(pid)
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
        if (st := proc_stat(pid)) is not None and st[0] != "Z"
    }
    found = {pid for pid, st in procs.items() if leader in (st[2], st[3])}
    while new := {pid for pid, st in procs.items() if st[1] in found} - found:
        found |= new
    return found


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, sig)


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def stop(config: StackConfig, part: str, timeout_s: float) -> bool:
    """SIGTERM the part's processes, wait, SIGKILL what is left. False when no pid file."""
    pid_file = config.pid_file(part)
    try:
        leader, start = (int(x) for x in pid_file.read_text().split()[:2])
    except (OSError, ValueError):
        return False
    st = proc_stat(leader)
    if (st is not None and st[4] != start) or pid_file.stat().st_mtime < _boot_time():
        pid_file.unlink()  # the pid was reused or the machine rebooted: nothing of ours is left
        return False
    # A dead leader's pid stays the sid/pgrp of its leftovers, and the kernel does not reuse
    # a pid still in use as a sid, so leftovers of a crashed part are found safely.
    victims = members(leader)
    _signal(victims, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in victims) and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal({p for p in victims | members(leader) if alive(p)}, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True


def stack_pids(config: StackConfig, parts: Iterable[str]) -> set[int]:
    """Every live process of every part that has a pid file (for memory sampling, checks)."""
    pids: set[int] = set()
    for part in parts:
        with suppress(OSError, ValueError, IndexError):
            pids |= members(int(config.pid_file(part).read_text().split()[0]))
    return pids
