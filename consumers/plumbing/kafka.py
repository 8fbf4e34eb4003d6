"""Consumer-side Kafka plumbing: a manually committed group consumer and safe commits."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from core.retry import Backoff, retrying
from core.settings import Settings

log = logging.getLogger(__name__)
# aiokafka.structs.ConsumerRecord: aiokafka ships no type hints, so this names it only.
Record = Any


class AssignmentLog(ConsumerRebalanceListener):  # type: ignore[misc]
    """Offsets are committed right after each effect (the events consumer: at most one poll
    applied and not committed yet, whose records the new owner applies again, harmlessly), so
    a rebalance has nothing to flush; this only records who owns which partitions, which is
    what one needs to read when several consumers of a group are running."""

    def __init__(self, part: str) -> None:
        self._part = part

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        if revoked:
            log.info("%s: partitions revoked %s", self._part, _names(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("%s: partitions assigned %s", self._part, _names(assigned))


def _names(partitions: list[TopicPartition]) -> str:
    return ",".join(f"{tp.topic}:{tp.partition}" for tp in sorted(partitions)) or "none"


async def open_consumer(settings: Settings, part: str, topic: str, group: str,
                        listener: ConsumerRebalanceListener | None = None,
                        **overrides: Any) -> AIOKafkaConsumer:
    """A group member that reads from the earliest uncommitted record and never commits
    on its own: the caller commits after the effect is durable (at-least-once). `listener`
    replaces the default one that only logs assignments."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "group_id": group,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "client_id": f"dhub-{part}",
    }
    options.update(overrides)

    async def start() -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(**options)
        consumer.subscribe([topic], listener=listener or AssignmentLog(part))
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
