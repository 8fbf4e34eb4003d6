"""The command a flow run starts with in the process work pool: `python -m pipelines.engine_command`.

It asks the engine fork server (`pipelines.engine_forks`, at DHUB_ENGINE_FORKS_SOCKET) for a
Prefect engine already imported, instead of importing Prefect afresh: the import is most of
the time between a run's Submitting and its Running (about 1.3 s of 2.5 s measured here).
The server forks a child that takes this process's stdin, stdout, stderr, environment and
working directory, and this process stands in for it: Prefect's worker watches this pid, so
SIGTERM/SIGINT/SIGHUP are passed on, and the child's exit status becomes this one's (a
child killed by a signal ends this process by the same signal). SIGKILL cannot be passed on:
the server sees this process's connection close and kills the child itself.

Without a server (the variable unset, nothing listening, or the server gone before it
forked) this process becomes `python -m prefect.engine` itself, exactly the command it
replaces. It imports only the standard library: its own start is part of the latency.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys
from typing import NoReturn

ENGINE = "prefect.engine"
SOCKET_ENV = "DHUB_ENGINE_FORKS_SOCKET"
MAGIC = b"DHUB1"
HEADER = struct.Struct("!5sI")  # MAGIC, then the JSON request's length
PASSED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
UNKNOWN_EXIT = 70  # EX_SOFTWARE: the server died before it could say how the child ended
# Connect, request and the pid's answer: a server stuck longer is not waited for (the
# fallback starts a fresh engine; a child forked meanwhile never runs: it waits for the go
# this process answers once it has read its pid, and the server kills it when this process
# goes).
ANSWER_TIMEOUT_S = 10.0


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def request_bytes(module: str, args: list[str]) -> bytes:
    body = json.dumps({"module": module, "argv": args, "env": dict(os.environ),
                       "cwd": os.getcwd(), "umask": current_umask()}).encode()
    return HEADER.pack(MAGIC, len(body)) + body


def exec_engine(module: str, args: list[str]) -> NoReturn:
    os.execv(sys.executable, [sys.executable, "-m", module, *args])  # noqa: S606 -- no shell wanted


def connect(path: str) -> socket.socket | None:
    """A connection to a server run by this user, or None (no server, or another user's: it
    would be handed this process's environment, secrets included)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(ANSWER_TIMEOUT_S)
    try:
        sock.connect(path)
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except OSError:  # no server: missing file, nothing listening, no permission, stuck
        sock.close()
        return None
    if uid != os.getuid():
        sock.close()
        return None
    return sock


def ask_for_child(sock: socket.socket, module: str, args: list[str]) -> int | None:
    """The forked child's pid, or None when the server did not fork one."""
    data = request_bytes(module, args)
    try:
        socket.send_fds(sock, [data[:HEADER.size]], [0, 1, 2])
        sock.sendall(data[HEADER.size:])
        line = read_line(sock)
        if not line.startswith(b"pid "):
            return None
        sock.sendall(b"go\n")  # from here on the child is this command's, whatever comes
    except OSError:  # includes the timeout
        return None
    sock.settimeout(None)  # the child runs as long as it runs
    return int(line[4:])


def read_line(sock: socket.socket) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        chunk = sock.recv(64)
        if not chunk:
            return out
        out += chunk
    return out.rstrip(b"\n")


def wait_gone(pid: int) -> None:
    """Returns once `pid` (not our child: no waitpid) has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def signal_quietly(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # ended already
        os.kill(pid, sig)


def end_like(code: int) -> NoReturn:
    """Exit as the child did: by its code, or by the signal that killed it."""
    sys.stdout.flush()
    if code < 0:
        with contextlib.suppress(OSError):  # SIGKILL and SIGSTOP have no handler to reset
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


def main() -> NoReturn:
    module, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else (ENGINE, [])
    path = os.environ.get(SOCKET_ENV)
    sock = connect(path) if path else None
    pid = ask_for_child(sock, module, args) if sock is not None else None
    if sock is None or pid is None:
        exec_engine(module, args)
    for sig in PASSED_SIGNALS:  # a child ended meanwhile: its exit is on the way
        signal.signal(sig, lambda signum, _frame: signal_quietly(pid, signum))
    try:
        line = read_line(sock)
    except OSError:
        line = b""
    if line.startswith(b"exit "):
        end_like(int(line[5:]))
    wait_gone(pid)
    print(f"engine_command: the fork server went away; flow process {pid} has ended, "
          "its exit status is unknown", file=sys.stderr)
    sys.exit(UNKNOWN_EXIT)


if __name__ == "__main__":
    main()
