"""Redis: one persistent (append-only) server on the port of DHUB_REDIS_URL."""

from __future__ import annotations

from deploy.local.config import StackConfig
from deploy.local.part import Part
from deploy.local.probes import redis_client, write


def command(c: StackConfig) -> list[str]:
    d = c.state / "redis"
    lines = [f"port {c.redis_port}", "bind 127.0.0.1", "protected-mode yes", "daemonize no"]
    lines += [f'dir "{d}"', "appendonly yes", 'save ""', "loglevel notice"]
    return ["redis-server", str(write(d / "redis.conf", "\n".join(lines) + "\n"))]


def ready(c: StackConfig) -> bool:
    with redis_client(c) as r:
        return bool(r.ping())


PART = Part("redis", wave=0, command=command, ready=ready, timeout_s=15,
            url=lambda c: c.settings.redis_url)
