"""/readyz tells whether this API process can take writes, not merely reach Redis and Kafka:
on the stack's Kafka, and a Redis of the test's own that it demotes to a replica."""

from __future__ import annotations

from redis.asyncio import Redis

from core.settings import Settings
from service.appkeys import COMMANDS
from tests.conftest import PrivateRedis, free_port
from tests.helpers import AUTH, api_client, api_settings, spec_body


async def test_readyz_is_not_ready_while_redis_refuses_every_write(
        topics: Settings, private_redis: PrivateRedis) -> None:
    """Redis answering PING but refusing writes (a replica after a failover: READONLY; also
    OOM, LOADING) made every write answer 503 while /readyz said ready: a load balancer kept
    routing writes to an instance that could take none."""
    settings = api_settings(topics, redis_url=private_redis.url)
    direct = Redis(port=private_redis.port, decode_responses=True)
    try:
        async with api_client(settings) as api:
            ready = await api.get("/readyz")
            assert ready.status == 200, await ready.json()
            # Demoted: a replica of a master that is gone (what a failover leaves behind).
            await direct.execute_command(  # type: ignore[no-untyped-call]
                "REPLICAOF", "127.0.0.1", str(free_port()))
            ready = await api.get("/readyz")
            body = await ready.json()
            assert (ready.status, body["checks"]["redis"]) == (503, False), body
            await direct.execute_command("REPLICAOF", "NO", "ONE")  # type: ignore[no-untyped-call]
            assert (await api.get("/readyz")).status == 200
    finally:
        await direct.aclose()


async def test_readyz_is_not_ready_while_the_command_sender_refuses_every_write(
        topics: Settings, redis: Redis) -> None:
    """Kafka answering metadata with the commands topic gone (deleted, a broker that lost its
    data; topics are not auto-created): the API's sender refused every POST with 503, and
    /readyz, asking only for the cluster's metadata, said ready."""
    async with api_client(api_settings(topics)) as api:
        assert (await api.put("/api/v1/pipelines/p", json=spec_body(),
                              headers=AUTH)).status == 201
        assert (await api.get("/readyz")).status == 200
    settings = api_settings(topics, topic_commands=f"{topics.topic_commands}.missing")
    async with api_client(settings) as api:
        ready = await api.get("/readyz")
        body = await ready.json()
        assert (ready.status, body["checks"]["kafka"]) == (503, False), body
        post = await api.post("/api/v1/batches/p", headers=AUTH)
        assert post.status == 503, await post.text()
        ready = await api.get("/readyz")
        assert ready.status == 503, await ready.json()


async def test_readyz_names_each_topic_the_api_writes_that_it_cannot_reach(
        topics: Settings, redis: Redis) -> None:
    """The webhook writes the events topic and a pipeline PUT the pipelines topic; with one
    of them gone every such write answered 503 while /readyz showed nothing amiss. The
    commands topic alone decides readiness (see service.health.readyz); each topic's check
    is in the body."""
    missing = f"{topics.topic_events}.missing"
    async with api_client(api_settings(topics, topic_events=missing)) as api:
        ready = await api.get("/readyz")
        body = await ready.json()
        assert ready.status == 200, body
        assert body["checks"]["topics"] == {topics.topic_commands: True, missing: False,
                                            topics.topic_pipelines: True}
        # Kafka known unreachable: nothing is probed, so no topic is said missing (diff
        # review: every topic read False, as if each had been looked at).
        api.app[COMMANDS].available = False
        ready = await api.get("/readyz")
        body = await ready.json()
        assert ready.status == 503, body
        assert body["checks"]["topics"] == {topics.topic_commands: None, missing: None,
                                            topics.topic_pipelines: None}
