"""The pipeline registry's answers: a PUT whose version is registered (its durable record on
the pipelines topic, then Redis) says so, though the deploy command after it could not be
queued; the run ensures the deployment itself."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from core.command_messages import Command
from core.settings import Settings
from service.appkeys import COMMANDS
from service.command_sender import Ambiguous, Refused
from tests.helpers import AUTH, api_client, api_settings, spec_body


@pytest.mark.parametrize("failure", [Refused, Ambiguous])
async def test_a_put_whose_deploy_command_failed_after_registering_says_registered(
        topics: Settings, redis: Redis, failure: type[Exception]) -> None:
    """The commands topic refused (or did not confirm) the deploy command of v2, sent after
    v2 was recorded and registered: the PUT answered 503 ("retry later"), yet GET showed v2
    as the latest and a POST ran its batch on v2, a version its client was told was not
    registered. Now the PUT answers 201."""
    async with api_client(api_settings(topics)) as api:
        resp = await api.put("/api/v1/pipelines/p", json=spec_body(version="1"), headers=AUTH)
        assert resp.status == 201
        sender = api.app[COMMANDS]
        real_command = sender.command

        async def deploy_fails(command: Command, *args: Any, **kwargs: Any) -> None:
            if command.type == "deploy":
                raise failure("deploy") if failure is Ambiguous else failure()
            await real_command(command, *args, **kwargs)

        sender.command = deploy_fails
        try:
            resp = await api.put("/api/v1/pipelines/p", json=spec_body(version="2"),
                                 headers=AUTH)
            body = await resp.json()
            assert resp.status == 201, body
            assert body["created"] is True and body["latest"] == "2"
            # A retry (the version unchanged) says the same, not 503.
            resp = await api.put("/api/v1/pipelines/p", json=spec_body(version="2"),
                                 headers=AUTH)
            assert resp.status == 200 and (await resp.json())["latest"] == "2"
        finally:
            del sender.command  # the class's method again
        pipeline = await (await api.get("/api/v1/pipelines/p", headers=AUTH)).json()
        assert pipeline["latest"] == "2"
        resp = await api.post("/api/v1/batches/p", headers=AUTH)
        assert resp.status == 200
        batch_id = (await resp.json())["item"]
        batch = await (await api.get(f"/api/v1/batches/p/{batch_id}", headers=AUTH)).json()
        assert batch["pipeline_version"] == "2"
