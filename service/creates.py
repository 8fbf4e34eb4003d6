"""Recording a POST's batch in Redis: `BatchStore.create`'s hash layout, one call of
`CREATE_LATEST_BATCH` per batch sent with the other POSTs' of the same loop turn
(service.turns), which also checks that the version recorded is still the pipeline's latest.

The layout is captured from `BatchStore.create` itself, once per definition (its call of the
create script recorded instead of sent), as the JSON of the script's arguments with the batch
id and the creation time left as gaps: a POST fills in the two instead of building and
encoding ~30 fields again (several µs of the request's CPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Literal, cast

import orjson

from core import keys, layout
from core.api_scripts import ApiScripts
from core.command_messages import Recorded, recordable
from core.models import PipelineSpec, batch_id_ms, now_iso
from core.registry import PipelineRegistry
from core.scripts import Scripts
from core.store import BatchStore
from service.errors import not_found
from service.turns import turn_reads

MAX_ENTRIES = 1024

# Parsed definitions by (pipeline_id, version), per registry (per app). A version is immutable
# (registering it again with another body is refused), so once read it need not be read and
# validated again; but registered again after Redis lost it, it may be another definition: a
# POST of the latest version has its create check the SHA-1 of the text its definition was
# parsed from (CREATE_LATEST_BATCH), and a definition found changed is read again.
_SPECS: weakref.WeakKeyDictionary[PipelineRegistry, dict[tuple[str, str], PipelineSpec]] = (
    weakref.WeakKeyDictionary())
# The digest of each definition `spec_of` parsed, by the definition object (its id, the object
# kept beside it so an id reused by another object never matches): a request holding one
# that was found changed and forgotten meanwhile is still checked.
_DIGESTS: dict[int, tuple[PipelineSpec, str]] = {}
# The latest version last seen of each pipeline, per registry: a POST of the latest version
# creates its batch with it, and the create script checks that it is still the latest (a
# pipeline's versions only grow), so the POST needs no read of its own.
_LATEST: weakref.WeakKeyDictionary[PipelineRegistry, dict[str, str]] = (
    weakref.WeakKeyDictionary())
# Captured layouts by (pipeline_id, version), per store.
_TEMPLATES: weakref.WeakKeyDictionary[BatchStore, dict[tuple[str, str], _Template]] = (
    weakref.WeakKeyDictionary())


def _bounded(table: dict[Any, Any]) -> dict[Any, Any]:
    if len(table) >= MAX_ENTRIES:
        table.clear()
    return table


async def spec_of(registry: PipelineRegistry, pipeline_id: str,
                  version: str) -> PipelineSpec | None:
    specs = _SPECS.get(registry)
    if specs is None:
        specs = _SPECS[registry] = {}
    spec = specs.get((pipeline_id, version))
    if spec is not None:
        return spec
    text = await registry.get_text(pipeline_id, version)
    if text is None:
        return None
    spec = PipelineSpec.model_validate_json(text)
    _bounded(_DIGESTS)[id(spec)] = (
        spec, hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest())
    _bounded(specs)[(pipeline_id, version)] = spec
    return spec


def _digest(spec: PipelineSpec) -> str | None:
    """The digest of the text `spec` was parsed from, None when not known (not one
    `spec_of` read, or dropped by the bound)."""
    known = _DIGESTS.get(id(spec))
    return known[1] if known is not None and known[0] is spec else None


def forget(registry: PipelineRegistry, pipeline_id: str, version: str) -> None:
    """A definition found changed under its version's name: read again when next asked."""
    _SPECS.get(registry, {}).pop((pipeline_id, version), None)


def known_latest(registry: PipelineRegistry, pipeline_id: str) -> str | None:
    return _LATEST.get(registry, {}).get(pipeline_id)


async def latest_spec(registry: PipelineRegistry, pipeline_id: str,
                      version: str | None) -> PipelineSpec:
    """The definition of `version`, known to be (or have been) the latest; 404 for none."""
    spec = await spec_of(registry, pipeline_id, version) if version is not None else None
    latest = _LATEST.get(registry)
    if latest is None:
        latest = _LATEST[registry] = {}
    if spec is None:
        latest.pop(pipeline_id, None)
        raise not_found(f"unknown pipeline {pipeline_id}")
    _bounded(latest)[pipeline_id] = spec.version
    return spec


# Stand-ins for the batch id and the time while the layout is captured: unique strings, so
# each place they land in the encoded arguments is a gap to fill.
_ID_MARK = "batch-" + uuid.uuid4().hex[:26].upper()
_NOW_MARK = "now-" + uuid.uuid4().hex


