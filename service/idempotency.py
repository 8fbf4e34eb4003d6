"""Idempotency-Key as a protocol: one batch per key, and never an id of a batch that will not run.

A key's record (`core.api_scripts`) is `pending` from the moment an attempt claims it until
that attempt's run command is durably queued, then `committed` (kept `idempotency_ttl_s`).
A duplicate that finds it committed gets the same batch id; one that finds it pending waits
a bounded time for the first attempt and then answers `409 in_progress`; a failed attempt
releases the key, so the next retry starts afresh. A commit or release Redis does not take
is tried again while its lease runs: it would answer `in_progress` meanwhile.
The request is compared as the client sent it — the route (a run, or a resume of which
batch), pipeline id, the version asked for (or `latest`, not the version it resolved to) and
the body's meaning (the config overrides, whatever their spacing or key order) — and the
same key with another request is a 409 that says what differs.
An attempt holds its pending record for a lease (`pending_ttl_s`); the record itself lives as
long as a committed one. A retry that finds the lease passed (the attempt's process died:
SIGKILL, OOM) takes the record over with the same batch id and finishes what the dead attempt
left (`service.runs`): the batch created if it is missing, its run command sent again if it
is still pending (a run command twice runs one flow run: Prefect's idempotency key is the
batch id), then the commit. So whatever the dead attempt got done, the key ends with that one
batch, and it runs; a new id would have run a second batch beside a first one whose command
Kafka had already acked, or left the first `pending` for ever.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from core import keys, layout
from core.api_scripts import ApiScripts
from core.retry import RetryPolicy, describe
from service.errors import ApiError, bad_request
from service.request_log import detached

log = logging.getLogger(__name__)
MAX_KEY_LENGTH = 256
LATEST = "latest"


def record_key(header: str) -> str:
    """The Redis key of an Idempotency-Key header value; 400 unless 1-256 printable ASCII."""
    if not 1 <= len(header) <= MAX_KEY_LENGTH or not (header.isascii() and header.isprintable()):
        raise bad_request(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters")
    return keys.idempotency(hashlib.sha256(header.encode()).hexdigest())


# Bodies up to this size are kept in the record, so a 409 can show what the body was.
_SHOWN_BODY = 512


@dataclass(frozen=True, slots=True)
class Sent:
    """A POST as the client sent it; its body compared by meaning (`service.run_body`'s
    canonical text), so the same overrides spelt with other spacing or key order match."""

    pipeline_id: str
    version: str  # as asked for, or LATEST
    body_digest: str  # '' for no overrides
    body: str  # the canonical body, '' for none
    target: str = ""  # '' for a run; `resume <batch id>` for a resume

    @classmethod
    def of(cls, pipeline_id: str, version: str | None, body: str, target: str = "") -> Sent:
        digest = hashlib.sha256(body.encode()).hexdigest()[:32] if body else ""
        return cls(pipeline_id, version if version is not None else LATEST, digest, body, target)

    def record(self, state: str, batch_id: str) -> str:
        data = {"s": state, "b": batch_id, "p": self.pipeline_id, "v": self.version,
                "h": self.body_digest}
        if self.body and len(self.body) <= _SHOWN_BODY:
            data["c"] = self.body
        if self.target:
            data["r"] = self.target
        return orjson.dumps(data).decode()

    def differences(self, earlier: dict[str, Any]) -> dict[str, dict[str, str]]:
        pairs = {"pipeline_id": (earlier.get("p"), self.pipeline_id)}
        if "s" in earlier:
            pairs["request"] = (earlier.get("r", ""), self.target)
            pairs["pipeline_version"] = (earlier.get("v"), self.version)
        # else: a record from before this protocol held the resolved version; the pipeline
        # is all that can be compared.
        differs = {name: {"earlier": str(was), "now": now}
                   for name, (was, now) in pairs.items() if was != now}
        if "s" in earlier and (earlier.get("h") or "") != self.body_digest:
            differs["body"] = {"earlier": _shown(earlier.get("c"), earlier.get("h") or ""),
                               "now": _shown(self.body if len(self.body) <= _SHOWN_BODY
                                             else None, self.body_digest)}
        return differs


def _shown(body: str | None, digest: str) -> str:
    if body is not None:
        return body
    return f"sha256:{digest}" if digest else ""


@dataclass(frozen=True, slots=True)
class Claimed:
    """What a claim found: `owned`, this attempt now finishes `batch_id` (its own new id, or,
    `taken_over`, the id of an attempt whose lease passed); else `batch_id` is the committed
    batch of the same request, to answer as it is."""

    batch_id: str
    owned: bool
    taken_over: bool = False


class IdempotencyKeys:
    def __init__(self, redis: Redis, scripts: ApiScripts, *, ttl_s: int,
                 pending_ttl_s: float = 60.0, wait_s: float = 2.0, poll_s: float = 0.05) -> None:
        self._redis = redis
        self._scripts = scripts
        self._ttl_s = ttl_s
        # The lease: longer than any attempt (resolve, create, a send's timeout, the undo).
        self._pending_ttl_ms = int(pending_ttl_s * 1000)
        self._wait_s = wait_s
        self._poll_s = poll_s
        self._again: set[asyncio.Task[None]] = set()  # transitions Redis did not take yet

    @property
    def lease_ms(self) -> int:
        """How long an attempt holds its pending record (a failed one's undo renews it)."""
        return self._pending_ttl_ms

    async def claim(self, key: str, sent: Sent, attempt: str) -> Claimed:
        """Owned when this attempt now holds the key (pending) with its new id `attempt`, or
        took over an attempt's whose lease passed (its batch id); not owned, the earlier
        batch id when the key was committed for the same request. 409 `conflict` for another
        request, 409 `in_progress` when the first attempt's lease still runs after the wait."""
        deadline = time.monotonic() + self._wait_s
        while True:
            existing = await self._scripts.claim_key(
                keys=[key], args=[sent.record("pending", attempt), self._pending_ttl_ms,
                                  self._ttl_s])
            if existing is None:
                return Claimed(attempt, owned=True)
            earlier: dict[str, Any] = orjson.loads(existing)
            owner = str(earlier.get("a") or earlier.get("b"))
            if earlier.get("s") == "pending" and owner == attempt:
                # This attempt's own claim or take-over (its id is new): the client retried
                # the script after a connection broke before its reply, and Redis had run it.
                return Claimed(str(earlier["b"]), owned=True,
                               taken_over=earlier["b"] != attempt)
            differs = sent.differences(earlier)
            if differs:
                what = ", ".join(f"{name} (earlier {d['earlier']!r}, now {d['now']!r})"
                                 for name, d in differs.items())
                raise ApiError(409, "conflict",
                               f"Idempotency-Key was already used for another request: {what}",
                               differs=differs)
            if earlier.get("s", "committed") == "committed":
                return Claimed(await self.still_there(sent.pipeline_id, str(earlier["b"])),
                               owned=False)
            if "l" in earlier and await self._scripts.take_key(
                    keys=[key], args=[owner, attempt, self._pending_ttl_ms]):
                log.warning("Idempotency-Key of batch %s taken over: its attempt's lease "
                            "passed unfinished", earlier["b"])
                return Claimed(str(earlier["b"]), owned=True, taken_over=True)
            if time.monotonic() >= deadline:
                raise ApiError(409, "in_progress",
                               "a request with this Idempotency-Key is still in progress; "
                               "retry later")
            await asyncio.sleep(self._poll_s)

    async def replayed(self, key: str, sent: Callable[[dict[str, Any]], Sent]) -> str | None:
        """The batch of the key's committed record when `sent(record)` is the same request,
        else None; read only, for a request whose own checks can no longer pass (a resume of
        a batch deleted since). `sent` builds the request from what the record holds of it."""
        raw = await self._redis.get(key)
        if raw is None:
            return None
        earlier: dict[str, Any] = orjson.loads(raw)
        if earlier.get("s") != "committed" or sent(earlier).differences(earlier):
            return None
        return await self.still_there(str(earlier.get("p")), str(earlier["b"]))

    async def still_there(self, pipeline_id: str, batch_id: str) -> str:
        """The earlier batch id, unless that batch is gone since: answering an id whose
        every GET is a 404 would look like success and be none. Gone: deleted, or undone or
        abandoned by an attempt that failed but could not free the key (a retry took it
        over once its lease passed)."""
        found, deleted = await self._redis.hmget(keys.batch(pipeline_id, batch_id), "id",
                                                 layout.DELETED)
        if found is None or deleted is not None:
            raise ApiError(409, "conflict",
                           f"the batch {batch_id} of this Idempotency-Key is gone (deleted, "
                           "or undone when a request with this key failed); use a new key to "
                           "run the pipeline again", batch_id=batch_id)
        return batch_id

    async def commit(self, key: str, committed: str, batch_id: str) -> None:
        """pending -> committed (`committed`: `Sent.record("committed", batch_id)`, the value
        the run command carries too), once the run command is durably queued. The batch will run
        whatever happens here, so a failure is not answered: the commit is tried again while
        its lease runs (a record gone meanwhile is committed all the same, and so is one a
        retry took over: the batch id is the same)."""
        async def commit() -> None:
            if not await self._scripts.commit_key(keys=[key],
                                                  args=[batch_id, committed, self._ttl_s]):
                log.warning("Idempotency-Key of batch %s taken by another attempt before its "
                            "commit (its pending record expired)", batch_id)

        await self._until_taken("committed", batch_id, commit)

    async def release(self, key: str, attempt: str) -> None:
        """Frees the key after a failed attempt (`attempt`: its own new id); best effort:
        a retry takes the record over once its lease passes."""
        async def release() -> None:
            await self._scripts.release_key(keys=[key], args=[attempt])

        await self._until_taken("released", attempt, release)

    async def _until_taken(self, what: str, batch_id: str,
                           call: Callable[[], Awaitable[None]]) -> None:
        """Runs `call` now and, when Redis does not take it, again in the background for as
        long as its lease runs: left pending, the key answers every retry 409 `in_progress`
        (a committed batch's retry, a failed attempt's) until a retry takes it over. Both
        scripts check the record is still this attempt's or its batch's, so a late call
        changes no other's (a commit finding the record gone takes the key: COMMIT_KEY)."""
        try:
            await call()
            return
        except Exception as exc:
            log.warning("Idempotency-Key of batch %s not %s yet (%s); tried again while its "
                        "lease runs", batch_id, what, describe(exc))
        deadline = time.monotonic() + self._pending_ttl_ms / 1000

        async def again() -> None:
            delays = RetryPolicy(initial_s=0.2, cap_s=2.0).delays()
            last = ""
            while time.monotonic() < deadline:
                await asyncio.sleep(delays())
                try:
                    await call()
                except Exception as exc:
                    last = describe(exc)
                else:
                    return
            log.warning("Idempotency-Key of batch %s never %s (%s); its lease passed",
                        batch_id, what, last)

        task = detached(again(), f"Idempotency-Key {what}")
        self._again.add(task)
        task.add_done_callback(self._again.discard)

    async def close(self) -> None:
        """Stops the transitions still being tried (before the Redis client closes), saying
        how many: their keys stay pending until a retry takes them over (their leases passed)."""
        if self._again:
            log.error("%d Idempotency-Key transitions Redis did not take are given up at "
                      "shutdown: those keys answer 409 until their leases pass",
                      len(self._again))
        for task in list(self._again):
            task.cancel()
        await asyncio.gather(*self._again, return_exceptions=True)
