"""Consumer-side Kafka plumbing: a manually committed group consumer and safe commits."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from core.retry import Backoff, retrying
from core.settings import Settings

log = logging.getLogger(__name__)
# Beyond a revoke's wait: its fencing, and the sends already under way that it waits for
# (bounded by the producer's own request timeout).
REVOKE_FENCE_S: Final = 20.0
# aiokafka.structs.ConsumerRecord: aiokafka ships no type hints, so this names it only.
Record = Any


def names(partitions: list[TopicPartition]) -> str:
    """Partitions for the rebalance logs (who owns which, when several members run)."""
    return ",".join(f"{tp.topic}:{tp.partition}" for tp in sorted(partitions)) or "none"


async def open_consumer(settings: Settings, part: str, topic: str, group: str,
                        listener: ConsumerRebalanceListener, *, revoke_wait_s: float,
                        **overrides: Any) -> AIOKafkaConsumer:
    """A group member that reads from the earliest uncommitted record and never commits
    on its own: the caller commits after the effect is durable (at-least-once). `listener`
    hands the caller's work in flight over on a revoke (each consumer pipelines its work,
    so a revoke always has something to settle: `lanes`, `stages`), waiting up to
    `revoke_wait_s` for it and then fencing what is left."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "group_id": group,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "client_id": f"dhub-{part}",
        # How long the broker waits for members to rejoin a rebalance; the client's default
        # is the session timeout (10 s). Shorter than the revoke's wait, the broker gave the
        # partitions to another member while this one still settled (a snapshot it sent
        # then landed after the new owner's, which had committed past it), so it is the
        # wait and a margin for the fencing after it.
        "rebalance_timeout_ms": int((revoke_wait_s + REVOKE_FENCE_S) * 1000),
    }
    options.update(overrides)

    async def start() -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(**options)
        consumer.subscribe([topic], listener=listener)
        try:
            await consumer.start()
        except Exception:
            await consumer.stop()
            raise
        return consumer

    return await retrying(f"kafka ({part})", start)


async def commit(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> bool:
    """Commits `offsets` (next offset to read, per partition); shielded so a shutdown does
    not cut a commit in half. False when the group was rebalanced meanwhile: the records
    go to their new owner (every effect is idempotent) and the caller drops the rest of
    them. Any other Kafka error is raised, for the caller's retry."""
    if not offsets:
        return True
    try:
        await asyncio.shield(consumer.commit(offsets))
    except (CommitFailedError, IllegalStateError) as exc:
        log.warning("commit skipped, partitions were reassigned: %s", exc)
        return False
    return True


async def commit_retrying(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int],
                          backoff: Backoff) -> bool:
    """`commit`, retried while Kafka is unavailable; raises `Stopping` at shutdown (the
    records are then delivered again after the restart)."""
    return await backoff.call("commit", lambda: commit(consumer, offsets))
