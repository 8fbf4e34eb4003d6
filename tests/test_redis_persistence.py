"""The stack's Redis answers a write only once it is on disk (issue 12, part 5): the server the
stack's redis part starts, run here on a port and state directory of its own, reports
`appendonly yes` and `appendfsync always`, and a write it answered is in its append-only
file. (That the file was also fsynced is what a machine crash would show, which no test here
can stage: the setting is what is checked. Redis SIGKILLed mid-stream is `make chaos`'s
tests/chaos/test_redis_kill_committed.py.)"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from core.settings import Settings
from deploy.local.config import StackConfig
from deploy.local.parts import BY_NAME


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def private_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    monkeypatch.delenv("DHUB_REDIS_PORT", raising=False)
    config = StackConfig(Settings(state_dir=tmp_path,
                                  redis_url=f"redis://127.0.0.1:{_free_port()}/0"))
    proc = subprocess.Popen(BY_NAME["redis"].command(config), stdout=subprocess.DEVNULL)
    client = redis.Redis.from_url(config.settings.redis_url, decode_responses=True,
                                  socket_timeout=5)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "no redis-server"
                time.sleep(0.05)
        yield client
    finally:
        client.close()
        proc.kill()
        proc.wait()


def test_the_stacks_redis_fsyncs_every_write_before_answering(
        private_redis: redis.Redis, tmp_path: Path) -> None:
    assert private_redis.config_get("appendonly") == {"appendonly": "yes"}
    assert private_redis.config_get("appendfsync") == {"appendfsync": "always"}
    # The write is in the AOF when its answer arrives: the file is read with no wait at all.
    value = "durable-" + str(time.time_ns())
    private_redis.set("k", value)
    aof = b"".join(p.read_bytes() for p in (tmp_path / "redis").rglob("*.incr.aof"))
    assert value.encode() in aof
