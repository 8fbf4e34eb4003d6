"""The edge telling the truth, continued (found by the edge review, fixed outside its files):
what the consumers count applied, what a rebuild and a give-up's reason print of a password,
how a stream cut by Redis ends, and how a held long-poll is measured."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from redis.asyncio import Redis

from consumers.events import EventsConsumer
from consumers.plumbing.metrics import ConsumersCollector, registry_for
from consumers.rebuild import NotEmpty, rebuild
from consumers.rebuild import run as rebuild_run
from core import keys
from core.codec import Event
from core.connections import open_producer
from core.logs import scrub
from core.retry import GaveUp, describe
from core.settings import BadSetting, Settings
from dhub.config import resolve
from tests.cache_support import PIPELINE, cached_api, direct_store, engines, new_batches, proxied
from tests.conftest import PrivateRedis, eventually
from tests.helpers import STATIC_TOKEN, api_client, spec_body
from tests.test_consumers_support import committed, make_spec, new_batch, options, running, unique


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis", "kafka")


async def test_events_dead_lettered_are_not_counted_applied(topics: Settings, redis: Redis) -> None:
    """A poll in which one batch's data breaks the apply script (here WRONGTYPE: its dedup
    key is not a zset) is applied batch by batch and that batch's 3 events go to the dead
    letters; `dhub_events_applied` still counted them applied (12 for 9). Root cause:
    consumers/events.py `_effect` added `len(events)` after `_apply_one_by_one` (now
    consumers/plumbing/polls.py `apply_by_batch`), which moved
    the failing batch's events to `bad`."""
    pipeline_id = unique("edge")
    spec = make_spec(pipeline_id)
    batch_ids = [await new_batch(redis, topics, pipeline_id, spec) for _ in range(4)]
    broken = batch_ids[1]
    await redis.set(keys.batch_seen(pipeline_id, broken), "not a zset")
    events = [e for b in batch_ids for e in (
        Event("batch.state", b, pipeline_id, state="running"),
        Event("step.offsets", b, pipeline_id, step="extract", offsets={"p0": 7}),
        Event("step.state", b, pipeline_id, step="extract", state="success"))]
    producer = await open_producer(topics)
    try:
        # One partition: the whole stream in one poll, the broken batch among the others.
        futures = [await producer.send(topics.topic_events, value=e.encode(), key=b"k",
                                       partition=0) for e in events]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    consumer = EventsConsumer(topics, options())
    async with running(consumer):
        async def done() -> bool:
            return await committed(topics, topics.group_events, topics.topic_events) >= 12
        await eventually(done, timeout=30, interval=0.1)
        assert consumer.dead == 3
        text = generate_latest(registry_for(ConsumersCollector([consumer]))).decode()
    assert "dhub_events_applied_total 9.0" in text, [
        line for line in text.splitlines() if line.startswith("dhub_events_applied")]


async def test_the_rebuild_refusal_does_not_print_the_redis_password(
        topics: Settings, private_redis: PrivateRedis) -> None:
    """`python -m consumers.rebuild` onto a database that is not empty printed "rebuild
    refused: redis://:<password>@host:port/0 is not empty ..." to the operator's terminal
    and whatever collects it. Root cause: consumers/rebuild.py:143 formats
    `settings.redis_url` itself (the runner and `--compare-with` use core.logs.scrub)."""
    secret = "edge-review-redis-password-0123"
    admin = Redis(port=private_redis.port)
    try:
        await admin.set("left-over", "1")
        await admin.config_set("requirepass", secret)
    finally:
        await admin.aclose()
    settings = topics.model_copy(update={
        "redis_url": f"redis://:{secret}@127.0.0.1:{private_redis.port}/0"})
    with pytest.raises(NotEmpty) as info:
        await rebuild(settings)
    assert secret not in str(info.value)


async def test_a_stream_cut_by_a_redis_error_sends_no_second_response(
        test_settings: Settings, redis: Redis) -> None:
    """A batch stream whose periodic read from Redis fails (Redis gone mid-stream: the
    feed down, the stream re-reads every DEGRADED_POLL_S) raised RedisConnectionError out of
    the handler after its 200 and events were sent; the edge middleware answered it with a
    503 JSON *response*, which aiohttp wrote as raw bytes into the open chunked body
    ("HTTP/1.1 503 Service Unavailable ..." where a chunk size belongs): a protocol error
    for every client (EventSource, httpx), and /metrics counted a plain `get_batch` 503
    instead of the stream. Root cause: service/streams.py `stream_batch` catches only
    ConnectionError/TimeoutError after `prepare`, and service/errors.py `edge_middleware`
    turns any later exception into a new response. Fix: after `prepare`, a stream ends
    on any exception (transport closed, logged), never answered again."""
    store = direct_store(redis, test_settings)
    [batch_id] = await new_batches(store)
    async with proxied(test_settings) as (proxy, through), cached_api(through) as api:
        url = api.make_url(f"/api/v1/batches/{PIPELINE}/{batch_id}")
        reader, writer = await asyncio.open_connection(url.host, url.port)
        try:
            writer.write((f"GET {url.path} HTTP/1.1\r\nHost: api\r\n"
                          f"Authorization: Bearer {STATIC_TOKEN}\r\n"
                          "Accept: text/event-stream\r\n\r\n").encode())
            data = b""
            while b"event: batch" not in data:
                data += await reader.read(65536)
            await proxy.stop()  # Redis unreachable from the API from now on
            async with asyncio.timeout(20):
                while b"HTTP/1.1 5" not in data.split(b"\r\n\r\n", 1)[1]:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break  # the stream was closed: what a cut stream should do
                    data += chunk
        finally:
            writer.close()
    assert data.count(b"HTTP/1.1 ") == 1, data.decode(errors="replace")


