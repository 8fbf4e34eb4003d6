"""What clients see during a fault: a poller of GET that flags anything going backwards,
every 5xx and every slow or non-JSON answer, and the figures each scenario prints."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.chaos.streams import Series, offsets_of

BATCH_RANK = {"pending": 0, "scheduled": 1, "running": 2, "stop": 3}
STEP_RANK = {"none": 0, "pending": 1, "running": 2, "success": 3, "failed": 3}


def client(api: str, token: str, timeout: float = 15.0, connections: int = 200) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=api, headers={"Authorization": f"Bearer {token}"},
                             timeout=timeout, limits=httpx.Limits(max_connections=connections))


def is_json(response: httpx.Response) -> bool:
    if not response.headers.get("content-type", "").startswith("application/json"):
        return False
    try:
        response.json()
    except ValueError:
        return False
    return True


@dataclass
class Poller:
    """GETs every batch `hz` times a second. A regression is any offset lower than one seen
    before (or gone), any batch or step state of a lower rank than one seen before."""

    http: httpx.AsyncClient
    pipeline_id: str
    batch_ids: list[str]
    hz: float = 5.0
    allowed: frozenset[int] = frozenset({200})
    statuses: Counter[int] = field(default_factory=Counter)
    regressions: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # status not allowed, non-JSON, transport error
    slowest = 0.0
    rounds = 0
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (monotonic end, status)
    _offsets: dict[Series, int] = field(default_factory=dict)
    _states: dict[str, int] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _span: tuple[float, float] = (0.0, 0.0)

    async def __aenter__(self) -> Poller:
        self._span = (time.monotonic(), 0.0)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._span = (self._span[0], time.monotonic())

    async def _run(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.gather(*(self._one(b) for b in self.batch_ids))
            self.rounds += 1
            await asyncio.sleep(max(0.0, 1 / self.hz - (time.monotonic() - t0)))

    async def _one(self, batch_id: str) -> None:
        t0 = time.monotonic()
        try:
            response = await self.http.get(f"/api/v1/batches/{self.pipeline_id}/{batch_id}")
        except httpx.HTTPError as exc:
            self.slowest = max(self.slowest, time.monotonic() - t0)
            self.statuses[0] += 1
            self.timeline.append((time.monotonic(), 0))
            self.bad.append(f"{batch_id}: {type(exc).__name__} after {time.monotonic() - t0:.1f}s")
            return
        self.slowest = max(self.slowest, time.monotonic() - t0)
        self.statuses[response.status_code] += 1
        self.timeline.append((time.monotonic(), response.status_code))
        if response.status_code not in self.allowed or not is_json(response):
            self.bad.append(f"{batch_id}: {response.status_code} {response.text[:200]!r}")
            return
        if response.status_code == 200:
            self.observe(batch_id, response.json())

    def observe(self, batch_id: str, body: dict[str, Any]) -> None:
        now = offsets_of(body, batch_id)
        for key, before in list(self._offsets.items()):
            if key[0] == batch_id and now.get(key, -1) < before:
                self.regressions.append(f"{key}: {before} -> {now.get(key)}")
        self._offsets.update(now)
        ranks = {batch_id: BATCH_RANK[body["state"]["state"]]}
        ranks |= {f"{batch_id}/{s}": STEP_RANK[e["state"]] for s, e in body["state"]["steps"].items()}
        for name, rank in ranks.items():
            if rank < self._states.get(name, -1):
                self.regressions.append(f"{name}: state rank {self._states[name]} -> {rank}")
            self._states[name] = max(rank, self._states.get(name, -1))

    def server_errors(self) -> int:
        """5xx answers other than the allowed ones (a 503 JSON is allowed during an outage)."""
        return sum(n for status, n in self.statuses.items()
                   if status >= 500 and status not in self.allowed)

    def describe(self) -> str:
        achieved = self.rounds / max(1e-9, self._span[1] - self._span[0])
        return (f"{self.rounds} rounds x {len(self.batch_ids)} GETs ({achieved:.1f} Hz achieved, "
                f"{self.hz:g} Hz asked), "
                f"statuses {dict(sorted(self.statuses.items()))}, slowest {self.slowest:.2f}s, "
                f"{len(self.regressions)} regressions, {len(self.bad)} bad answers")


async def read_offsets(http: httpx.AsyncClient, pipeline_id: str,
                       batch_ids: list[str]) -> dict[Series, int]:
    found: dict[Series, int] = {}
    for batch_id in batch_ids:
        response = await http.get(f"/api/v1/batches/{pipeline_id}/{batch_id}")
        response.raise_for_status()
        found |= offsets_of(response.json(), batch_id)
    return found


async def settle_offsets(http: httpx.AsyncClient, pipeline_id: str, batch_ids: list[str],
                         expected: dict[Series, int], timeout: float) -> tuple[dict[Series, int], float]:
    """Polls until every series shows its expected value (or time runs out); returns the
    last reading and how long it took."""
    t0 = time.monotonic()
    while True:
        seen = await read_offsets(http, pipeline_id, batch_ids)
        if all(seen.get(k) == v for k, v in expected.items()) or time.monotonic() - t0 > timeout:
            return seen, time.monotonic() - t0
        await asyncio.sleep(0.5)


def lost_updates(expected: dict[Series, int], seen: dict[Series, int]) -> list[str]:
    return [f"{k}: expected {v}, shows {seen.get(k)}" for k, v in expected.items()
            if seen.get(k) != v]


def report(title: str, **figures: object) -> None:
    """One block of figures per scenario, in the pytest output (run with -s)."""
    print(f"\n=== {title}")
    for name, value in figures.items():
        print(f"  {name.replace('_', ' ')}: {value}")
