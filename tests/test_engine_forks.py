"""The engine fork server and the command that asks it for a child, as real processes.

The server preloads `prefect.context` (so the child's Prefect settings must be read again from
the requester's environment) and runs `tests/engine_forks_target.py` in place of Prefect's
engine: it reports its pid, parent, working directory, arguments and environment.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.settings import ROOT

TARGET = "tests.engine_forks_target"
SERVER_API = "http://server-side.invalid/api"


def wait_for(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout} s: {check}")


def listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: only its parent has not collected it yet. The parent may collect
    # it between the two looks: then /proc has no entry left (seen once in CI).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DHUB_"))}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    path = tmp_path / "run" / "forks.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.engine_forks", "--socket", str(path),
         "--preload", "prefect.context", "--grace", "2"],
        env=base_env(PREFECT_API_URL=SERVER_API), cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: listening(path) or proc.poll() is not None)
        assert proc.poll() is None, "the server did not start"
        yield proc, path
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def command(socket_path: Path | None, action: str, cwd: Path, umask: int = 0o022,
            **env: str) -> subprocess.Popen[bytes]:
    extra = {"ENGINE_FORKS_MARKER": "from-the-requester", **env}
    if socket_path is not None:
        extra["DHUB_ENGINE_FORKS_SOCKET"] = str(socket_path)
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.engine_command", TARGET, action],
        env=base_env(**extra), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        umask=umask)


def first_report(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    assert proc.stdout is not None
    return dict(json.loads(proc.stdout.readline()))


def trapping_command(socket_path: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """The command, once its child has its SIGTERM handler in place."""
    proc = command(socket_path, "trap", cwd)
    first_report(proc)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def test_the_child_runs_in_the_requesters_place(server: tuple[subprocess.Popen[bytes], Path],
                                                tmp_path: Path) -> None:
    srv, path = server
    proc = command(path, "exit3", tmp_path, PREFECT_API_URL="http://requester.invalid/api",
                   umask=0o027)
    out, err = proc.communicate(timeout=60)
    report = json.loads(out.splitlines()[0])
    assert proc.returncode == 3  # the child's exit code is the command's
    assert report["ppid"] == srv.pid  # forked by the server, not started afresh
    assert report["pid"] != proc.pid
    assert report["cwd"] == str(tmp_path)
    assert report["argv"] == ["exit3"]
    assert report["name"] == "__main__"
    assert report["marker"] == "from-the-requester"
    assert report["umask"] == 0o027  # the requester's
    assert report["fds"] == [0, 1, 2, 3]  # stdio, and the listing's own: none of the server's
    # Prefect read its settings at import in the server; the child reads the requester's.
    assert report["prefect_api_url"] == "http://requester.invalid/api"
    assert b"to stderr" in err  # the requester's own stderr, passed over the socket


def test_without_a_server_the_command_becomes_the_module_itself(tmp_path: Path) -> None:
    for socket_path in (None, tmp_path / "nobody-listens.sock"):
        proc = command(socket_path, "exit0", tmp_path)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert json.loads(out.splitlines()[0])["pid"] == proc.pid  # exec'd, no fork


def test_sigterm_to_the_command_reaches_the_child(server: tuple[subprocess.Popen[bytes], Path],
                                                  tmp_path: Path) -> None:
    _, path = server
    trapping = trapping_command(path, tmp_path)
    trapping.send_signal(signal.SIGTERM)
    out, _ = trapping.communicate(timeout=30)
    assert b"got SIGTERM" in out
    assert trapping.returncode == 7

    with command(path, "hang", tmp_path) as plain:
        child = first_report(plain)["pid"]
        plain.send_signal(signal.SIGTERM)
        plain.wait(timeout=30)
    assert plain.returncode == -signal.SIGTERM  # ended as its child was: by the signal
    wait_for(lambda: not alive(child))


def test_a_killed_command_takes_its_child_along(server: tuple[subprocess.Popen[bytes], Path],
                                                tmp_path: Path) -> None:
    _, path = server
    with command(path, "hang", tmp_path) as proc:
        child = first_report(proc)["pid"]
        assert alive(child)
        proc.kill()  # SIGKILL: nothing can pass it on; the server sees the connection close
        proc.wait(timeout=30)
    wait_for(lambda: not alive(child))
    assert listening(path)  # and goes on serving


def test_a_bad_request_is_refused_and_the_server_goes_on(
        server: tuple[subprocess.Popen[bytes], Path], tmp_path: Path) -> None:
    srv, path = server
    assert path.stat().st_mode & 0o777 == 0o600  # whoever connects runs code as its owner
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
        bad.connect(str(path))
        bad.sendall(b"GET / HTTP/1.1\r\n\r\n")
        try:
            answer = bad.recv(64)
        except ConnectionResetError:  # closed with the request unread
            answer = b""
        assert answer == b""  # no child
    proc = command(path, "exit0", tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and json.loads(out.splitlines()[0])["ppid"] == srv.pid


def test_stopping_the_server_stops_its_children(server: tuple[subprocess.Popen[bytes], Path],
                                                tmp_path: Path) -> None:
    srv, path = server
    trapping = trapping_command(path, tmp_path)
    srv.terminate()
    out, _ = trapping.communicate(timeout=30)
    assert b"got SIGTERM" in out and trapping.returncode == 7
    assert srv.wait(timeout=30) == 0
    assert not path.exists()


def test_a_child_killed_by_sigkill_ends_the_command_by_sigkill(
        server: tuple[subprocess.Popen[bytes], Path], tmp_path: Path) -> None:
    _, path = server
    proc = command(path, "kill9", tmp_path)  # as the kernel's OOM killer would
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err  # what Prefect reads as "out of memory?"


def test_a_requester_started_unlike_the_server_gets_a_fresh_interpreter(
        server: tuple[subprocess.Popen[bytes], Path], tmp_path: Path) -> None:
    _, path = server
    # Fixed when an interpreter starts: a fork of the server could not honour it.
    proc = command(path, "exit0", tmp_path, PYTHONHASHSEED="7")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert json.loads(out.splitlines()[0])["pid"] == proc.pid  # exec'd, not forked


def test_a_requester_gone_as_its_child_was_reaped_in_the_same_round_is_no_crash(
        tmp_path: Path) -> None:
    """A child's end (SIGCHLD) and its requester's going away in one round of select: the
    reap closed and unregistered the requester's socket, then its turn in the round raised
    ValueError from the selector, and the fork server died."""
    from pipelines.engine_forks import ForkServer

    fork_server = ForkServer(tmp_path / "forks.sock")
    requester, server_end = socket.socketpair()
    pid = 2**22 + 1  # no process: nothing to signal
    fork_server._children[pid] = server_end
    fork_server._sel.register(server_end, 1, pid)
    requester.close()
    # What the reap does with the child's entry and socket, earlier in the same round.
    fork_server._children.pop(pid)
    fork_server._sel.unregister(server_end)
    server_end.close()
    fork_server._requester_spoke(server_end, pid)
    assert pid not in fork_server._children


def _ask(path: Path, stdout_w: int) -> tuple[socket.socket, int]:
    """A requester by hand: the request of `engine_command`, its pid read, no `go` yet."""
    from pipelines.engine_command import HEADER, MAGIC, read_line

    body = json.dumps({"module": TARGET, "argv": ["exit0"], "env": base_env(),
                       "cwd": str(ROOT), "umask": 0o022}).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(path))
    socket.send_fds(sock, [HEADER.pack(MAGIC, len(body))], [0, stdout_w, 2])
    sock.sendall(body)
    line = read_line(sock)
    assert line.startswith(b"pid "), line
    return sock, int(line[4:])


def _reported(stdout_r: int, within_s: float) -> bytes:
    """What the child wrote to its stdout within `within_s` (b"" at its end)."""
    ready, _, _ = select.select([stdout_r], [], [], within_s)
    return os.read(stdout_r, 65536) if ready else b""


def test_a_child_runs_only_once_its_requester_says_go(
        server: tuple[subprocess.Popen[bytes], Path]) -> None:
    """The child ran as soon as its pid was written to the requester's socket, read or not.
    A requester that gave up waiting for it (10 s) starts a fresh engine: both ran the flow
    until the server saw the requester's socket close. It now waits for the requester's
    `go`, and one gone without it never runs."""
    _, path = server
    stdout_r, stdout_w = os.pipe()
    try:
        sock, pid = _ask(path, stdout_w)
        # The child is forked and waits; the window is longer than its start (~50 ms).
        assert _reported(stdout_r, 1.5) == b""
        sock.sendall(b"go\n")
        assert json.loads(_reported(stdout_r, 30).splitlines()[0])["pid"] == pid
        assert sock.recv(64) == b"exit 0\n"
        sock.close()
        while _reported(stdout_r, 0):  # the rest of what it wrote (a write may come in two)
            pass
        # Gone without its go: the child exits without running.
        sock, pid = _ask(path, stdout_w)
        sock.close()
        wait_for(lambda: not alive(pid))
        os.close(stdout_w)
        stdout_w = -1
        assert _reported(stdout_r, 30) == b""  # its end: nothing was written
    finally:
        os.close(stdout_r)
        if stdout_w >= 0:
            os.close(stdout_w)
