"""The routes that change state refuse a query parameter they do not take, as the list and
the latest batch do (`service.query_params.refuse_unknown`). A POST with a misspelt
`version=1` (or `pipelineVersion=1`) ignored it and ran the latest version, not the one
asked for; the stop, resume, delete and pipeline registration ignored theirs too."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from core import keys
from core.settings import Settings
from tests.helpers import AUTH, api_client, api_settings, spec_body
from tests.test_consumers_support import unique


@pytest.mark.parametrize("query", ["version=1", "pipelineVersion=1", "pipeline-version=1"])
async def test_a_misspelt_pipeline_version_is_refused_not_run_on_the_latest(
        topics: Settings, redis: Redis, query: str) -> None:
    p = unique("test-post-q")
    async with api_client(api_settings(topics)) as api:
        for version in ("1", "2"):
            r = await api.put(f"/api/v1/pipelines/{p}", headers=AUTH,
                              json=spec_body(name=p, version=version))
            assert r.status == 201, await r.text()
        r = await api.post(f"/api/v1/batches/{p}?{query}", headers=AUTH)
        body = await r.json()
        assert r.status == 400, f"{query}: {r.status} {body}"
        assert "unknown query parameter" in body["error"]["message"], body
        assert await redis.zcard(keys.batch_index(p)) == 0  # nothing created
        # The right name, and a cache-buster, still work.
        r = await api.post(f"/api/v1/batches/{p}?pipeline_version=1&_=17", headers=AUTH)
        assert r.status == 200, await r.text()


async def test_every_write_refuses_a_query_parameter_it_does_not_take(
        topics: Settings, redis: Redis) -> None:
    p = unique("test-write-q")
    async with api_client(api_settings(topics)) as api:
        r = await api.put(f"/api/v1/pipelines/{p}?force=1", headers=AUTH,
                          json=spec_body(name=p, version="1"))
        assert r.status == 400, await r.text()
        assert not await redis.exists(keys.pipeline_order(p))
        r = await api.put(f"/api/v1/pipelines/{p}", headers=AUTH,
                          json=spec_body(name=p, version="1"))
        assert r.status == 201, await r.text()
        batch_id = (await (await api.post(f"/api/v1/batches/{p}", headers=AUTH)).json())["item"]
        for method, path in (("PUT", f"/api/v1/batches/{p}/{batch_id}/stop?force=1"),
                             ("POST", f"/api/v1/batches/{p}/{batch_id}/resume?from=extract"),
                             ("DELETE", f"/api/v1/batches/{p}/{batch_id}?purge=1")):
            r = await api.request(method, path, headers=AUTH)
            assert r.status == 400, (method, path, r.status, await r.text())
        fields = await redis.hgetall(keys.batch(p, batch_id))
        assert fields["state"] == "pending" and "deleted" not in fields, fields
