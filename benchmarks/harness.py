"""What the benchmarks share: the running stack, child servers, and wrk's figures."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from core.settings import ROOT

STACK = [sys.executable, str(ROOT / "deploy" / "local" / "stack.py")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def stack(parts: list[str]) -> Iterator[None]:
    """Reuses the running stack; starts the missing parts and stops only those afterwards."""
    status = subprocess.run([*STACK, "status", "--parts", *parts], capture_output=True, text=True)
    missing = [p for p in parts if not re.search(rf"^{p}\s+up\b", status.stdout, re.M)]
    if missing:
        subprocess.run([*STACK, "up", "--parts", *missing], check=True)
    try:
        yield
    finally:
        if missing:
            subprocess.run([*STACK, "down", "--parts", *missing], check=False)


@contextmanager
def server(args: list[str], port: int, env: dict[str, str], ready_path: str = "/healthz",
           log: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, *args], env={**os.environ, **env}, cwd=ROOT,
                            stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=1).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args} did not come up on port {port}")
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    # CPU time the server process used per request (user + system), when its pid was given:
    # unlike req/s it hardly moves with what else the machine is running.
    cpu_us: float | None = None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def redis_cpu_seconds(redis: Any) -> float:
    """Redis's user + system CPU time so far (INFO cpu: all its clients, a script's commands
    counted once, unlike commandstats)."""
    cpu: dict[str, Any] = await redis.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, *, connections: int = 32, seconds: int = 10, threads: int = 2,
        headers: dict[str, str] | None = None, script: Path | None = None,
        pid: int | None = None) -> Load:
    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit("wrk is needed: apt-get install -y wrk")
    cmd = [binary, f"-c{connections}", f"-t{threads}", f"-d{seconds}s", "--latency"]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
    if script:
        cmd += ["-s", str(script)]
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds(pid) - cpu0 if pid else None
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: .*", out)
    errors = int(bad.group(1)) if bad else 0
    if socket_errors:
        errors += sum(int(n) for n in re.findall(r"\d+", socket_errors.group(0)))
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return Load(rps, p50, p99, errors, cpu * 1e6 / total if cpu is not None and total else None)


def cpu_score() -> float:
    """A pure-Python CPU anchor: million simple loop iterations per second (best of 3), so a
    reader can tell a slower machine (or a busy one) from a slower program."""
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i & 7
        best = max(best, 1.0 / (time.perf_counter() - t0))
    return best


def machine_anchors() -> str:
    """One line that says what machine (and how busy) the figures beside it came from."""
    load = os.getloadavg()
    return (f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} (1 min) "
            f"{load[1]:.2f} (5 min), Python loop {cpu_score():.1f} M iterations/s "
            f"({sys.version.split()[0]})")
