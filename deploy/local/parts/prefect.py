"""Prefect: the server (its database on the stack's PostgreSQL) and one process worker
polling the work pool DHUB_WORK_POOL. `prefect_env` reaches every part: the API, the
consumers and the worker's flow runs all talk to this server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import datetime

from deploy.local.config import BIN, StackConfig
from deploy.local.part import Part
from deploy.local.probes import http
from deploy.local.procs import read_pid

WORKER_NAME = "dhub-local-worker"  # fixed, so a restart updates one worker row, adds none


def db_url(c: StackConfig) -> str:
    return c.settings.prefect_db_url or (
        f"postgresql+asyncpg://postgres@127.0.0.1:{c.settings.postgres_port}/prefect")


def prefect_env(c: StackConfig) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(c.state / "prefect"),
        # PostgreSQL, not the default SQLite: SQLite's single writer stalled flow-run
        # creation and worker submission by ~2 s after each run (measured: POST -> running
        # p95 3.6 s on SQLite, 1.7 s on PostgreSQL).
        "PREFECT_API_DATABASE_CONNECTION_URL": db_url(c),
        "PREFECT_API_URL": c.settings.prefect_api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # No deployment here has a schedule: the scheduler service would only add load.
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    }


def server_command(c: StackConfig) -> list[str]:
    host, port = c.prefect
    return [str(BIN / "prefect"), "server", "start", "--host", host, "--port", str(port)]


def ensure_work_pool(c: StackConfig) -> None:
    pool = c.settings.work_pool
    if http(f"{c.settings.prefect_api_url}/work_pools/{pool}")[0] == 200:
        return
    # The CLI fills in the process worker's default base job template; a bare POST would not.
    cmd = [str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"]
    env = {**os.environ, **prefect_env(c)}
    subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, check=True)


def worker_command(c: StackConfig) -> list[str]:
    # Prefect's CLI with its clients sharing TLS contexts (pipelines/prefect_worker.py).
    argv = [sys.executable, "-m", "pipelines.prefect_worker", "worker", "start", "--pool",
            c.settings.work_pool]
    return [*argv, "--type", "process", "--name", WORKER_NAME]


def worker_ready(c: StackConfig) -> bool:
    """Alive, and the work pool shows its heartbeat from after this process started."""
    if read_pid(c, "worker") is None:
        return False
    since = c.pid_file("worker").stat().st_mtime  # written before it could send a heartbeat
    url = f"{c.settings.prefect_api_url}/work_pools/{c.settings.work_pool}/workers/filter"
    code, out = http(url, {})  # the filter has no name field: match the name here
    return code == 200 and any(
        w["name"] == WORKER_NAME
        and w.get("last_heartbeat_time")
        and datetime.fromisoformat(w["last_heartbeat_time"].replace("Z", "+00:00")).timestamp() >= since
        for w in json.loads(out)
    )


SERVER = Part("prefect", wave=1, command=server_command, timeout_s=120, after=ensure_work_pool,
              ready=lambda c: http(f"{c.settings.prefect_api_url}/health") == (200, b"true"),
              url=lambda c: f"http://{c.prefect[0]}:{c.prefect[1]}")


def engine_forks_ready(c: StackConfig) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.connect(str(c.engine_forks_socket))  # raises while nobody listens
    return True


# The worker and the fork server share one environment: a fork whose logging settings differ
# from the server's sets logging up again (~0.15 s of its start), and a run whose PYTHON*,
# LANG/LC_* or TZ differ is not forked at all (pipelines/fork_child.py).
WORKER_ENV = {"PREFECT_WORKER_PREFETCH_SECONDS": "5"}
WORKER_ENV_DEFAULTS = {
    # Flow runs' logs go to the worker's log file rather than into Prefect's database,
    # where their writes stalled the next run's start by ~2 s (measured).
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
    # How often the worker asks for scheduled runs. The commands consumer tells the worker
    # of each run it creates (pipelines/worker_nudges.py), so this poll is only the safety
    # net for a nudge lost (Redis down that instant) or a run created outside dhub. Each poll
    # costs the Prefect server: at 0.2 s (the default before nudges) the idle server took
    # 15% of a core here, at 2 s 5%.
    "PREFECT_WORKER_QUERY_SECONDS": "2",
}
WORKER = Part(
    "worker", wave=2, command=worker_command, ready=worker_ready, timeout_s=60,
    url=lambda c: f"work pool {c.settings.work_pool}",
    env=WORKER_ENV, env_defaults=WORKER_ENV_DEFAULTS,
)
# Prefect's engine imported once; each flow run of the worker is a fork of it
# (pipelines/engine_forks.py). Without it flow runs start as before, importing Prefect.
ENGINE_FORKS = Part(
    "engine-forks", wave=2, command=lambda c: [sys.executable, "-m", "pipelines.engine_forks"],
    ready=engine_forks_ready, timeout_s=30, url=lambda c: str(c.engine_forks_socket),
    env=WORKER_ENV, env_defaults=WORKER_ENV_DEFAULTS,
)
