"""PostgreSQL: Prefect server's database (trust auth on 127.0.0.1 only), DHUB_POSTGRES_PORT."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from deploy.local.config import StackConfig
from deploy.local.part import Part
from deploy.local.probes import run_async


def server_bin() -> Path:
    """Debian keeps the server binaries off PATH, one folder per major version."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("PostgreSQL server binaries not found: run deploy/local/setup.sh")
    return Path(initdb).parent


# Initialise the cluster once (trust auth: it listens on 127.0.0.1 only), then serve.
INIT_THEN_SERVE = """set -e
bin=$1; data=$2; shift 2
[ -f "$data/PG_VERSION" ] || "$bin/initdb" -D "$data" -A trust -U postgres -E UTF8 >/dev/null
exec "$bin/postgres" -D "$data" "$@"
"""


def data_parent(c: StackConfig) -> Path:
    """Owned by the `postgres` user when we are root: the server refuses to run as root."""
    d = c.state / "postgres"
    d.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        c.state.chmod(c.state.stat().st_mode | 0o005)  # the postgres user must reach d
        shutil.chown(d, "postgres", "postgres")
    return d


def command(c: StackConfig) -> list[str]:
    argv = ["sh", "-c", INIT_THEN_SERVE, "sh", str(server_bin()), str(data_parent(c) / "data"),
            "-p", str(c.settings.postgres_port), "-c", "listen_addresses=127.0.0.1",
            "-c", "unix_socket_directories=", "-c", "shared_buffers=64MB",
            "-c", "max_connections=60", "-c", "fsync=on"]
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


async def _connect(c: StackConfig) -> Any:
    import asyncpg  # imported on use: `status` of the other parts need not load it

    return await asyncpg.connect(host="127.0.0.1", port=c.settings.postgres_port, user="postgres",
                                 database="postgres", timeout=3)


async def _databases(c: StackConfig) -> set[str]:
    conn = await _connect(c)
    try:
        return {r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")}
    finally:
        await conn.close()


async def _create_prefect_database(c: StackConfig) -> None:
    if "prefect" in await _databases(c):
        return
    conn = await _connect(c)
    try:
        await conn.execute("CREATE DATABASE prefect")
    finally:
        await conn.close()


def ready(c: StackConfig) -> bool:
    return "postgres" in run_async(lambda: _databases(c))


def ensure_prefect_database(c: StackConfig) -> None:
    run_async(lambda: _create_prefect_database(c))


PART = Part("postgres", wave=0, command=command, ready=ready,
            timeout_s=60, after=ensure_prefect_database,
            url=lambda c: f"127.0.0.1:{c.settings.postgres_port} (Prefect's database)")
