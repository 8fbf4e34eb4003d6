"""A Lua text the scripts share (prepended to a script's own): HSET of a hash whose size grows
with a batch's partitions.

Redis's Lua cannot `unpack()` more than ~8,000 values (LUAI_MAXCSTACK: "too many results to
unpack"), and a batch of 3 steps x 700 partitions with their totals holds ~4,200 fields,
8,400 values: `redis.call('HSET', key, unpack(whole_hash))` fails on it, and a script's
writes made before the error stay (Redis does not roll a script back).
"""

from __future__ import annotations

from typing import Final

# Values (field, value, ...: even) one HSET takes: far below the limit, and what
# APPLY_EVENTS (core.apply_script) writes its changes by.
HSET_CHUNK: Final = 1000

# hset_all(key, flat) HSETs flat = {field, value, field, value, ...} into `key`, HSET_CHUNK
# values a call (no copy: unpack's range); an empty `flat` writes nothing.
HSET_ALL_LUA: Final = f"""
local function hset_all(key, flat)
  for i = 1, #flat, {HSET_CHUNK} do
    redis.call('HSET', key, unpack(flat, i, math.min(i + {HSET_CHUNK - 1}, #flat)))
  end
end
"""
