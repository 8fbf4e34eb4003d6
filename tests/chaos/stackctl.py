"""The chaos suite's own stack: where it is, and how to break and mend its parts.

Every process here belongs to the stack that `make chaos` starts with its own DHUB_* ports
and state dir; `check_isolated` refuses to run against the shared development stack.
A part is killed by SIGKILL to its whole process group (each part runs in its own session,
see deploy/local/stack.py) and brought back with the project's own `stack.py up --parts`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from core.settings import ROOT, Settings

# DHUB_CHAOS_STACK: another checkout's stack.py, so that the parts the suite restarts run
# that checkout's code (how a scenario is shown to fail on an older commit).
STACK = [sys.executable, os.environ.get("DHUB_CHAOS_STACK") or str(ROOT / "deploy/local/stack.py")]
# What the shared development stack (`make up`) uses: the suite must touch none of it.
SHARED_PORTS = {6379, 9092, 9093, 5433, 4200, 8080}


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def check_isolated(settings: Settings) -> str | None:
    """Why these settings might reach the shared stack, or None when they cannot."""
    kafka = port_of(settings.kafka_bootstrap.split(",")[0])
    ports = {
        "redis": port_of(settings.redis_url), "kafka": kafka, "kafka controller": kafka + 1,
        "postgres": settings.postgres_port, "prefect": port_of(settings.prefect_api_url),
        "api": settings.api_port,
    }
    if clash := {name: p for name, p in ports.items() if p in SHARED_PORTS}:
        return f"chaos settings use the shared stack's ports {clash}; run it with `make chaos`"
    if settings.state_dir.resolve() == (ROOT / ".dhub").resolve():
        return "chaos settings use the shared stack's state dir .dhub; run it with `make chaos`"
    return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _group(pgid: int) -> list[int]:
    """Live processes of one process group (a part's session leader is its group leader)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                found.append(int(name))
    return found


@dataclass
class ChaosStack:
    settings: Settings

    @property
    def api(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.api_port}"

    @property
    def token(self) -> str:
        return self.settings.static_tokens()[0]

    def pid(self, part: str) -> int | None:
        try:
            pid = int((self.settings.state_dir / "run" / f"{part}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def kill(self, part: str) -> float:
        """SIGKILLs the part's process group and waits until none of it is left; returns when."""
        leader = self.pid(part)
        assert leader is not None, f"{part} of the chaos stack is not running"
        os.killpg(leader, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while _group(leader):
            assert time.monotonic() < deadline, f"{part} survived SIGKILL"
            time.sleep(0.02)
        return time.monotonic()

    def terminate(self, part: str, within_s: float) -> float:
        """SIGTERMs the part's process group; the seconds until none of it is left. A part
        still there after `within_s` fails the scenario (and is SIGKILLed first)."""
        leader = self.pid(part)
        assert leader is not None, f"{part} of the chaos stack is not running"
        t0 = time.monotonic()
        os.killpg(leader, signal.SIGTERM)
        while _group(leader):
            if time.monotonic() - t0 > within_s:
                os.killpg(leader, signal.SIGKILL)
                raise AssertionError(f"{part} did not stop within {within_s:.0f}s of SIGTERM")
            time.sleep(0.02)
        return time.monotonic() - t0

    def up(self, *parts: str) -> float:
        """`stack.py up --parts ...` (waits for readiness); returns how long it took."""
        t0 = time.monotonic()
        argv = [*STACK, "up", *(["--parts", *parts] if parts else [])]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=180)
        if out.returncode != 0:  # a part's set-up call can time out on a loaded machine: once more
            time.sleep(5)
            out = subprocess.run(argv, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, f"stack.py up {parts} failed:\n{out.stdout}\n{out.stderr}"
        return time.monotonic() - t0

    def down(self, *parts: str) -> None:
        subprocess.run([*STACK, "down", "--parts", *parts], capture_output=True, timeout=120,
                       check=False)

    def log(self, part: str) -> Path:
        return self.settings.state_dir / "logs" / f"{part}.log"
