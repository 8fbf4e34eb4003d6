"""The same event stream delivered again, replayed or shuffled, on a real Redis: the batches
end as the in-order delivery leaves them (within what the rules make order-independent).

What the rules of APPLY_EVENTS guarantee, and what each scenario asserts:
- replayed suffixes (a consumer that crashed re-reads from its last commit; Kafka keeps one
  batch's order): the rendered batch equals the in-order one in full, because every rule is
  monotone (state rank, step rank, offsets max, first stop and flow run id kept) and the
  first delivery of every event still comes in order;
- any order (the stream doubled and fully shuffled): a batch's state is the highest rank
  sent, a step's state the highest rank sent (one final state per step), every offset the
  maximum sent, the outcome and reason those of the stop with the greatest `ts` (racing
  stops, a user's cancel against the engine's end, included); so the rendered batch equals
  the in-order one in full.
Each delivery goes through `BatchStore.apply` per poll (which merges a poll's offsets per
batch and step), as the consumer does.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.asyncio import Redis

from core.codec import Event
from core.scripts import Scripts
from core.store import BatchStore
from tests.test_consumers_support import make_spec, new_batch, store_for, unique

STEPS = ("extract", "transform", "load")
PARTITIONS = ("partition_0", "partition_1", "partition_2")


@dataclass(frozen=True)
class Sent:
    """One event as produced, before it is addressed to a pipeline (same id everywhere)."""

    batch: int
    type: str
    fields: tuple[tuple[str, Any], ...]
    ts: float
    event_id: str = field(default_factory=lambda: unique("ev"))

    def to(self, pipeline_id: str, batch_ids: list[str]) -> Event:
        return Event(self.type, batch_ids[self.batch], pipeline_id, event_id=self.event_id,
                     ts=self.ts, **dict(self.fields))


def one_batch(rng: random.Random, n: int) -> list[Sent]:
    """A batch's life as the bridge and the step publisher emit it, with duplicates
    (re-sent events, same id), older offsets sent after newer ones (fresh ids), late state
    events, and sometimes a racing stop of another outcome, sent last but emitted (its ts)
    before or after the engine's end."""
    out: list[Sent] = []
    clock = [1_760_000_000.0 + 1000 * n]

    def send(kind: str, ts: float | None = None, **fields: Any) -> Sent:
        clock[0] += rng.uniform(0.000_001, 0.5)
        sent = Sent(n, kind, tuple(sorted(fields.items())), clock[0] if ts is None else ts)
        out.append(sent)
        return sent

    send("batch.state", state="scheduled", flow_run_id=str(uuid.uuid5(uuid.NAMESPACE_URL, str(n))))
    send("batch.state", state="running")
    failed_at = rng.choice([*STEPS, None, None])
    for step in STEPS:
        send("step.state", step=step, state="pending")
        running = send("step.state", step=step, state="running")
        reached = {p: 0 for p in PARTITIONS}
        history: list[Sent] = []
        for _ in range(rng.randint(1, 6)):
            parts = rng.sample(PARTITIONS, rng.randint(1, len(PARTITIONS)))
            for p in parts:
                reached[p] += rng.randint(1, 10_000)
            history.append(send("step.offsets", step=step,
                                offsets={p: reached[p] for p in parts}))
            if len(history) > 1 and rng.random() < 0.5:
                # A producer retry re-sends an older event as is (same id), after a newer one.
                out.append(history[-2] if rng.random() < 0.7 else rng.choice(history))
            if rng.random() < 0.3:  # a restarted task reports an older position anew
                old = rng.choice(history)
                send("step.offsets", step=step, offsets=dict(dict(old.fields)["offsets"]))
        if len(history) > 1 and rng.random() < 0.6:
            out.append(history[-2])  # the step's last position, followed by an older re-send
        if rng.random() < 0.3:
            out.append(running)
        send("step.state", step=step, state="failed" if step == failed_at else "success")
        if step == failed_at:
            break
    if failed_at:
        end = send("batch.state", state="stop", outcome="failed", reason=f"{failed_at} failed")
    else:
        end = send("batch.state", state="stop", outcome="completed")
    if rng.random() < 0.4:  # a user's stop, emitted before (it lost) or after the end
        send("batch.state", state="stop", outcome="cancelled", reason="stopped by user",
             ts=end.ts + rng.choice((-1, 1)) * rng.uniform(0.000_001, 5))
    if rng.random() < 0.3:
        send("batch.state", state="running")  # a late, stale state event
    return out


def interleave(rng: random.Random, streams: list[list[Sent]]) -> list[Sent]:
    """One partition's view: batches interleaved, each batch's own order kept."""
    cursors = [0] * len(streams)
    out: list[Sent] = []
    live = [i for i, s in enumerate(streams) if s]
    while live:
        i = rng.choice(live)
        out.append(streams[i][cursors[i]])
        cursors[i] += 1
        if cursors[i] == len(streams[i]):
            live.remove(i)
    return out


def replayed(rng: random.Random, stream: list[Sent], crashes: int) -> list[Sent]:
    """Delivered with `crashes` restarts, each re-reading from an earlier commit, then the
    whole stream once more (a consumer group reset to the beginning)."""
    out: list[Sent] = []
    position = 0
    for crash_at in sorted(rng.sample(range(1, len(stream)), crashes)):
        out += stream[position:crash_at]
        position = rng.randint(0, crash_at)  # the last commit before the crash
    return out + stream[position:] + stream


