"""What each part of the local stack is: its command, environment, readiness check and setup.

stack.py (the process manager and CLI) loads this file by path; deploy/ is not a package.
Nothing runs at import time.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from core.keys import HEARTBEAT_CONSUMERS
from core.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PARTS = ("redis", "kafka", "postgres", "prefect", "worker", "api", "consumers")  # start order
# A wave starts once the previous one is ready; its parts start together, which overlaps
# Kafka's JVM start-up with PostgreSQL's and then Prefect's (each takes seconds).
WAVES = (("redis", "kafka", "postgres"), ("prefect", "api"), ("worker",), ("consumers",))
MODULES = {"api": "service", "consumers": "consumers"}  # parts that are this repo's packages
TIMEOUTS = {"redis": 15, "kafka": 90, "postgres": 60, "prefect": 120, "worker": 60, "api": 30,
            "consumers": 30}
WORKER_NAME = "dhub-local-worker"  # fixed, so a restart updates one worker row, adds none
BIN = Path(sys.executable).parent  # the venv running the stack also runs its Python parts


def s() -> Settings:
    return get_settings()


def state() -> Path:
    return s().state_dir.resolve()


def pid_file(part: str) -> Path:
    return state() / "run" / f"{part}.pid"


def log_file(part: str) -> Path:
    return state() / "logs" / f"{part}.log"


def hostport(url_or_pair: str) -> tuple[str, int]:
    """('127.0.0.1', 9092) from a URL or from the first `host:port` of a bootstrap list."""
    u = urlsplit(url_or_pair if "//" in url_or_pair else f"//{url_or_pair.split(',')[0]}")
    return u.hostname or "127.0.0.1", int(u.port or 0)


def present(part: str) -> bool:
    """False for our own services whose `python -m` module is not written yet."""
    mod = MODULES.get(part)
    return mod is None or (ROOT / mod / "__main__.py").exists()


# ---------------------------------------------------------------- process identity
def proc_stat(pid: int) -> tuple[str, int, int, int, int] | None:
    """(state, ppid, pgrp, session, starttime) from /proc, or None when the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and ')'
    return f[0], int(f[1]), int(f[2]), int(f[3]), int(f[19])


def read_pid(part: str) -> int | None:
    """The part's pid if that very process still runs (its start time guards pid reuse)."""
    try:
        pid, start = (int(x) for x in pid_file(part).read_text().split()[:2])
    except (OSError, ValueError):
        return None
    st = proc_stat(pid)
    return pid if st is not None and st[0] != "Z" and st[4] == start else None


