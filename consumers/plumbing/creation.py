"""Batches created by the `run` commands that upstream services publish straight to Kafka.

Such a command carries `create` (core.command_messages.Creation): the batch is created as a
POST would create it — the pipeline version (the latest unless named) looked up, the config
overrides checked by `core.run_config.effective_config`, the batch recorded by
`BatchStore.create` with its effective config in the hash's `config` field (the registered
one as it is when it overrides none) — unless it exists.

The publisher chooses the id, so the same id twice is the same batch: a command delivered or
published again finds the batch and goes on to its (idempotent) run; one that asks for
another pipeline, version or config is refused as conflicting. Batch ids are only unique
within a pipeline in Redis, and a deleted batch's hash is purged soon after, so each
published id is claimed in a record of its own (`keys.published`), global and outliving the
batch by `RECORD_TTL_S`: it tells a conflicting pipeline apart, and keeps a deleted batch
deleted when its command is published again. The record is claimed before the batch is
created, so a crash in between leaves a claim that the command's redelivery completes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import orjson
from redis.asyncio import Redis

from core import keys
from core.codec import Run
from core.layout import CONFIG, config_of, is_visible, registered_config
from core.models import PipelineSpec
from core.registry import PipelineRegistry
from core.retry import Permanent
from core.run_config import ConfigRefused, effective_config
from core.store import BatchStore

log = logging.getLogger(__name__)

# Longer than a publisher retries a command or Kafka keeps it (7 days by default): within
# it, a command published again cannot bring back a batch deleted since.
RECORD_TTL_S = 30 * 24 * 3600


class Refused(Permanent):
    """A creation request that no retry can make valid; dead-lettered with this text. No
    batch is failed for it: the batch it names is not the command's to fail."""


@dataclass(frozen=True, slots=True)
class Claim:
    pipeline_id: str
    pipeline_version: str
    config: dict[str, dict[str, Any]]
    deleted: bool = False
    # Its batch was created: a claim without its batch is then a batch removed since (by
    # retention, racing the command), not a create a crash left undone.
    created: bool = False

    def encode(self) -> bytes:
        return orjson.dumps({"pipeline_id": self.pipeline_id,
                             "pipeline_version": self.pipeline_version,
                             "config": self.config, "deleted": self.deleted,
                             "created": self.created})

    @classmethod
    def decode(cls, raw: bytes | str) -> Claim:
        data = orjson.loads(raw)
        return cls(data["pipeline_id"], data["pipeline_version"], data["config"],
                   bool(data.get("deleted")), bool(data.get("created")))


def claim_ttl_s(retention_days: float) -> int:
    """How long a claim lasts from its batch's creation: past the batch's removal by
    retention (a batch running under RECORD_TTL_S), where `mark_deleted` gives it
    RECORD_TTL_S more; with no retention, RECORD_TTL_S."""
    return RECORD_TTL_S + int(retention_days * 86_400)