@dataclasses.dataclass(frozen=True, slots=True)
class _Template:
    spec: PipelineSpec
    other_keys: tuple[str, ...]  # the script's KEYS after the batch's hash
    pieces: tuple[bytes, ...]  # the encoded arguments around the gaps
    gaps: tuple[bool, ...]  # per gap: True the batch id, False the time
    registered: str  # the `config` field recorded when the run overrides none

    def args(self, batch_id: str, now: str, extra: bytes = b"") -> bytes:
        """`extra`: more field/value pairs, as JSON array items (`,"f","v",...`); they come
        after the captured ones, so one of the same name replaces it (HSET's last wins)."""
        # Both are plain ASCII (a generated id, an ISO time): no JSON escaping to do.
        fill = (now.encode(), batch_id.encode())
        out = [self.pieces[0]]
        for is_id, piece in zip(self.gaps, self.pieces[1:], strict=True):
            out += (fill[is_id], piece)
        if extra:
            out[-1] = out[-1][:-1]  # the array's closing bracket, put back after the pairs
            out += (extra, b"]")
        return b"".join(out)


class _Capture(Scripts):
    """The store's scripts with `create_batch` recording its call instead of sending it."""

    def __init__(self, scripts: Scripts) -> None:
        self.__dict__.update(scripts.__dict__)
        self.calls: list[tuple[list[str], list[Any]]] = []

        async def create_batch(keys: list[str], args: list[Any], client: Any = None) -> int:
            self.calls.append((list(keys), list(args)))
            return 1

        self.create_batch = create_batch  # type: ignore[assignment]


async def _capture(store: BatchStore, pipeline_id: str, spec: PipelineSpec) -> _Template:
    capture = _Capture(store.scripts)
    registered = layout.registered_config(spec)
    await BatchStore(store.redis, capture, token_secret=b"unused", changes_channel="").create(
        pipeline_id, _ID_MARK, spec, extra={layout.CONFIG: registered})
    [(batch_keys, args)] = capture.calls
    if batch_keys[0] != keys.batch(pipeline_id, _ID_MARK):
        raise RuntimeError(f"BatchStore.create's first key is not the batch: {batch_keys[0]}")
    now = dict(zip(args[1::2], args[2::2], strict=True))["created_at"]
    encoded = orjson.dumps([_NOW_MARK if arg == now else arg for arg in args])
    split = re.split(f"({re.escape(_ID_MARK)}|{re.escape(_NOW_MARK)})".encode(), encoded)
    return _Template(spec, tuple(batch_keys[1:]), tuple(split[0::2]),
                     tuple(mark == _ID_MARK.encode() for mark in split[1::2]), registered)


async def _template(store: BatchStore, pipeline_id: str, spec: PipelineSpec) -> _Template:
    templates = _TEMPLATES.get(store)
    if templates is None:
        templates = _TEMPLATES[store] = {}
    template = templates.get((pipeline_id, spec.version))
    if template is not None and template.spec is spec:
        return template
    # A version named in the request is read (and parsed) again each time, and concurrent
    # first reads of a version each parse their own: equal definitions, other objects.
    if template is not None and template.spec == spec:
        template = dataclasses.replace(template, spec=spec)
    else:
        template = await _capture(store, pipeline_id, spec)
    _bounded(templates)[(pipeline_id, spec.version)] = template
    return template


def config_pair(config_json: str) -> bytes:
    """The batch's effective config (its `config` field's JSON) as `_Template.args`' extra
    pair."""
    return b"," + orjson.dumps([layout.CONFIG, config_json])[1:-1]


class NotThisRequests(RuntimeError):
    """The create found a batch of this request's new id that it did not create (an id
    generated twice): never to be undone by this request."""


@dataclasses.dataclass(frozen=True, slots=True)
class Created:
    """A batch as its create recorded it: the definition, and what its run command carries
    for a rebuild (`Recorded`: the sequence Redis gave it, the creation time sent and the
    fields beyond a fresh batch's)."""

    spec: PipelineSpec
    recorded: Recorded