def polls(rng: random.Random, stream: list[Sent]) -> list[list[Sent]]:
    out, i = [], 0
    while i < len(stream):
        size = rng.choice((1, 2, 5, 17, 60, 200))
        out.append(stream[i:i + size])
        i += size
    return out


async def deliver(store: BatchStore, pipeline_id: str, batch_ids: list[str],
                  rng: random.Random, stream: list[Sent]) -> dict[str, dict[str, Any]]:
    for poll in polls(rng, stream):
        await store.apply([s.to(pipeline_id, batch_ids) for s in poll])
    rendered = {}
    for batch_id in batch_ids:
        batch = await store.get(pipeline_id, batch_id)
        assert batch is not None
        # When and where, not what: the only fields allowed to differ.
        for name in ("pipeline_id", "created_at", "updated_at", "deployment", "name"):
            batch.pop(name)
        # A step's progress (rate, ETA, stalled) is measured in wall-clock time between
        # deliveries, not derived from the events' content.
        for step in batch["state"]["steps"].values():
            step.pop("progress", None)
            step.pop("stalled", None)
        batch["state"].pop("stalled", None)
        rendered[batch_id] = batch
    return rendered


@pytest.mark.parametrize("seed", range(6))
async def test_a_stream_delivered_twice_replayed_or_shuffled_ends_as_in_order(
        seed: int, redis: Redis, test_settings: Any) -> None:
    rng = random.Random(seed)
    streams = [one_batch(rng, n) for n in range(20)]
    stream = interleave(rng, streams)
    assert len(stream) > 250

    runs: dict[str, dict[str, dict[str, Any]]] = {}
    batch_ids: list[str] = []
    for name in ("in-order", "replayed", "shuffled"):
        pipeline_id = unique(name)
        spec = make_spec(pipeline_id)
        if not batch_ids:
            batch_ids = [await new_batch(redis, test_settings, pipeline_id, spec)
                         for _ in streams]
        else:  # the same batch ids under another pipeline
            store = store_for(redis, test_settings)
            for batch_id in batch_ids:
                await store.create(pipeline_id, batch_id, spec)
        if name == "in-order":
            store = store_for(redis, test_settings)
            delivery = stream
        else:
            # A window smaller than a batch's events: by-value rules, not remembered ids,
            # are what keep re-deliveries harmless.
            store = BatchStore(redis, Scripts(redis), token_secret=b"t", dedup_window=4)
            delivery = (replayed(rng, stream, crashes=3) if name == "replayed"
                        else rng.sample(stream + stream, 2 * len(stream)))
        runs[name] = await deliver(store, pipeline_id, batch_ids, rng, delivery)

    in_order, shuffled = runs["in-order"], runs["shuffled"]
    for n, batch_id in enumerate(batch_ids):
        want = expected(streams[n])
        got = in_order[batch_id]
        assert (got["state"], got["outcome"], got["reason"], got["flow_run_id"]) == want, n
    assert runs["replayed"] == in_order
    for n, batch_id in enumerate(batch_ids):
        assert shuffled[batch_id] == in_order[batch_id], f"batch {n}"
    # Both ways of a race were delivered: a cancel that won and one that lost.
    raced = [n for n, s in enumerate(streams)
             if sum(dict(e.fields).get("state") == "stop" for e in s) == 2]
    assert {in_order[batch_ids[n]]["outcome"] == "cancelled" for n in raced} == {True, False}


BATCH_RANK = {"pending": 0, "scheduled": 1, "running": 2, "stop": 3}
STEP_RANK = {"none": 0, "pending": 1, "running": 2, "success": 3, "failed": 3}


def expected(stream: list[Sent]) -> tuple[dict[str, Any], str | None, str | None, str | None]:
    """The rules applied in order, in Python: the batch's state (steps and offsets), outcome,
    reason and flow run id; outcome and reason are the greatest-ts stop's (ties: first)."""
    state, outcome, reason, flow_run_id = "pending", None, None, None
    stop_ts = float("-inf")
    steps: dict[str, dict[str, Any]] = {s: {"state": "none", "offsets": {}} for s in STEPS}
    for sent in stream:
        f = dict(sent.fields)
        if sent.type == "batch.state":
            if BATCH_RANK[f["state"]] > BATCH_RANK[state]:
                state = f["state"]
            if f["state"] == "stop" and sent.ts > stop_ts:
                stop_ts = sent.ts
                outcome, reason = f.get("outcome", "completed"), f.get("reason")
            flow_run_id = flow_run_id or f.get("flow_run_id")
        elif sent.type == "step.state":
            if STEP_RANK[f["state"]] > STEP_RANK[steps[f["step"]]["state"]]:
                steps[f["step"]]["state"] = f["state"]
        else:
            offsets = steps[f["step"]]["offsets"]
            for p, v in f["offsets"].items():
                offsets[p] = max(offsets.get(p, -1), v)
    return {"state": state, "steps": steps}, outcome, reason, flow_run_id
