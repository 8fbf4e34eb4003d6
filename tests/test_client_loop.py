"""The original document's polling client, ported, against the API while the batch's state is
driven through the event-applying function (the path the events consumer takes)."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

from core.codec import Event
from core.settings import Settings
from service.appkeys import STORE
from tests.helpers import AUTH, api_client, api_settings, spec_body


async def poll_batch_status(api: Any, pipeline_id: str, batch_id: str, out: list[str],
                            interval: float = 0.02) -> None:
    """`pollBatchStatus` of the original document, line for line (interval shortened)."""
    while True:
        response = await api.get(f"/api/v1/batches/{pipeline_id}/{batch_id}", headers=AUTH)
        batch = await response.json()
        out.append(f"Batch state: {batch['state']['state']}")
        for step_name, step_state in batch["state"]["steps"].items():
            out.append(f" {step_name}: {step_state['state']}")
        all_done = all(s["state"] in ("success", "failed") for s in batch["state"]["steps"].values())
        if all_done or batch["state"]["state"] == "stop":
            out.append("Batch completed")
            break
        await asyncio.sleep(interval)


async def test_the_documented_client_follows_a_batch_to_completion(topics: Settings, redis: Redis) -> None:
    async with api_client(api_settings(topics)) as api:
        await api.put("/api/v1/pipelines/pipeline-sales", json=spec_body(), headers=AUTH)
        batch_id = (await (await api.post("/api/v1/batches/pipeline-sales", headers=AUTH)).json())["item"]
        store = api.app[STORE]
        printed: list[str] = []
        client = asyncio.create_task(poll_batch_status(api, "pipeline-sales", batch_id, printed))

        async def drive(line: str, *events: Event) -> None:
            await store.apply(list(events))
            # Wait until the client has printed the effect: the GET cache must not hide it.
            deadline = asyncio.get_running_loop().time() + 5
            while line not in printed[-4:]:
                assert asyncio.get_running_loop().time() < deadline, f"client never saw {line!r}"
                await asyncio.sleep(0.01)

        def ev(kind: str, **fields: Any) -> Event:
            return Event(kind, batch_id, "pipeline-sales", **fields)

        await drive("Batch state: scheduled", ev("batch.state", state="scheduled", flow_run_id="fr"))
        await drive("Batch state: running", ev("batch.state", state="running"),
                    *(ev("step.state", step=s, state="pending") for s in ("extract", "transform", "load")))
        for step in ("extract", "transform", "load"):
            await drive(f" {step}: running", ev("step.state", step=step, state="running"),
                        ev("step.offsets", step=step, offsets={"partition_0": 500}))
            if step != "load":
                await drive(f" {step}: success", ev("step.state", step=step, state="success"))
        await store.apply([ev("step.state", step="load", state="success"),
                           ev("batch.state", state="stop", outcome="completed")])
        await asyncio.wait_for(client, 5)

    assert printed[-1] == "Batch completed"
    assert printed[-5:-1] in (
        ["Batch state: stop", " extract: success", " transform: success", " load: success"],
        ["Batch state: running", " extract: success", " transform: success", " load: success"],
    )
    states = [line.split(": ")[1] for line in printed if line.startswith("Batch state")]
    order = ["pending", "scheduled", "running", "stop"]
    assert [order.index(s) for s in states] == sorted(order.index(s) for s in states)
    final = await (await _get(topics, batch_id)).json()
    assert final["state"]["steps"]["load"]["offsets"] == {"partition_0": 500}


async def _get(settings: Settings, batch_id: str) -> Any:
    async with api_client(api_settings(settings)) as api:
        response = await api.get(f"/api/v1/batches/pipeline-sales/{batch_id}", headers=AUTH)
        await response.read()
        return response