# ---------------------------------------------------------------- readiness checks
T = TypeVar("T")
# Local URLs only: an http_proxy in the environment must not be asked for 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(url: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})  # noqa: S310
    try:
        with _OPENER.open(req, timeout=3) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def run_async(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion, also when called from async code (e.g. an async test)."""

    async def main() -> T:
        return await make()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    with ThreadPoolExecutor(1) as pool:  # a running loop cannot nest asyncio.run
        return pool.submit(asyncio.run, main()).result()


def redis_client() -> Any:
    """A short-lived client: use it in a `with` block so its connection is closed."""
    import redis

    return redis.Redis.from_url(s().redis_url, socket_timeout=2, socket_connect_timeout=1)


def redis_ready() -> bool:
    with redis_client() as r:
        return bool(r.ping())


def consumers_ready() -> bool:
    """Alive, and the heartbeat key the consumers keep with a TTL is there."""
    if read_pid("consumers") is None:
        return False
    with redis_client() as r:
        return bool(r.exists(HEARTBEAT_CONSUMERS))


async def kafka_topics() -> set[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=s().kafka_bootstrap, request_timeout_ms=5000)
    try:
        await admin.start()
        return set(await admin.list_topics())  # a real metadata round trip
    finally:
        await admin.close()


def worker_ready() -> bool:
    """Alive, and the work pool shows its heartbeat from after this process started."""
    if read_pid("worker") is None:
        return False
    since = pid_file("worker").stat().st_mtime  # written before it could send a heartbeat
    url = f"{s().prefect_api_url}/work_pools/{s().work_pool}/workers/filter"
    code, out = http(url, {})  # the filter has no name field: match the name here
    return code == 200 and any(
        w["name"] == WORKER_NAME
        and w.get("last_heartbeat_time")
        and datetime.fromisoformat(w["last_heartbeat_time"].replace("Z", "+00:00")).timestamp() >= since
        for w in json.loads(out)
    )


async def postgres_databases() -> set[str]:
    import asyncpg

    conn = await asyncpg.connect(host="127.0.0.1", port=s().postgres_port, user="postgres",
                                 database="postgres", timeout=3)
    try:
        return {r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")}
    finally:
        await conn.close()


CHECKS: dict[str, Callable[[], bool]] = {
    "redis": redis_ready,
    "postgres": lambda: "postgres" in run_async(postgres_databases),
    "kafka": lambda: isinstance(run_async(kafka_topics), set),
    "prefect": lambda: http(f"{s().prefect_api_url}/health") == (200, b"true"),
    "worker": worker_ready,
    "api": lambda: http(f"http://{s().api_host}:{s().api_port}/healthz")[0] == 200,
    "consumers": consumers_ready,
}


def is_ready(part: str) -> bool:
    try:
        return CHECKS[part]()
    except Exception:  # any failure (refused, timeout, 5xx body) means "not ready yet"
        return False


# ---------------------------------------------------------------- commands and config
def kafka_libs() -> Path:
    version = re.search(r"<kafka.version>(.+?)<", (HERE / "kafka/pom.xml").read_text())
    cache = Path(os.environ.get("DHUB_CACHE_DIR") or Path.home() / ".cache/dhub")
    return cache / f"kafka-{version[1] if version else 'unknown'}" / "libs"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def cmd_redis() -> list[str]:
    d = state() / "redis"
    lines = [f"port {s().redis_port}", "bind 127.0.0.1", "protected-mode yes", "daemonize no"]
    lines += [f'dir "{d}"', "appendonly yes", 'save ""', "loglevel notice"]
    return ["redis-server", str(write(d / "redis.conf", "\n".join(lines) + "\n"))]


LOG4J2 = """\
# Everything to stdout, which the stack redirects into the part's log.
status = warn
# Kafka logs its own shutdown; log4j's shutdown hook would close the appender first.
shutdownHook = disable
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
# Per-partition and config-dump chatter (thousands of lines per start) hides what matters.
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
logger.repl.name = org.apache.kafka.controller.ReplicationControlManager
logger.repl.level = WARN
logger.coord.name = org.apache.kafka.coordinator.common.runtime.CoordinatorRuntime
logger.coord.level = WARN
logger.storage.name = org.apache.kafka.storage.internals.log
logger.storage.level = WARN
"""


def kafka_properties() -> dict[str, str]:
    host, port = hostport(s().kafka_bootstrap)
    ctl = port + 1  # the controller listener sits next to the broker port (9093 by default)
    listeners = f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{ctl}"
    return {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"{host}:{ctl}",
        "listeners": listeners,
        "advertised.listeners": listeners,
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(state() / "kafka/data"),
        "num.partitions": "6",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",  # one local consumer need not wait 3 s
        # After a kill -9 the restarted broker waits for its old session to expire (9 s).
        "broker.session.timeout.ms": "4000",
        "broker.heartbeat.interval.ms": "1000",
        "auto.create.topics.enable": "false",  # topics get their partition counts from us
    }


def cmd_kafka() -> list[str]:
    d, libs = state() / "kafka", kafka_libs()
    if not (libs.parent / ".complete").exists():
        raise RuntimeError(f"Kafka jars missing in {libs}: run deploy/local/setup.sh")
    props = "".join(f"{k}={v}\n" for k, v in kafka_properties().items())
    conf = write(d / "server.properties", props)
    java = str(Path(os.environ["JAVA_HOME"], "bin/java")) if "JAVA_HOME" in os.environ else "java"
    jvm = [java, "-Xmx384m", "-Xms384m", "-XX:+UseG1GC", "-Djava.awt.headless=true"]
    jvm += [f"-Dkafka.logs.dir={state() / 'logs/kafka-internal'}"]
    jvm += [f"-Dlog4j2.configurationFile={write(d / 'log4j2.properties', LOG4J2)}"]
    jvm += ["-cp", f"{libs}/*"]
    if (d / "data/meta.properties").exists():
        return [*jvm, "kafka.Kafka", str(conf)]
    # Format the KRaft storage once, inside the part's own process: its two JVM runs then
    # overlap Prefect's start-up, and their output lands in the part's log.
    return ["sh", "-c", FORMAT_THEN_START, "sh", str(conf), *jvm]


FORMAT_THEN_START = """set -e
conf=$1; shift
id=$("$@" kafka.tools.StorageTool random-uuid | tail -n 1)
"$@" kafka.tools.StorageTool format --standalone -t "$id" -c "$conf"
exec "$@" kafka.Kafka "$conf"
"""


def postgres_bin() -> Path:
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


def postgres_dir() -> Path:
    """Owned by the `postgres` user when we are root: the server refuses to run as root."""
    d = state() / "postgres"
    d.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        state().chmod(state().stat().st_mode | 0o005)  # the postgres user must reach d
        shutil.chown(d, "postgres", "postgres")
    return d


def cmd_postgres() -> list[str]:
    argv = ["sh", "-c", INIT_THEN_SERVE, "sh", str(postgres_bin()), str(postgres_dir() / "data"),
            "-p", str(s().postgres_port), "-c", "listen_addresses=127.0.0.1",
            "-c", "unix_socket_directories=", "-c", "shared_buffers=64MB",
            "-c", "max_connections=60", "-c", "fsync=on"]
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def ensure_prefect_database() -> None:
    async def create() -> None:
        import asyncpg

        if "prefect" in await postgres_databases():
            return
        conn = await asyncpg.connect(host="127.0.0.1", port=s().postgres_port, user="postgres",
                                     database="postgres", timeout=3)
        try:
            await conn.execute("CREATE DATABASE prefect")
        finally:
            await conn.close()

    run_async(create)


def prefect_db_url() -> str:
    return s().prefect_db_url or (
        f"postgresql+asyncpg://postgres@127.0.0.1:{s().postgres_port}/prefect")


def prefect_env() -> dict[str, str]:
    return {
        "PREFECT_HOME": str(state() / "prefect"),
        # PostgreSQL, not the default SQLite: SQLite's single writer stalled flow-run
        # creation and worker submission by ~2 s after each run (measured: POST -> running
        # p95 3.6 s on SQLite, 1.7 s on PostgreSQL).
        "PREFECT_API_DATABASE_CONNECTION_URL": prefect_db_url(),
        "PREFECT_API_URL": s().prefect_api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # No deployment here has a schedule: the scheduler service would only add load.
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    }


def cmd_prefect() -> list[str]:
    host = hostport(s().prefect_api_url)[0]
    return [str(BIN / "prefect"), "server", "start", "--host", host, "--port", str(s().prefect_port)]


def cmd_worker() -> list[str]:
    argv = [str(BIN / "prefect"), "worker", "start", "--pool", s().work_pool]
    return [*argv, "--type", "process", "--name", WORKER_NAME]


COMMANDS: dict[str, Callable[[], list[str]]] = {
    "redis": cmd_redis,
    "kafka": cmd_kafka,
    "postgres": cmd_postgres,
    "prefect": cmd_prefect,
    "worker": cmd_worker,
    "api": lambda: [sys.executable, "-m", "service"],
    "consumers": lambda: [sys.executable, "-m", "consumers"],
}


def part_env(part: str) -> dict[str, str]:
    env = dict(os.environ)  # passes every DHUB_* on: flow runs in the worker read them too
    env.update(prefect_env(), DHUB_STATE_DIR=str(state()))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if part == "worker":
        # Polling every 0.5 s: a scheduled run waits ~0.25 s on average before it is picked up.
        env.update(PREFECT_WORKER_QUERY_SECONDS="0.5", PREFECT_WORKER_PREFETCH_SECONDS="5")
        # Flow runs' logs go to the worker's log file rather than into Prefect's SQLite
        # database, where their writes stalled the next run's start by ~2 s (measured).
        env.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
    return env


# ---------------------------------------------------------------- before / after hooks
def ensure_topics() -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    want = {
        s().topic_commands: s().commands_partitions,
        s().topic_events: s().events_partitions,
        s().topic_dlq: s().dlq_partitions,
    }

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=s().kafka_bootstrap)
        try:
            await admin.start()
            if missing := set(want) - set(await admin.list_topics()):
                resp = await admin.create_topics([NewTopic(t, want[t], 1) for t in missing])
                errors = [e for e in resp.topic_errors if e[1] not in (0, 36)]  # 36: exists
                if errors:
                    raise RuntimeError(f"create_topics failed: {errors}")
        finally:
            await admin.close()

    run_async(create)


def ensure_work_pool() -> None:
    pool = s().work_pool
    if http(f"{s().prefect_api_url}/work_pools/{pool}")[0] == 200:
        return
    # The CLI fills in the process worker's default base job template; a bare POST would not.
    cmd = [str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"]
    env = {**os.environ, **prefect_env()}
    subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, check=True)


def ensure_token() -> None:
    """A bearer token for the API unless one is configured; the file is readable by us only."""
    path = state() / "api-token"
    if s().api_token or s().api_tokens or path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    print(f"  generated an API token in {path}")


def clear_heartbeat() -> None:
    """A heartbeat left by the last consumers run must not count as this one being ready."""
    with redis_client() as r:
        r.delete(HEARTBEAT_CONSUMERS)


def before_consumers() -> None:
    ensure_token()
    clear_heartbeat()


def register_demo() -> None:
    """Registers the demo `pipeline-sales` through the API's own registry endpoint, which also
    queues its Prefect deployment. Idempotent: the same version again answers 200."""
    from pipelines.sales import PIPELINE_ID, demo_spec

    body = json.dumps(demo_spec().model_dump(mode="json")).encode()
    req = urllib.request.Request(
        f"http://{s().api_host}:{s().api_port}/api/v1/pipelines/{PIPELINE_ID}", body,
        {"Content-Type": "application/json",
         "Authorization": f"Bearer {s().static_tokens()[0]}"}, method="PUT")
    try:
        with _OPENER.open(req, timeout=10) as r:
            status = int(r.status)
    except urllib.error.HTTPError as e:
        status = e.code
    if status not in (200, 201):
        raise RuntimeError(f"registering the demo pipeline answered {status}")


BEFORE: dict[str, Callable[[], None]] = {"api": ensure_token, "consumers": before_consumers}
AFTER: dict[str, Callable[[], None]] = {"kafka": ensure_topics, "postgres": ensure_prefect_database,
                                        "prefect": ensure_work_pool,
                                        "api": register_demo}


def urls() -> dict[str, str]:
    return {
        "redis": s().redis_url,
        "kafka": s().kafka_bootstrap,
        "postgres": f"127.0.0.1:{s().postgres_port} (Prefect's database)",
        "prefect": f"http://{hostport(s().prefect_api_url)[0]}:{s().prefect_port}",
        "worker": f"work pool {s().work_pool}",
        "api": f"http://{s().api_host}:{s().api_port}",
        "consumers": f"heartbeat {HEARTBEAT_CONSUMERS}",
    }


def check_ports() -> str | None:
    """The settings hold both URLs and ports; a mismatch would start servers nobody reaches."""
    for url, port, name in [
        (s().redis_url, s().redis_port, "REDIS"),
        (s().prefect_api_url, s().prefect_port, "PREFECT"),
    ]:
        if hostport(url)[1] != port:
            return f"DHUB_{name}_PORT={port} does not match the port in {url}"
    return None