class Creations:
    def __init__(self, redis: Redis, store: BatchStore, registry: PipelineRegistry, *,
                 retention_days: float) -> None:
        self.redis = redis
        self.store = store
        self.registry = registry
        self.claim_ttl_s = claim_ttl_s(retention_days)

    async def ensure(self, command: Run) -> bool:
        """Creates the batch `command` asks for unless it exists. True when its run should
        go on, False when the batch was deleted. Raises `Refused`."""
        creation = command.creation
        assert creation is not None
        for _ in range(3):  # a claim lost to a concurrent command is looked at again
            raw = await self.redis.get(keys.published(command.batch_id))
            if raw is not None:
                return await self._claimed(command, Claim.decode(raw))
            fields = await self.store.fields(command.pipeline_id, command.batch_id)
            if fields is not None:
                # Created without a claim (by the API, or the claim expired): the batch says
                # what it was created with.
                claim = await self._claim_of(command.pipeline_id, fields)
                await self._check(command, claim)
                if not is_visible(fields):
                    return False
                await self.redis.set(keys.published(command.batch_id),
                                     replace(claim, created=True).encode(),
                                     nx=True, ex=self.claim_ttl_s)
                return True
            spec = await self._spec(command.pipeline_id, command.pipeline_version or None)
            claim = Claim(command.pipeline_id, spec.version,
                          self._effective(spec, creation.config))
            if await self.redis.set(keys.published(command.batch_id), claim.encode(),
                                    nx=True, ex=self.claim_ttl_s):
                await self._create(command, spec, claim)
                await self._created(command.batch_id, claim)
                return True
        raise Refused(f"batch {command.batch_id}: its claim kept changing")

    async def deleted(self, pipeline_id: str, batch_id: str) -> None:
        """Marks a published batch deleted, so publishing its command again leaves it so."""
        await mark_deleted(self.redis, pipeline_id, batch_id)

    async def _claimed(self, command: Run, claim: Claim) -> bool:
        await self._check(command, claim)
        if claim.deleted:
            log.info("run %s: published again after its delete; left deleted", command.batch_id)
            return False
        fields = await self.store.fields(command.pipeline_id, command.batch_id)
        if fields is None:
            if claim.created:
                # Created, and removed since: retention purged it while this command was
                # read (it marks the claim deleted, but after this read). It stays removed.
                log.info("run %s: published again as its batch was removed; left removed",
                         command.batch_id)
                return False
            # Claimed, then the process stopped before the batch was created.
            spec = await self._spec(command.pipeline_id, claim.pipeline_version)
            await self._create(command, spec, claim)
            await self._created(command.batch_id, claim)
            return True
        return is_visible(fields)

    async def _created(self, batch_id: str, claim: Claim) -> None:
        """Records on the claim that its batch exists (its TTL kept)."""
        await self.redis.set(keys.published(batch_id), replace(claim, created=True).encode(),
                             xx=True, keepttl=True)

    async def _create(self, command: Run, spec: PipelineSpec, claim: Claim) -> None:
        # As the POST records it: the effective config when the run overrides any, else the
        # registered config as it is.
        creation = command.creation
        extra = {CONFIG: orjson.dumps(claim.config).decode() if creation is not None
                 and creation.config else registered_config(spec)}
        if await self.store.create(command.pipeline_id, command.batch_id, spec, extra):
            log.info("run %s: batch created for its publisher (%s %s)", command.batch_id,
                     command.pipeline_id, spec.version)

    async def _check(self, command: Run, claim: Claim) -> None:
        """Refuses a command that asks for something else than what its id was claimed for."""
        creation = command.creation
        assert creation is not None
        differs: list[str] = []
        if claim.pipeline_id != command.pipeline_id:
            differs.append(f"pipeline_id {claim.pipeline_id!r} (this command: "
                           f"{command.pipeline_id!r})")
        elif not claim.pipeline_version:
            pass  # a deleted id's claim as a rebuild restores it: its pipeline is all it knows
        elif command.pipeline_version and command.pipeline_version != claim.pipeline_version:
            differs.append(f"pipeline_version {claim.pipeline_version!r} (this command: "
                           f"{command.pipeline_version!r})")
        else:
            # The overrides over the batch's own version: with no version named, the same
            # command published again after a newer version was registered still matches.
            spec = await self._spec(command.pipeline_id, claim.pipeline_version)
            try:
                config = effective_config(spec, creation.config)
            except ConfigRefused as exc:
                raise Refused(f"config refused: {exc}") from None
            if config != claim.config:
                differs.append(f"config {_json(claim.config)} (this command: {_json(config)})")
        if differs:
            raise Refused(f"batch {command.batch_id} conflicts with the batch of that id "
                          f"already created: {'; '.join(differs)}")

    async def _claim_of(self, pipeline_id: str, fields: dict[str, str]) -> Claim:
        version = fields.get("pipeline_version", "")
        config = config_of(fields)
        if config is None:  # created with the registered config: no overrides, or older
            config = self._effective(await self._spec(pipeline_id, version), {})
        return Claim(pipeline_id, version, config)

    async def _spec(self, pipeline_id: str, version: str | None) -> PipelineSpec:
        spec = await self.registry.get(pipeline_id, version)
        if spec is not None:
            return spec
        if await self.registry.latest_version(pipeline_id) is None:
            raise Refused(f"unknown pipeline {pipeline_id!r}")
        raise Refused(f"unknown version {version!r} of pipeline {pipeline_id!r}")

    @staticmethod
    def _effective(spec: PipelineSpec, overrides: dict[str, dict[str, Any]]
                   ) -> dict[str, dict[str, Any]]:
        try:
            return effective_config(spec, overrides)
        except ConfigRefused as exc:
            raise Refused(f"config refused: {exc}") from None


def _json(value: object) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


async def mark_deleted(redis: Redis, pipeline_id: str, batch_id: str) -> None:
    """Marks the claim of a published batch deleted (a delete, or retention's purge), so
    publishing its run again leaves it so for RECORD_TTL_S from now; no claim (a batch its
    publisher did not create), nothing to do."""
    key = keys.published(batch_id)
    raw = await redis.get(key)
    if raw is None:
        return
    claim = Claim.decode(raw)
    if claim.pipeline_id == pipeline_id and not claim.deleted:
        marked = replace(claim, deleted=True)
        await redis.set(key, marked.encode(), xx=True, ex=RECORD_TTL_S)