async def test_a_held_long_poll_is_not_counted_as_a_slow_get(
        test_settings: Settings, redis: Redis) -> None:
    """A long-poll GET (`If-None-Match` + `?wait=`; `dhub watch --no-stream` holds one for
    up to 30 s) was observed in `dhub_http_request_duration_seconds{route="get_batch"}` with
    the time it was held: one watcher made the GET's latency histogram say requests take
    seconds (a p99 alert on it fires for no slow request). Push streams have their own
    series (`get_batch.stream`); held GETs need one too. Root cause: service/errors.py
    `edge_middleware` labels every plain Response by its route alone (the observation has no
    way to tell a held answer), so service/metrics.py cannot separate them."""
    store = direct_store(redis, test_settings)
    [batch_id] = await new_batches(store)
    auth = {"Authorization": f"Bearer {STATIC_TOKEN}"}
    path = f"/api/v1/batches/{PIPELINE}/{batch_id}"
    async with cached_api(test_settings) as api:
        etag = (await api.get(path, headers=auth)).headers["ETag"]
        held = await api.get(path + "?wait=1", headers={**auth, "If-None-Match": etag})
        assert held.status == 304
        text = await (await api.get("/metrics", headers=auth)).text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    slow = [s for s in families["dhub_http_request_duration_seconds"].samples
            if s.name.endswith("_bucket") and s.labels["route"] == "get_batch"
            and s.labels["le"] == "0.5"]
    counts = {s.labels["status"]: s.value for s in families[
        "dhub_http_request_duration_seconds"].samples
        if s.name.endswith("_count") and s.labels["route"] == "get_batch"}
    # Every plain get_batch answer under half a second: the held one is not among them.
    assert all(sample.value == counts[sample.labels["status"]] for sample in slow), counts


def test_a_give_ups_reason_does_not_quote_the_prefect_password() -> None:
    """A command given up after Prefect errors gets the reason `run failed: <describe(exc)>`,
    which goes to the batch (GET shows it as `reason` to any reader token) and to the dead
    letter's reason header (kept on the topic). httpx and Prefect's client quote the request's
    URL in their errors, so with DHUB_PREFECT_API_URL=http://user:<password>@host/api the
    password reaches an API answer and Kafka (log lines are scrubbed since core.logs.scrub).
    Root cause: core/retry.py `describe` (and `GaveUp`) use the error's text as is; fix:
    pass it through core.logs.scrub (or its regex) there."""
    request = httpx.Request("POST", "http://ops:pw-s3cret@prefect:4200/api/deployments/x/"
                                    "create_flow_run")
    cause = httpx.HTTPStatusError(
        f"Client error '422 Unprocessable Entity' for url '{request.url}'", request=request,
        response=httpx.Response(422, request=request))
    reason = f"run failed: {describe(GaveUp('run p/b', 8, cause))}"
    assert "s3cret" not in reason


async def test_the_rebuilds_redis_url_is_checked_like_dhub_redis_url(
        stack: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m consumers.rebuild --redis-url redis://host:6379/rebuilt` (a fresh database
    for a dry run) goes through `model_copy`, which runs no validator: the path that is not
    a database number is silently database 0 -- the live one (with --force, written into).
    Port 1: nothing listens, so the test never touches a real database."""
    with pytest.raises(BadSetting):
        await rebuild_run(["--redis-url", "redis://127.0.0.1:1/rebuilt"], settings=stack)


async def test_a_token_the_api_accepts_is_not_refused_by_the_cli(topics: Settings) -> None:
    """The API takes any static token (DHUB_API_TOKEN/DHUB_API_TOKENS) whose header is ASCII:
    `Bearer team token 2026` partitions at the first space, and the rest is the token.
    `dhub` now refuses such a token before sending it (`check_token`: "!" to "~" only), so
    a token that worked yesterday with every client now stops `dhub` with 'copy the token
    again'. The test's own API, configured with that token, takes it (201)."""
    token = "team token 2026"
    async with api_client(topics.model_copy(update={"api_tokens": [SecretStr(token)]})) as api:
        answer = await api.put("/api/v1/pipelines/p", json=spec_body(),
                               headers={"Authorization": f"Bearer {token}"})
        assert answer.status == 201, await answer.text()
    target = resolve(env={"DHUB_TOKEN": token, "DHUB_URL": "http://127.0.0.1:8080"})
    assert target.token == token


@pytest.mark.parametrize("text", [
    "connect failed for 'redis://:p@ss-s3cret@db:6379/0'",  # an `@` left unencoded
    "connect failed for 'redis://db:6379/0?password=s3cret&db=1' (retry 1/5)",
    "GET https://prefect/api?token=s3cret&limit=5 answered 503",
])
def test_a_url_quoted_in_a_message_loses_every_password(text: str) -> None:
    """`scrub` (every log line, every give-up's reason) masked the userinfo password up to
    its first `@` only, and never a query's secret (`?password=`, a form redis-py takes);
    the URL masking of the day (URLs logged on purpose) masked both."""
    scrubbed = scrub(text)
    assert "s3cret" not in scrubbed, scrubbed
    assert "db=1" in scrubbed or "db=1" not in text
    assert "limit=5" in scrubbed or "limit=5" not in text
