"""Redis: one persistent (append-only) server on the port of DHUB_REDIS_URL."""

from __future__ import annotations

from deploy.local.config import StackConfig
from deploy.local.part import Part
from deploy.local.probes import redis_client, write

# A batch hash stays in Redis's compact listpack encoding while it has at most this many
# fields and no value longer than this; past either it becomes a hashtable, ~2x the bytes.
# Redis's default value limit (64 bytes) is passed by a batch's effective `config` (165-321
# bytes on the demo pipeline) and by most failure `reason`s, so a third of the live stack's
# finished batches were hashtables; `make bench-storage` measures both limits. Entries: 512
# (this build's default, set so that it does not depend on the build) covers 3 steps x 8
# partitions (72 fields) with room; the scripts' HGETALL reads a hash whole either way.
MEMORY_CONFIG = {"hash-max-listpack-entries": "512", "hash-max-listpack-value": "1024"}


def command(c: StackConfig) -> list[str]:
    d = c.state / "redis"
    lines = [f"port {c.redis_port}", "bind 127.0.0.1", "protected-mode yes", "daemonize no"]
    lines += [f'dir "{d}"', "appendonly yes", 'save ""', "loglevel notice"]
    lines += [f"{name} {value}" for name, value in MEMORY_CONFIG.items()]
    # Every write on disk before Redis answers it (issue 12, part 5; docs/architecture.md,
    # "Durable state"): the events consumer commits a poll only after its scripts answered,
    # and the API answers a POST after its create did, so nothing acknowledged is lost to a
    # crash of Redis or of the machine. Redis fsyncs once per event-loop turn, so the
    # scripts of a poll (one pipeline) and concurrent requests share an fsync. The default,
    # everysec, could lose the last second on a machine crash (and, on a process kill, the
    # writes it postpones while a slow fsync is still running).
    lines += ["appendfsync always"]
    return ["redis-server", str(write(d / "redis.conf", "\n".join(lines) + "\n"))]


def ready(c: StackConfig) -> bool:
    with redis_client(c) as r:
        return bool(r.ping())


PART = Part("redis", wave=0, command=command, ready=ready, timeout_s=15,
            url=lambda c: c.settings.redis_url)
