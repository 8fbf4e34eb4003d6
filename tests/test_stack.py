"""The local stack as `make up` leaves it: every engine ready, Redis persistent, the topics and
the work pool in place; and the parts' declarations (deploy/local/parts/) as stack.py uses them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from core.connections import open_redis
from core.settings import ROOT, Settings
from deploy.local.config import StackConfig
from deploy.local.parts import BY_NAME, PARTS, environment, kafka, waves


def test_every_engine_answers_its_readiness_check(stack: Settings) -> None:
    config = StackConfig(stack)
    for part in ("redis", "kafka", "prefect", "worker", "engine-forks"):
        assert BY_NAME[part].is_ready(config), part


@pytest.mark.parametrize("how", [["deploy/local/stack.py"], ["-m", "deploy.local.stack"]])
def test_stack_runs_as_a_file_and_as_a_module(stack: Settings, how: list[str]) -> None:
    out = subprocess.run([sys.executable, *how, "status", "--parts", "redis"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("redis      up"), out.stdout


def test_parts_start_in_waves() -> None:
    assert [[p.name for p in wave] for wave in waves(PARTS)] == [
        ["redis", "kafka", "postgres"], ["prefect", "api"], ["worker", "engine-forks"],
        ["consumers"]]
    assert [[p.name for p in wave] for wave in waves([BY_NAME["consumers"], BY_NAME["redis"]])] == [
        ["redis"], ["consumers"]]


@pytest.fixture
def private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StackConfig:
    """Settings for a stack nobody runs: the ports only in the URLs."""
    for name in ("DHUB_REDIS_PORT", "DHUB_PREFECT_PORT", "PREFECT_LOGGING_TO_API_ENABLED"):
        monkeypatch.delenv(name, raising=False)
    return StackConfig(Settings(state_dir=tmp_path, redis_url="redis://127.0.0.1:6391/0",
                                prefect_api_url="http://127.0.0.1:4491/api",
                                kafka_bootstrap="127.0.0.1:9391,127.0.0.1:9999"))


def test_ports_come_from_the_urls(private: StackConfig) -> None:
    assert private.port_mismatch() is None
    conf = Path(BY_NAME["redis"].command(private)[-1]).read_text()
    assert "port 6391\n" in conf and str(private.state / "redis") in conf
    argv = BY_NAME["prefect"].command(private)
    assert argv[-4:] == ["--host", "127.0.0.1", "--port", "4491"]
    assert kafka.properties(private)["listeners"] == (
        "PLAINTEXT://127.0.0.1:9391,CONTROLLER://127.0.0.1:9392")


def test_a_port_setting_that_contradicts_its_url_is_refused(
        private: StackConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    def config() -> StackConfig:
        return StackConfig(Settings(state_dir=private.state, redis_url="redis://127.0.0.1:6391/0",
                                    prefect_api_url="http://127.0.0.1:4491/api"))

    monkeypatch.setenv("DHUB_REDIS_PORT", "6391")
    monkeypatch.setenv("DHUB_PREFECT_PORT", "4491")
    assert config().port_mismatch() is None
    monkeypatch.setenv("DHUB_PREFECT_PORT", "4200")
    assert config().port_mismatch() == (
        "DHUB_PREFECT_PORT=4200 does not match the port in http://127.0.0.1:4491/api")


def test_every_part_gets_prefects_settings_and_the_worker_polls_fast(
        private: StackConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    for part in PARTS:
        env = environment(part, private)
        assert env["PREFECT_API_URL"] == "http://127.0.0.1:4491/api", part.name
        assert env["DHUB_STATE_DIR"] == str(private.state), part.name
        assert env["PYTHONPATH"].split(":")[0] == str(ROOT), part.name
        # The worker's flow runs find the engine fork server where the stack starts it.
        assert env["DHUB_ENGINE_FORKS_SOCKET"] == str(private.engine_forks_socket), part.name
    worker = environment(BY_NAME["worker"], private)
    # A fork whose Prefect settings differ from its server's must read them again (slower).
    prefect_of = {name: {k: v for k, v in environment(BY_NAME[name], private).items()
                         if k.startswith("PREFECT_")} for name in ("worker", "engine-forks")}
    assert prefect_of["worker"] == prefect_of["engine-forks"]
    assert worker["PREFECT_WORKER_QUERY_SECONDS"] == "2"  # a safety net: runs come with a nudge
    assert worker["PREFECT_LOGGING_TO_API_ENABLED"] == "false"
    assert "PREFECT_WORKER_QUERY_SECONDS" not in environment(BY_NAME["api"], private)
    monkeypatch.setenv("PREFECT_LOGGING_TO_API_ENABLED", "true")  # the caller's choice wins
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "0.5")
    chosen = environment(BY_NAME["worker"], private)
    assert (chosen["PREFECT_LOGGING_TO_API_ENABLED"], chosen["PREFECT_WORKER_QUERY_SECONDS"]) == (
        "true", "0.5")


async def test_redis_persists_with_aof(stack: Settings) -> None:
    redis: Redis = await open_redis(stack)
    try:
        assert (await redis.config_get("appendonly"))["appendonly"] == "yes"
    finally:
        await redis.aclose()


async def test_topics_exist_with_their_partitions(stack: Settings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([stack.topic_commands, stack.topic_events, stack.topic_dlq])
    finally:
        await admin.close()
    partitions = {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}
    assert partitions == {stack.topic_commands: stack.commands_partitions,
                          stack.topic_events: stack.events_partitions,
                          stack.topic_dlq: stack.dlq_partitions}


def test_prefect_has_the_work_pool(stack: Settings) -> None:
    response = httpx.get(f"{stack.prefect_api_url}/work_pools/{stack.work_pool}", timeout=5)
    assert response.status_code == 200 and response.json()["type"] == "process"
