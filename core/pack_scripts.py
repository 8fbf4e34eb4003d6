"""Lua scripts that switch finished batches' hashes between their full and packed forms
(`core.packing`; `core.store.BatchStore.apply` calls them).

Each script names its KEYS and ARGV first. Each takes many batches of one pipeline (their keys
share its hash tag), so a poll costs one call per pipeline, not one per batch; the hashes
travel as one JSON string each both ways (the client's cost of a script call is mostly its
arguments and replies, per field). PACK and UNPACK are compare-and-set: Python reads the
hashes (HASHES), computes the other form, and the script writes it only where the hash is
still as read, so a concurrent write (an event applied meanwhile) wins and nothing it wrote
is lost. Neither publishes a change message: a batch's content is the same in both forms.
"""

from __future__ import annotations

from typing import Final

from core.lua_hset import HSET_ALL_LUA
from core.packing import PACKED, PLAIN

# KEYS: batch hashes. Returns per key its hash as a JSON object (cjson: every value a
# string), or false when the hash is absent.
HASHES: Final = """
local out = {}
for i, key in ipairs(KEYS) do
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then
    out[i] = false
  else
    local h = {}
    for j = 1, #flat, 2 do h[flat[j]] = flat[j + 1] end
    out[i] = cjson.encode(h)
  end
end
return out
"""

# KEYS: batch hashes
# ARGV: per key (in the order of KEYS) three values: its `rev` as read, how many fields it had
# as read, its packed value (core.packing.pack)
# Replaces each hash's fields but the plain ones (core.packing.PLAIN) by `packed` when the
# batch is still stopped, not deleted, not packed, at the same `rev` and with as many fields
# as read: every change of a packed field bumps `rev` (APPLY_EVENTS), and the one change
# without a bump (a stopped batch's `seen_n` dropped) changes the count. The plain fields stay
# as Redis holds them (a later stop's `stop_ts` is written without a bump). Returns per key
# 1 when packed, 0 when the hash had changed (or has a TTL).
PACK: Final = (
    "local PLAIN = {" + ", ".join(f"'{name}'" for name in sorted(PLAIN)) + "}\n"
    + """local out = {}
local n = #PLAIN
for i, key in ipairs(KEYS) do
  local rev, count, value = ARGV[3 * i - 2], tonumber(ARGV[3 * i - 1]), ARGV[3 * i]
  local f = redis.call('HMGET', key, 'PACKED', unpack(PLAIN))
  local h = {}
  for j = 1, n do h[PLAIN[j]] = f[j + 1] end
  out[i] = 0
  if h.rev == rev and h.state == 'stop' and not f[1] and not h.deleted
      and redis.call('HLEN', key) == count and redis.call('PTTL', key) == -1 then
    -- Written anew rather than HDEL field by field: one pass, and a listpack of the new size
    -- (a hash with a TTL, which DEL would drop, is left as it is: none is stopped today).
    local kept = {'PACKED', value}
    for j = 1, n do
      if f[j + 1] then
        kept[#kept + 1] = PLAIN[j]
        kept[#kept + 1] = f[j + 1]
      end
    end
    redis.call('DEL', key)
    redis.call('HSET', key, unpack(kept))
    out[i] = 1
  end
end
return out
""".replace("PACKED", PACKED))

# KEYS: batch hashes
# ARGV: per key (in the order of KEYS) two values: its `packed` value as read, and a JSON
# object of the fields packed in it (core.packing.unpacked, minus the fields the hash held
# plainly)
# Writes those fields back and removes `packed` where `packed` is still the value read; a
# field Redis holds plainly keeps its value (it was written after the packing, and wins, as
# core.packing.unpacked says). Returns per key 1 when unpacked, 0 when `packed` had changed
# (unpacked, or packed again, by another client meanwhile).
UNPACK: Final = HSET_ALL_LUA + """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = 0
  local flat = redis.call('HGETALL', key)
  local plain, value = {}, false
  for j = 1, #flat, 2 do
    if flat[j] == 'PACKED' then value = flat[j + 1] else plain[flat[j]] = true end
  end
  if value == ARGV[2 * i - 1] then
    -- Added beside the plain fields, and `packed` removed only once they are all written:
    -- never DEL first, as a script's writes before an error stay (a large batch's HSET failed
    -- on Lua's unpack() limit after a DEL, and the batch was gone). Until the HDEL, a
    -- half-written hash still reads as packed (a plain field wins, with the same value).
    -- In place, a TTL stays too.
    local args = {}
    for name, v in pairs(cjson.decode(ARGV[2 * i])) do
      if not plain[name] then
        args[#args + 1] = name
        args[#args + 1] = v
      end
    end
    hset_all(key, args)
    redis.call('HDEL', key, 'PACKED')
    out[i] = 1
  end
end
return out
""".replace("PACKED", PACKED)
