"""Lua scripts that switch a finished batch's hash between its full and its packed form
(`core.packing`; `core.store.BatchStore.apply` calls them).

Each script names its KEYS and ARGV first. Both are compare-and-set: Python reads the hash,
computes the other form, and the script writes it only if the hash is still as read, so a
concurrent write (an event applied meanwhile) wins and nothing it wrote is lost. Neither
publishes a change message: a batch's content is the same in both forms.
"""

from __future__ import annotations

from typing import Final

# KEYS[1] batch hash
# ARGV[1] its `rev` as read, ARGV[2] how many fields it had as read, ARGV[3] the packed value
# (core.packing), ARGV[4..] the fields it packs (every field as read but core.packing.PLAIN)
# Replaces those fields by `packed` when the batch is still stopped, not deleted, not packed,
# at the same `rev` and with as many fields as read: every change of a packed field bumps
# `rev` (APPLY_EVENTS), and the one change without a bump (a stopped batch's `seen_n`
# dropped) changes the count. The plain fields stay as Redis holds them (a later stop's
# `stop_ts` is written without a bump). Returns 1 when packed, 0 when the hash had changed.
PACK: Final = """
local f = redis.call('HMGET', KEYS[1], 'rev', 'state', 'packed', 'deleted')
if f[1] ~= ARGV[1] or f[2] ~= 'stop' or f[3] or f[4] then return 0 end
if redis.call('HLEN', KEYS[1]) ~= tonumber(ARGV[2]) then return 0 end
for i = 4, #ARGV, 500 do
  redis.call('HDEL', KEYS[1], unpack(ARGV, i, math.min(i + 499, #ARGV)))
end
redis.call('HSET', KEYS[1], 'packed', ARGV[3])
return 1
"""

# KEYS[1] batch hash
# ARGV[1] its `packed` value as read, ARGV[2..] field, value, ... of the fields packed in it
# (core.packing.unpacked, minus the fields the hash held plainly)
# Writes those fields back and removes `packed` when `packed` is still the value read; a
# field Redis holds plainly keeps its value (HSETNX: it was written after the packing, and
# wins, as core.packing.unpacked says). Returns 1 when unpacked, 0 when `packed` had changed
# (unpacked, or packed again, by another client meanwhile).
UNPACK: Final = """
if redis.call('HGET', KEYS[1], 'packed') ~= ARGV[1] then return 0 end
for i = 2, #ARGV - 1, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HDEL', KEYS[1], 'packed')
return 1
"""
