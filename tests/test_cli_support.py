"""What the `dhub` command-line tests share (no tests here): an API process of the working tree
on the live stack, the console script run as a subprocess, pipelines registered through it,
and a pseudo-terminal to run the live view in.

The tests start their own API process (`python -m service`, on a free port, with the stack's
settings: the same Redis, topics and token) rather than using the stack's API on 8080: that
one runs whatever code it was started with, and these tests are about this tree's streams.
Batches still run for real: the stack's consumers, Prefect and worker pick the commands up.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import queue
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from core.settings import ROOT, get_settings
from dhub.config import ConfigError, resolve
from tests.conftest import free_port

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
DHUB = Path(sys.executable).parent / "dhub"  # the console script, installed by `make setup`
STEPS = ("extract", "transform", "load")


@contextlib.contextmanager
def api_process(port: int, timeout: float = 30) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m service` of this tree on `port`, ready (healthz answers) when yielded."""
    env = {**os.environ, "DHUB_API_PORT": str(port), "DHUB_API_HOST": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            assert proc.poll() is None, f"the API process exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"the API did not come up on port {port}"
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Cli:
    """Runs `dhub` against one API URL. The token comes from the stack's token file (the
    default lookup) unless the API was given others (DHUB_API_TOKEN(S)) or a test sets
    DHUB_TOKEN."""

    url: str

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("DHUB_TOKEN", "DHUB_URL")}
        env.update({"DHUB_URL": self.url, "COLUMNS": "120"})
        token = get_settings().static_tokens()[0]
        if resolve_token(env) != token:
            env["DHUB_TOKEN"] = token
        env.update(extra)
        return env

    def __call__(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        assert DHUB.exists(), f"{DHUB} missing: `make setup` installs the console script"
        return subprocess.run([str(DHUB), *args], env=self.env(**env), capture_output=True,
                              text=True, timeout=120)

    def popen(self, *args: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen([str(DHUB), *args], env=self.env(**env), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def json(self, *args: str, **env: str) -> Any:
        out = self(*args, "--json", **env)
        assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)
        return json.loads(out.stdout)

    def register(self, tmp_path: Path, prefix: str = "cli", **config: Any) -> str:
        """A sales pipeline of its own (every step gets `config`), registered from a YAML file."""
        pipeline_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
        lines = [f"id: {pipeline_id}", f"name: {pipeline_id}", 'version: "1"', "steps:"]
        for step in STEPS:
            lines.append(f"  - name: {step}\n    uses: sales.{step}\n    config: {json.dumps(config)}")
        path = tmp_path / f"{pipeline_id}.yaml"
        path.write_text("\n".join(lines) + "\n")
        out = self("pipelines", "register", str(path))
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"registered {pipeline_id} version 1"), out.stdout
        return pipeline_id


def resolve_token(env: dict[str, str]) -> str | None:
    try:
        return resolve(env=env).token
    except ConfigError:
        return None


def own_api_cli() -> Iterator[Cli]:
    """For a test module's `cli` fixture (over the `live` stack): a `Cli` on its own API."""
    port = free_port()
    with api_process(port):
        yield Cli(f"http://127.0.0.1:{port}")


def ndjson(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class Lines:
    """The NDJSON lines of a running `dhub ... --json`, read on a thread so a test can wait for
    the next one with a deadline (select on a buffered pipe would miss lines already read)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def next(self, deadline: float) -> dict[str, Any] | None:
        """The next line (None at the end); fails when none comes before `deadline`."""
        try:
            line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError("dhub printed nothing more in time") from None
        return None if line is None else dict(json.loads(line))

    def until(self, done: Any, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            line = self.next(deadline)
            assert line is not None, "dhub ended first"
            if done(line):
                return line


def _default_sigint() -> None:
    # A runner started in the background (`cmd &` in a non-interactive shell) ignores SIGINT,
    # and an ignored signal is inherited through exec: without this the command under test
    # never sees the Ctrl-C a terminal user would send it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_in_pty(argv: list[str], env: dict[str, str], timeout: float = 90,
               size: tuple[int, int] = (40, 120),
               interrupt_when: re.Pattern[str] | None = None) -> tuple[int, str]:
    """Runs `argv` with a pseudo-terminal as its stdin, stdout and stderr; its exit code and
    everything it drew (escape sequences included). With `interrupt_when`, Ctrl-C (SIGINT to
    its process group) once the output, escape sequences removed, matches it."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    env = {k: v for k, v in env.items() if k not in ("NO_COLOR", "COLUMNS", "LINES", "TERM")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True, preexec_fn=_default_sigint)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{argv} still running after {timeout}s:\n{out.decode(errors='replace')}"
            ready, _, _ = select.select([master], [], [], remaining)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every process holding the terminal has closed it
                break
            if not chunk:
                break
            out += chunk
            drawn = ANSI.sub("", out.decode(errors="replace"))
            if interrupt_when is not None and interrupt_when.search(drawn):
                os.killpg(proc.pid, signal.SIGINT)
                interrupt_when = None
        return proc.wait(timeout=10), out.decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
