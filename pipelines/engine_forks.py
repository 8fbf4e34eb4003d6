"""The engine fork server: Prefect's engine imported once, a fork of it per flow run.

`python -m pipelines.engine_forks [--socket PATH] [--preload MODULE ...]` imports the
preloaded modules, listens on a Unix socket (mode 0600: whoever connects runs code as this
user) and serves `pipelines.engine_command`: for each request it forks a child that takes the
requester's stdin/stdout/stderr, environment, working directory and arguments, and runs the
requested module as `__main__`, as `python -m <module>` would in a fresh interpreter, minus
the imports. The requester gets `pid <n>` at once and answers `go`: only then does the
child run (a requester that gave up waiting for its pid starts a fresh engine instead, and
the two must not both run the flow). It gets `exit <code>` when the child ends (negative:
killed by that signal); if the requester goes away first, the child is killed.

Only libraries are preloaded (and this server's own small modules): a flow run imports
the project's and the pipelines' code afresh, so a changed step is run as it is on disk, as
without the server. What a child does after the fork is `fork_child`'s.

The server stays single-threaded (forking a process with threads is unsafe) and handles one
request at a time: a fork takes a few milliseconds. On SIGTERM/SIGINT it stops listening,
passes SIGTERM to its children, and kills those still running after `--grace` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import selectors
import signal
import socket
import stat
import sys
import threading
import time
from pathlib import Path

from pipelines import fork_child
from pipelines.engine_command import PASSED_SIGNALS, SOCKET_ENV, signal_quietly
from pipelines.fork_child import Job
from pipelines.fork_preload import PRELOAD, prepare
from pipelines.fork_request import REQUEST_TIMEOUT_S, BadRequest, Probed, read_request

log = logging.getLogger("dhub.engine_forks")


class ForkServer:
    def __init__(self, path: Path, grace_s: float = 10.0) -> None:
        self._path = path
        self._grace_s = grace_s
        self._sel = selectors.DefaultSelector()
        self._children: dict[int, socket.socket | None] = {}  # pid -> its requester, if there
        self._go: dict[int, int] = {}  # pid -> the write end of its go pipe, until its `go`
        self._stopping = False
        self._server_pid = os.getpid()  # a forked child runs serve's `finally` too

    def serve(self) -> Job | None:
        """Runs until SIGTERM/SIGINT (then None); in a forked child, returns its job."""
        listener = self._listen()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self._sel.register(listener, selectors.EVENT_READ, "accept")
        self._sel.register(wake_r, selectors.EVENT_READ, "wake")
        log.info("engine fork server ready on %s", self._path)
        try:
            while not self._stopping:
                for key, _ in self._sel.select():
                    if key.data == "accept":
                        job = self._accept(listener)
                        if job is not None:  # the forked child
                            os.close(wake_r)
                            os.close(wake_w)
                            return job
                    elif key.data == "wake":
                        os.read(wake_r, 4096)
                        self._reap()
                    else:
                        self._requester_spoke(key.fileobj, key.data)  # type: ignore[arg-type]
        finally:
            if os.getpid() == self._server_pid:
                self._sel.unregister(listener)
                listener.close()
                self._path.unlink(missing_ok=True)
        self._stop_children()
        return None

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum != signal.SIGCHLD:
            self._stopping = True

    def _listen(self) -> socket.socket:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self._path))
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISSOCK(self._path.lstat().st_mode):
                    raise SystemExit(f"{self._path} exists and is not a socket") from None
                self._path.unlink()  # left by a server that died
        else:
            raise SystemExit(f"another engine fork server is listening on {self._path}")
        finally:
            probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_mask = os.umask(0o177)  # created 0600: no window where others may connect
        try:
            listener.bind(str(self._path))
        finally:
            os.umask(old_mask)
        listener.listen(64)
        return listener

    def _accept(self, listener: socket.socket) -> Job | None:
        """Serves one request; in the forked child, returns its job. Whatever fails, the
        server goes on; a requester that gets no pid starts a fresh interpreter instead."""
        try:
            conn, _ = listener.accept()
        except OSError as e:  # EMFILE, ECONNABORTED...: the next one may do
            log.warning("accept failed: %s", e)
            return None
        fds: list[int] = []
        try:
            job, fds = read_request(conn)
            if self._stopping:
                raise BadRequest("stopping")
            if (why := fork_child.start_differs(job)) is not None:
                raise BadRequest(why)
            return self._fork(conn, job, fds)
        except Probed:
            pass
        except Exception as e:  # one request's failure is not the server's
            log.warning("refused a request (its requester starts a fresh engine): %s", e)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        conn.close()
        return None

    def _fork(self, conn: socket.socket, job: Job, fds: list[int]) -> Job | None:
        sys.stdout.flush()  # or the child would write the server's buffered output again
        sys.stderr.flush()
        go_r, go_w = os.pipe()
        # Blocked across the fork: a SIGTERM meant for the child that arrives before it
        # reset its handlers is delivered after, by the default action, not lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, {*PASSED_SIGNALS, signal.SIGCHLD})
        try:
            pid = os.fork()
        except OSError:  # EAGAIN, ENOMEM: the request is refused, the pipe not kept
            os.close(go_r)
            os.close(go_w)
            raise
        finally:
            if os.getpid() == self._server_pid:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {*PASSED_SIGNALS, signal.SIGCHLD})
        if pid == 0:
            os.close(go_w)
            self._leave_server(conn)
            fork_child.enter(fds)
            # Runs only once the requester said it has its pid: else (the server died, or
            # the requester gave up waiting) it would run beside the fresh engine the
            # requester starts.
            if os.read(go_r, 1) != b"g":
                os._exit(1)
            os.close(go_r)
            return job
        os.close(go_r)
        for fd in fds:
            os.close(fd)
        fds.clear()
        self._children[pid] = None
        try:
            conn.settimeout(REQUEST_TIMEOUT_S)
            conn.sendall(b"pid %d\n" % pid)
        except OSError:  # the requester is gone already: its child never starts
            os.close(go_w)
            conn.close()
            return None
        self._go[pid] = go_w  # written once the requester answers `go`
        conn.settimeout(None)
        self._children[pid] = conn
        self._sel.register(conn, selectors.EVENT_READ, pid)
        log.info("forked pid %d for %s", pid, job.module)
        return None

    def _leave_server(self, conn: socket.socket) -> None:
        """In the child: no socket of the server's stays open in it, nor another child's go
        pipe (held open here, that child would not see the server close it)."""
        for key in list(self._sel.get_map().values()):
            if isinstance(key.fileobj, socket.socket):
                key.fileobj.close()
        self._sel.close()
        conn.close()
        for go_w in self._go.values():
            os.close(go_w)
        self._go.clear()

    def _let_go(self, pid: int, run: bool) -> None:
        """Ends `pid`'s wait for its go: it runs, or (the pipe closed) it exits."""
        go_w = self._go.pop(pid, None)
        if go_w is None:
            return
        with contextlib.suppress(OSError):  # it is gone already
            if run:
                os.write(go_w, b"g")
        os.close(go_w)

    def _requester_spoke(self, conn: socket.socket, pid: int) -> None:
        if self._children.get(pid) is not conn:
            # Reaped earlier in the same round of select (the child ended as its requester
            # went away): its socket is unregistered and closed already.
            return
        try:
            data = conn.recv(64)
        except OSError:
            data = b""
        if data:
            if data.startswith(b"g") and pid in self._go:
                self._let_go(pid, run=True)
                log.info("started pid %d", pid)
            return  # else the protocol has nothing for it to say; ignored
        # The requester ended (SIGKILL, most likely, or it gave up before its `go`): the
        # worker no longer watches the child.
        self._let_go(pid, run=False)
        self._sel.unregister(conn)
        conn.close()
        self._children[pid] = None
        signal_quietly(pid, signal.SIGKILL)
        log.warning("the requester of pid %d went away: killed it", pid)

    def _reap(self) -> None:
        while self._children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self._children.pop(pid, None)
            self._let_go(pid, run=False)
            code = os.waitstatus_to_exitcode(status)
            log.info("pid %d ended: %d", pid, code)
            if conn is not None:
                self._sel.unregister(conn)
                with contextlib.suppress(OSError):  # its requester is gone: nobody to tell
                    conn.sendall(b"exit %d\n" % code)
                conn.close()

    def _stop_children(self) -> None:
        for pid in list(self._go):  # not started: they exit
            self._let_go(pid, run=False)
        for pid in list(self._children):
            signal_quietly(pid, signal.SIGTERM)
        deadline = time.monotonic() + self._grace_s
        while self._children and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        for pid in list(self._children):
            signal_quietly(pid, signal.SIGKILL)
        while self._children:
            self._reap()
            time.sleep(0.01)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.engine_forks",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", default=os.environ.get(SOCKET_ENV),
                        help=f"where to listen (default: ${SOCKET_ENV})")
    parser.add_argument("--preload", nargs="*", default=list(PRELOAD),
                        help="modules imported once, before any fork")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds from SIGTERM to SIGKILL for running children on stop")
    args = parser.parse_args(argv)
    if not args.socket:
        parser.error(f"--socket or {SOCKET_ENV} is required")
    # Its own handler, not the root logger's: the children keep Prefect's logging as is.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    for module in args.preload:
        importlib.import_module(module)
    prepare()
    if threading.active_count() != 1:  # forking a process with threads is unsafe
        raise SystemExit(f"a preload started threads: {threading.enumerate()}")
    server_env = dict(os.environ)
    job = ForkServer(Path(args.socket), grace_s=args.grace).serve()
    if job is not None:
        # Then this child exits as the interpreter does: atexit hooks, flushes.
        fork_child.run(job, server_env)


if __name__ == "__main__":
    main()
