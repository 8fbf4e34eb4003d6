"""A resume's Idempotency-Key retried after the batch holding its data was deleted answers
the key's batch. Was: only a retry whose resumed batch itself was gone tried the replay; the
holder's check (and every other refusal before the key's claim) answered 409 "goes on from
the data of batch A, deleted since", though the key's batch existed and ran. Now any refusal
before the claim first looks for the key's committed batch of the same request, as a run's
retry does (`service.runs.run_batch`)."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio import Redis

from tests.helpers import AUTH
from tests.test_resume_truth import GO_ON, Client, P, api, apply, ev, failed_in, post  # noqa: F401  (api: the fixture)

KEY = {**AUTH, "Idempotency-Key": "resume-of-b-1"}


async def test_a_resume_replay_answers_its_batch_after_its_data_holder_was_deleted(
        api: Client, redis: Redis, tmp_path: Path) -> None:  # noqa: F811
    """A failed half way; B, its resume, was stopped before any step ran (its data is A's).
    C = resume of B with an Idempotency-Key (the answer lost); C goes on from A's data,
    runs (takes the files over) and stops; A is then deleted (no live resume). The client's
    retry of the same key answers C, the key's batch, as a replay does when the resumed
    batch itself is deleted."""
    a = await failed_in(api, redis, tmp_path, "transform")
    status, body = await post(api, f"/api/v1/batches/{P}/{a}/resume", json=GO_ON)
    assert status == 200, body
    b = body["item"]
    await apply(redis, b, ev("batch.state", state="stop", outcome="cancelled",
                             reason="stopped before it started"))
    resume_b = f"/api/v1/batches/{P}/{b}/resume"
    response = await api.post(resume_b, headers=KEY)
    first = await response.json()
    assert response.status == 200, first
    c = first["item"]
    shown = await (await api.get(f"/api/v1/batches/{P}/{c}", headers=AUTH)).json()
    assert shown["resumed_from"] == a
    # C ran (its first step started: A's files taken over) and failed.
    await apply(redis, c, ev("batch.state", state="running"),
                ev("step.state", step="transform", state="running"),
                ev("step.state", step="transform", state="failed"),
                ev("batch.state", state="stop", outcome="failed", reason="again"))
    assert (await api.delete(f"/api/v1/batches/{P}/{a}", headers=AUTH)).status == 200
    # The retry of the lost answer: the key's batch C exists (GET 200).
    assert (await api.get(f"/api/v1/batches/{P}/{c}", headers=AUTH)).status == 200
    response = await api.post(resume_b, headers=KEY)
    again = await response.json()
    assert response.status == 200 and again == first, (response.status, again)
    # Only the key's own request is answered so: another key (or none) is still refused.
    status, body = await post(api, resume_b)
    assert status == 409 and body["error"]["details"] == {"resumed_from": a}, body
    response = await api.post(resume_b, headers={**KEY, "Idempotency-Key": "resume-of-b-2"})
    assert response.status == 409, await response.json()
