"""The `proxy` fixture: a `KafkaProxy` in front of the stack's broker, for the tests that
make the API's Kafka fail (registered for every test module by tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from core.settings import Settings
from tests.write_faults_proxy import KafkaProxy


@pytest.fixture
async def proxy(topics: Settings) -> AsyncIterator[KafkaProxy]:
    kafka = KafkaProxy(topics.kafka_bootstrap.split(",")[0])
    await kafka.start()
    try:
        yield kafka
    finally:
        await kafka.close()
