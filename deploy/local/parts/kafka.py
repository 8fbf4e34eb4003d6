"""Kafka: one KRaft broker+controller on the port of DHUB_KAFKA_BOOTSTRAP (the controller on
the next port), its jars fetched by setup.sh; the project's topics created once ready."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

from deploy.local.config import StackConfig
from deploy.local.part import Part
from deploy.local.probes import run_async, write

HERE = Path(__file__).resolve().parents[1]

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

# Format the KRaft storage once, inside the part's own process: its two JVM runs then
# overlap Prefect's start-up, and their output lands in the part's log.
FORMAT_THEN_START = """set -e
conf=$1; shift
id=$("$@" kafka.tools.StorageTool random-uuid | tail -n 1)
"$@" kafka.tools.StorageTool format --standalone -t "$id" -c "$conf"
exec "$@" kafka.Kafka "$conf"
"""


def libs() -> Path:
    version = re.search(r"<kafka.version>(.+?)<", (HERE / "kafka/pom.xml").read_text())
    cache = Path(os.environ.get("DHUB_CACHE_DIR") or Path.home() / ".cache/dhub")
    return cache / f"kafka-{version[1] if version else 'unknown'}" / "libs"


def properties(c: StackConfig) -> dict[str, str]:
    host, port = c.kafka
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
        "log.dirs": str(c.state / "kafka/data"),
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


def command(c: StackConfig) -> list[str]:
    d, jars = c.state / "kafka", libs()
    if not (jars.parent / ".complete").exists():
        raise RuntimeError(f"Kafka jars missing in {jars}: run deploy/local/setup.sh")
    conf = write(d / "server.properties", "".join(f"{k}={v}\n" for k, v in properties(c).items()))
    java = str(Path(os.environ["JAVA_HOME"], "bin/java")) if "JAVA_HOME" in os.environ else "java"
    jvm = [java, "-Xmx384m", "-Xms384m", "-XX:+UseG1GC", "-Djava.awt.headless=true"]
    jvm += [f"-Dkafka.logs.dir={c.state / 'logs/kafka-internal'}"]
    jvm += [f"-Dlog4j2.configurationFile={write(d / 'log4j2.properties', LOG4J2)}"]
    jvm += ["-cp", f"{jars}/*"]
    if (d / "data/meta.properties").exists():
        return [*jvm, "kafka.Kafka", str(conf)]
    return ["sh", "-c", FORMAT_THEN_START, "sh", str(conf), *jvm]


async def _topics(c: StackConfig) -> set[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=c.settings.kafka_bootstrap, request_timeout_ms=5000)
    try:
        await admin.start()
        return set(await admin.list_topics())  # a real metadata round trip
    finally:
        await admin.close()


def ready(c: StackConfig) -> bool:
    return isinstance(run_async(lambda: _topics(c)), set)


# The compacted topics keep the latest record of each key for as long as the key lives (a
# tombstone removes it): they are what a rebuild of Redis reads (docs/architecture.md,
# "Durable state"). A tombstone is kept a day, so a rebuild reading past it still sees it.
COMPACTED = {"cleanup.policy": "compact", "delete.retention.ms": str(24 * 3600 * 1000),
             "min.cleanable.dirty.ratio": "0.5"}


# The commands and events topics are deleted by time, set here rather than left to the
# broker's default (7 days too): a rebuild reads the commands topic for the deletes of batches
# hidden but not yet purged (the clean-up purges and tombstones them within minutes, or waits
# a Prefect outage out), and the events consumer resumes from its committed offset, so a week
# covers a consumer down that long. Neither topic is read whole: the snapshots carry the rest.
WEEK_RETAINED = {"cleanup.policy": "delete", "retention.ms": str(7 * 24 * 3600 * 1000)}


def wanted(c: StackConfig) -> dict[str, tuple[int, dict[str, str]]]:
    """Each topic of the project: its partitions and its configs."""
    s = c.settings
    return {s.topic_commands: (s.commands_partitions, WEEK_RETAINED),
            s.topic_events: (s.events_partitions, WEEK_RETAINED),
            s.topic_dlq: (s.dlq_partitions, {}),
            # One partition: a handful of records, read whole by a rebuild.
            s.topic_pipelines: (1, COMPACTED),
            s.topic_snapshots: (s.snapshots_partitions, COMPACTED)}


async def _create_topics(c: StackConfig) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    want = wanted(c)
    admin = AIOKafkaAdminClient(bootstrap_servers=c.settings.kafka_bootstrap)
    try:
        await admin.start()
        if missing := set(want) - set(await admin.list_topics()):
            resp = await admin.create_topics([
                NewTopic(t, want[t][0], 1, topic_configs=want[t][1]) for t in missing])
            errors = [e for e in resp.topic_errors if e[1] not in (0, 36)]  # 36: exists
            if errors:
                raise RuntimeError(f"create_topics failed: {errors}")
            await _until_described(admin, sorted(missing))
    finally:
        await admin.close()


async def _until_described(admin: Any, topics: list[str], timeout_s: float = 15.0) -> None:
    """Returns once the broker describes every new topic: right after CreateTopics it may
    still answer UNKNOWN_TOPIC_OR_PARTITION for a moment (seen when topics are created one
    set after another), and whoever reads the topics' configs next would see none."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    wanted = [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]
    async with asyncio.timeout(timeout_s):
        while True:
            described = await admin.describe_configs(wanted)
            if all(entry[0] == 0 for response in described for entry in response.resources):
                return
            await asyncio.sleep(0.05)


def ensure_topics(c: StackConfig) -> None:
    run_async(lambda: _create_topics(c))


PART = Part("kafka", wave=0, command=command, ready=ready, timeout_s=90, after=ensure_topics,
            url=lambda c: c.settings.kafka_bootstrap, stop_timeout_s=30)
