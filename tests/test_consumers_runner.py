"""`python -m consumers` as the stack runs it: heartbeat, work done, clean exit on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from consumers import runner
from consumers.plumbing.options import ConsumerOptions
from consumers.plumbing.part import Clients, Part
from core import keys
from core.codec import Event
from core.settings import ROOT, Settings
from tests.conftest import eventually
from tests.test_consumers_support import make_spec, new_batch, options, send, send_command, unique


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(settings: Settings, metrics_port: int = 0) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "DHUB_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "DHUB_REDIS_URL": settings.redis_url,
        "DHUB_PREFECT_API_URL": settings.prefect_api_url,
        "DHUB_TOPIC_COMMANDS": settings.topic_commands,
        "DHUB_TOPIC_EVENTS": settings.topic_events,
        "DHUB_TOPIC_DLQ": settings.topic_dlq,
        "DHUB_GROUP_COMMANDS": settings.group_commands,
        "DHUB_GROUP_EVENTS": settings.group_events,
        "DHUB_HEARTBEAT_EVERY_S": "0.5",
        "DHUB_CONSUMERS_METRICS_PORT": str(metrics_port),
        "PYTHONPATH": str(ROOT),
    })
    return env


async def test_the_process_runs_every_part_and_stops_cleanly_on_sigterm(
        topics: Settings, redis: Redis, tmp_path: Path) -> None:
    pipeline_id = unique("test-run")
    stopped = await new_batch(redis, topics, pipeline_id, make_spec(pipeline_id))
    advanced = await new_batch(redis, topics, pipeline_id, make_spec(pipeline_id))
    log_path = tmp_path / "consumers.log"
    port = free_port()
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "consumers", "all", cwd=ROOT, env=env_for(topics, port),
            stdout=log, stderr=log)
    try:
        await eventually(lambda: redis.exists(keys.HEARTBEAT_CONSUMERS), timeout=60)
        assert await redis.ttl(keys.HEARTBEAT_CONSUMERS) <= ConsumerOptions().heartbeat_ttl_s
        await send_command(topics, "stop", pipeline_id, stopped)
        event = Event(type="step.state", batch_id=advanced, pipeline_id=pipeline_id,
                      step="extract", state="running")
        await send(topics, topics.topic_events, advanced, event.encode())

        async def both_applied() -> bool:
            a = await redis.hget(keys.batch(pipeline_id, stopped), "state")
            b = await redis.hget(keys.batch(pipeline_id, advanced), "step:extract")
            return (a, b) == ("stop", "running")
        await eventually(both_applied, timeout=30)
        stop_done = ("dhub_commands_handled_total", (("outcome", "done"), ("type", "stop")))

        async def stop_counted() -> bool:
            # The stop's event can be applied by the events part before the commands part
            # returns from its handler and counts it: the count follows the effect.
            return stop_done in await scrape(f"http://127.0.0.1:{port}/metrics")
        await eventually(stop_counted, timeout=30)
        samples = await scrape(f"http://127.0.0.1:{port}/metrics")
        assert samples[("dhub_events_applied_total", ())] >= 2  # the stop's event and ours
        assert samples[stop_done] == 1
        prefect_calls = [v for (name, labels), v in samples.items()
                         if name == "dhub_prefect_call_duration_seconds_count"
                         and ("part", "commands") in labels]
        assert sum(prefect_calls) >= 1  # the stop looked up the batch's flow runs
        assert any(name == "dhub_consumer_lag" and ("part", "events") in labels
                   for name, labels in samples)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 40)
    lines = log_path.read_bytes().splitlines()
    records = [orjson.loads(line) for line in lines if line.startswith(b"{")]
    assert code == 0, lines[-20:]
    assert {"ts", "level", "logger", "msg"} <= records[0].keys()
    messages = [r["msg"] for r in records]
    assert any(m.startswith("consumers starting: events,commands,bridge,reconciler")
               for m in messages)
    assert "received SIGTERM, shutting down" in messages
    assert messages[-1] == "consumers stopped"
    assert not [r for r in records if r["level"] in ("error", "critical")]


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("dhub_"), family.name
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_parts_by_name() -> None:
    settings, options = Settings(), ConsumerOptions()
    assert [p.name for p in runner.build("all", settings, options)] == [
        "events", "commands", "bridge", "reconciler", "retention"]
    assert [p.name for p in runner.build("bridge", settings, options)] == ["bridge", "reconciler"]
    assert [p.name for p in runner.build("events", settings, options)] == ["events", "retention"]
    with pytest.raises(ValueError, match="unknown part"):
        runner.build("nope", settings, options)


def test_urls_are_logged_without_passwords() -> None:
    from core.logs import scrub

    assert scrub("redis://:s3cret@db:6379/0") == "redis://:***@db:6379/0"
    assert scrub("redis://user:s3cret@db/0") == "redis://user:***@db/0"
    assert scrub("http://127.0.0.1:4200/api") == "http://127.0.0.1:4200/api"


class FailsAtStop(Part):
    """A part whose last work, once asked to stop, fails (a final commit, say)."""

    name = "failing"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.options = options(shutdown_timeout_s=5.0)

    async def _open(self, clients: Clients, scope: contextlib.AsyncExitStack) -> None:
        return None

    async def _loop(self) -> None:
        await self.stopping.wait()
        raise RuntimeError("final commit failed: partition 3 left uncommitted")


async def test_a_part_failing_during_a_graceful_stop_is_logged_and_exits_1(
        topics: Settings, caplog: pytest.LogCaptureFixture) -> None:
    part = FailsAtStop(topics.model_copy(update={"consumers_metrics_port": 0}))
    stopper = runner.Runner([part], part.settings, part.options)
    caplog.set_level(logging.INFO)
    task = asyncio.create_task(stopper.run())
    await eventually(lambda: part._running, timeout=20)
    stopper.stopping.set()  # what SIGTERM does
    assert await asyncio.wait_for(task, 30) == 1
    assert any("failed while stopping" in r.getMessage() and r.exc_info
               and "final commit failed" in str(r.exc_info[1]) for r in caplog.records)