async def record(store: BatchStore, scripts: ApiScripts, registry: PipelineRegistry,
                 pipeline_id: str, batch_id: str, spec: PipelineSpec, latest: bool,
                 config: Callable[[PipelineSpec], Mapping[str, Any]] | None = None
                 ) -> Created:
    """Records the batch as `BatchStore.create` would; with `latest`, of the pipeline's latest
    version at that moment (`spec` is a guess: when another version is latest, the batch is
    recorded with that one's definition). `config`: the run's effective config for a
    definition (the run's overrides applied to it; may raise), None for the registered one.
    The same script call enters the batch among its pipeline's unsent runs, which it leaves
    once Kafka took its run command (`service.abandon`: sent again should nobody send it)."""
    turns = turn_reads(store.redis)
    order = keys.pipeline_order(pipeline_id)
    while True:
        digest = _digest(spec) if latest else ""
        if digest is None:  # a definition whose text is not known: read again, then checked
            forget(registry, pipeline_id, spec.version)
            spec = await latest_spec(registry, pipeline_id, spec.version)
            continue
        template = await _template(store, pipeline_id, spec)
        overridden = orjson.dumps(config(spec)).decode() if config is not None else None
        extra = config_pair(overridden) if overridden is not None else b""
        now = now_iso()
        reply = await turns.script(
            scripts.create_latest_batch,
            [keys.batch(pipeline_id, batch_id), *template.other_keys, order,
             keys.unsent_runs(pipeline_id), keys.pipeline_versions(pipeline_id)],
            [spec.version if latest else "", template.args(batch_id, now, extra),
             keys.CHANGES_CHANNEL, digest])
        seq = (int(reply) or await _created_earlier(store, pipeline_id, batch_id, now)
               if not isinstance(reply, list) else 0)
        if seq is None:
            raise NotThisRequests(f"batch {batch_id} of pipeline {pipeline_id} exists already "
                                  "and is not this request's")
        if not isinstance(reply, list):
            config_json = overridden if overridden is not None else template.registered
            return Created(spec, Recorded(seq=seq, created_at=now,
                                          extra={layout.CONFIG: config_json}))
        if len(reply) > 1:  # the definition changed under its name: Redis lost it meanwhile
            forget(registry, pipeline_id, str(reply[0]))
        spec = await latest_spec(registry, pipeline_id, reply[0])


async def _created_earlier(store: BatchStore, pipeline_id: str, batch_id: str,
                           now: str) -> int | None:
    """The sequence of a batch the create found existing, None if it is not this request's.
    Its id is new to this request, so it is: the connection broke after Redis ran the create
    and before its reply came, and the client ran the exchange again. The check is a sanity
    one (an id generated twice): the script only ever raises the time it is given."""
    seq, created_at = cast(list[str | None], await store.redis.hmget(
        keys.batch(pipeline_id, batch_id), "seq", "created_at"))
    if seq is None or created_at is None or created_at < now:
        return None
    return int(seq)


@dataclasses.dataclass(frozen=True, slots=True)
class LeftBehind:
    """The batch of an attempt whose lease passed, as its attempt left it (`service.runs`
    finishes it): `missing`, never created; `gone`, hidden or purged since (abandoned,
    deleted); `started`, its run command was taken (it is the consumers' now); `pending`, its
    run command may never have been sent, and `created` is what a send needs."""

    state: Literal["missing", "gone", "started", "pending"]
    created: Created | None = None


async def left_behind(store: BatchStore, registry: PipelineRegistry, pipeline_id: str,
                      batch_id: str) -> LeftBehind:
    fields = await store.fields(pipeline_id, batch_id)
    if fields is None:
        # A purge mark: deleted or undone on purpose, not to be written again. The mark
        # lives a day; a key may live longer (DHUB_IDEMPOTENCY_TTL_S): an attempt older than
        # the mark may have had its batch removed by retention since, so it is not made again.
        made_ms = batch_id_ms(batch_id)
        expired = made_ms is not None and time.time() - made_ms / 1000 > keys.PURGED_MARK_S
        purged = await store.redis.exists(keys.batch_purged(pipeline_id, batch_id))
        return LeftBehind("gone" if purged or expired else "missing")
    if not layout.is_visible(fields):
        return LeftBehind("gone")
    if fields.get("state") != "pending":
        return LeftBehind("started")
    version = fields.get("pipeline_version", "")
    spec = await registry.get(pipeline_id, version)  # read: see service.resume
    if spec is None:  # versions are never removed; a pipeline removed from Redis by hand
        raise not_found(f"unknown version {version} of pipeline {pipeline_id}")
    return LeftBehind("pending", Created(spec, recorded(fields)))


def recorded(fields: Mapping[str, str]) -> Recorded:
    """What a batch's run command records of it (for a rebuild), read back from its hash: the
    fields its create added to a fresh batch's, as its own run command recorded them. Raises
    (ValueError, KeyError, CodecError) for a hash no create of this release wrote."""
    extra = {name: value for name, value in fields.items() if recordable(name)}
    return Recorded(seq=int(fields["seq"]), created_at=fields.get("created_at", ""),
                    extra=extra)
