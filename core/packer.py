"""Packing and unpacking finished batches in Redis (`core.packing` is the form; the scripts
are `core.pack_scripts`): `BatchStore.apply` packs the batches its stops finished and unpacks
a packed one that late events reach.

Each is a read (HASHES) and then a compare-and-set script, a round trip each, for every
batch given: the batches of one pipeline go `chunk` to a call (a script's keys share its
hash tag), all calls pipelined.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from core import keys
from core.pack_scripts import HASHES, PACK, UNPACK
from core.packing import PACKED, pack, packable, unpacked
from core.script_calls import run_all


class Packer:
    def __init__(self, redis: Redis, chunk: int) -> None:
        self.redis = redis
        self._chunk = chunk
        self._hashes_script = redis.register_script(HASHES)
        self._pack_script = redis.register_script(PACK)
        self._unpack_script = redis.register_script(UNPACK)

    async def _hashes(self, chunks: list[list[tuple[str, str]]]
                      ) -> list[list[dict[str, str] | None]]:
        """Each chunk's hashes as Redis holds them (None: absent): one HASHES call a chunk,
        pipelined."""
        calls = [[len(chunk), *(keys.batch(pipeline_id, b) for pipeline_id, b in chunk)]
                 for chunk in chunks]
        replies = await run_all(self.redis, self._hashes_script, calls)
        return [[orjson.loads(r) if r else None for r in reply] for reply in replies]

    def _chunks(self, batches: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
        """The batches by pipeline (a script's keys share one hash tag), `apply_chunk` a
        list at most."""
        by_pipeline: dict[str, list[tuple[str, str]]] = {}
        for batch in batches:
            by_pipeline.setdefault(batch[0], []).append(batch)
        return [mine[start : start + self._chunk] for mine in by_pipeline.values()
                for start in range(0, len(mine), self._chunk)]

    async def pack(self, batches: list[tuple[str, str]]) -> None:
        """Packs each of the batches that is stopped, not deleted and not packed yet. A
        batch changed between the read and PACK keeps its full form: the next apply of a
        stop to it packs it."""
        def args(fields: dict[str, str]) -> tuple[Any, ...] | None:
            if not packable(fields):
                return None
            return fields.get("rev", ""), len(fields), pack(fields)[PACKED]
        await self._read_then(self._pack_script, batches, args)

    async def unpack(self, batches: list[tuple[str, str]]) -> None:
        """Unpacks the batches that are packed. One packed or unpacked again by another
        client meanwhile is left as it is: APPLY_EVENTS says so again."""
        def args(fields: dict[str, str]) -> tuple[Any, ...] | None:
            value = fields.get(PACKED)
            if value is None:
                return None
            return value, orjson.dumps({name: v for name, v in unpacked(fields).items()
                                        if name not in fields})
        await self._read_then(self._unpack_script, batches, args)

    async def _read_then(self, script: AsyncScript, batches: list[tuple[str, str]],
                         args_of: Callable[[dict[str, str]], tuple[Any, ...] | None]) -> None:
        """Reads the batches (HASHES), then calls `script` with `args_of(hash)` for each
        batch it gives arguments for (None: left alone), a round trip each."""
        if not batches:
            return
        calls: list[list[Any]] = []
        chunks = self._chunks(batches)
        for chunk, hashes in zip(chunks, await self._hashes(chunks), strict=True):
            names: list[str] = []
            args: list[Any] = []
            for (pipeline_id, batch_id), fields in zip(chunk, hashes, strict=True):
                given = args_of(fields) if fields is not None else None
                if given is not None:
                    names.append(keys.batch(pipeline_id, batch_id))
                    args += given
            if names:
                calls.append([len(names), *names, *args])
        if calls:
            await run_all(self.redis, script, calls)
