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


def request_bytes(module: str, args: list[str]) -> bytes:
    body = json.dumps({"module": module, "argv": args, "env": dict(os.environ),
                       "cwd": os.getcwd()}).encode()
    return HEADER.pack(MAGIC, len(body)) + body


def exec_engine(module: str, args: list[str]) -> NoReturn:
    os.execv(sys.executable, [sys.executable, "-m", module, *args])  # noqa: S606 -- no shell wanted


def connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:  # no server: missing file, nothing listening, no permission
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
    except OSError:
        return None
    if not line.startswith(b"pid "):
        return None
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


def end_like(code: int) -> NoReturn:
    """Exit as the child did: by its code, or by the signal that killed it."""
    sys.stdout.flush()
    if code < 0:
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
    for sig in PASSED_SIGNALS:
        signal.signal(sig, lambda signum, _frame: os.kill(pid, signum))
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
