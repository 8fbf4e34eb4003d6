"""GET /metrics (Prometheus text, behind the metrics:read scope) and the API's JSON log lines."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest
from aiohttp.test_utils import make_mocked_request
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from core.logs import JsonFormatter
from core.settings import Settings
from service.request_log import CURRENT_REQUEST, REQUEST_ID, RequestContext
from tests.cache_support import PIPELINE, cached_api, direct_store, engines, new_batches
from tests.helpers import AUTH, bearer
from tests.test_api_auth import hs_token


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis")


async def test_metrics_need_their_scope_and_count_requests_by_route(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    async with cached_api(test_settings) as api:
        assert (await api.get("/metrics")).status == 401
        assert (await api.get("/metrics", headers=bearer(hs_token("batches:read")))).status == 403
        for _ in range(3):
            assert (await api.get(f"/api/v1/batches/{PIPELINE}/{target}", headers=AUTH)).status == 200
        assert (await api.get(f"/api/v1/batches/{PIPELINE}/batch-none", headers=AUTH)).status == 404
        response = await api.get("/metrics", headers=bearer(hs_token("metrics:read")))
        assert response.status == 200
        families = {f.name: f for f in text_string_to_metric_families(await response.text())}
        assert all(name.startswith("dhub_") for name in families)
        counts = {(s.labels["route"], s.labels["status"]): s.value
                  for s in families["dhub_http_request_duration_seconds"].samples
                  if s.name.endswith("_count")}
        assert counts[("get_batch", "200")] == 3 and counts[("get_batch", "404")] == 1
        assert counts[("metrics", "401")] == 1 and counts[("metrics", "403")] == 1
        [hits] = families["dhub_cache_hits"].samples
        assert hits.value >= 2  # the first GET filled the cache
        assert {s.labels["kind"] for s in families["dhub_open_streams"].samples} == {
            "long_poll", "batch_stream", "pipeline_stream"}


async def test_a_get_held_by_wait_is_timed_in_a_series_of_its_own(
        test_settings: Settings, redis: Redis) -> None:
    """A long-poll's latency is its wait: counted with the plain GETs, it would read as a
    slow GET."""
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    async with cached_api(test_settings) as api:
        path = f"/api/v1/batches/{PIPELINE}/{target}"
        etag = (await api.get(path, headers=AUTH)).headers["ETag"]
        held = await api.get(path + "?wait=1", headers={**AUTH, "If-None-Match": etag})
        assert held.status == 304
        at_once = await api.get(path, headers={**AUTH, "If-None-Match": etag})
        assert at_once.status == 304
        response = await api.get("/metrics", headers=bearer(hs_token("metrics:read")))
        families = {f.name: f for f in text_string_to_metric_families(await response.text())}
        counts = {(s.labels["route"], s.labels["status"]): s.value
                  for s in families["dhub_http_request_duration_seconds"].samples
                  if s.name.endswith("_count")}
        assert counts[("get_batch.held", "304")] == 1
        assert counts[("get_batch", "304")] == 1 and counts[("get_batch", "200")] == 1


def test_a_log_line_written_for_a_request_names_it() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestContext())
    logger = logging.getLogger("test.request_log")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        request = make_mocked_request("GET", "/api/v1/batches/p1/b1",
                                      match_info={"pipeline_id": "p1", "batch_id": "b1"})
        request[REQUEST_ID] = "rid-1"
        token = CURRENT_REQUEST.set(request)
        try:
            logger.warning("inside")
        finally:
            CURRENT_REQUEST.reset(token)
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
    inside, outside = (orjson.loads(line) for line in out.getvalue().splitlines())
    assert (inside["request_id"], inside["pipeline_id"], inside["batch_id"]) == ("rid-1", "p1", "b1")
    assert inside["msg"] == "inside" and "request_id" not in outside
