"""Lua scripts of the list's indexes (`GET /api/v1/batches/{pipeline_id}/` and its filters):
hiding and purging a batch (out of every index), a page's sequence range, and the backfill
of batches that predate the indexes. The scripts that create and move a batch
(`core.scripts`, `core.api_scripts`) keep the same indexes.

Each script names its KEYS and ARGV first. The indexes (`core.keys`): the batch index (id ->
sequence), one per state and one per outcome (id -> sequence, the filters' sets), and the
created index (members `<created_at>|<sequence, 16 digits>`, all scored 0, ordered by
ZRANGEBYLEX).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from core.models import BATCH_STATES, OUTCOMES

# The only form of `created_at` the created index takes (what `core.models.now_iso` writes):
# fixed width, so that text order is time order.
CREATED_AT_LUA_PATTERN: Final = r"^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$"


def lua_names(names: Iterable[str]) -> str:
    """A Lua array constructor of names (identifiers: nothing to escape)."""
    return "{" + ", ".join(f"'{name}'" for name in names) + "}"


# A Lua function: unix seconds of a UTC ISO-8601 time (`2026-12-02T14:08:13.123Z`, the
# fraction dropped; 0 for another form), for the finished index's scores (keys.
# batch_finished_index). Days from the civil date (H. Hinnant's algorithm): no os.time in
# Redis's Lua, and the time must be the one the caller passed, so a test can set it.
EPOCH_LUA: Final = """
local function epoch(iso)
  local y, mo, d, hh, mi, ss = string.match(tostring(iso),
    '^(%d%d%d%d)%-(%d%d)%-(%d%d)T(%d%d):(%d%d):(%d%d)')
  if not y then return 0 end
  y, mo, d = tonumber(y), tonumber(mo), tonumber(d)
  if mo <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((mo + 9) % 12) + 2) / 5) + d - 1
  local days = era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
    - 719468
  return days * 86400 + tonumber(hh) * 3600 + tonumber(mi) * 60 + tonumber(ss)
end
"""

# A Lua function for the scripts that hide or remove a batch: takes batch `id` (hash `hash`)
# out of the created index KEYS[created] (skipped when the caller named no such key) and out
# of every filter index KEYS[first..]. The caller reads before it writes: call it before the
# hash changes.
UNLIST_LUA: Final = """
local function unlist(hash, id, created, first)
  if KEYS[created] then
    local at_seq = redis.call('HMGET', hash, 'created_at', 'seq')
    if at_seq[1] and at_seq[2] then
      redis.call('ZREM', KEYS[created], string.format('%s|%016d', at_seq[1], at_seq[2]))
    end
  end
  for i = first, #KEYS do redis.call('ZREM', KEYS[i], id) end
end
"""

# KEYS[1] batch hash, KEYS[2] pipeline's batch index (zset), KEYS[3] pipeline's created
# index, KEYS[4..] its filter indexes (keys.batch_filter_indexes), then its finished index
# (keys.batch_finished_index: a hidden batch is the clean-up's to purge, not the sweeper's)
# ARGV[1] batch id, ARGV[2] now (ISO-8601), ARGV[3] change channel ('' for none)
# Hides the batch: GETs and the list (filtered or not) stop seeing it at once; the consumer
# purges it later. Returns 1 when hidden now, 0 when unknown or already hidden.
HIDE_BATCH: Final = UNLIST_LUA + """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'deleted') == 1 then
  return 0
end
unlist(KEYS[1], ARGV[1], 3, 4)
redis.call('HSET', KEYS[1], 'deleted', '1', 'updated_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'rev', 1)
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], KEYS[1]) end
return 1
"""

# KEYS[1] batch hash, KEYS[2] batch's seen-event-ids zset, KEYS[3] pipeline's batch index,
# KEYS[4] pipeline's created index, KEYS[5..] its filter indexes (keys.batch_filter_indexes),
# then its finished index (keys.batch_finished_index)
# ARGV[1] batch id, ARGV[2] change channel ('' for none)
# Removes every key and index entry of the batch (after delete, or to undo a create that
# failed). A hash that expired already (an abandoned batch) leaves its created entry behind:
# harmless, an entry only marks where a sequence sits in time.
PURGE_BATCH: Final = UNLIST_LUA + """
unlist(KEYS[1], ARGV[1], 4, 5)
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[2], KEYS[1]) end
return 1
"""

# KEYS[1] the sorted set paged, scored by sequence (the batch index or a filter index),
# KEYS[2] pipeline's created index
# ARGV[1] the highest sequence wanted (inclusive, '+inf' for no bound), ARGV[2] created_after
# as a ZRANGEBYLEX bound ('[<created_at>': at or after; '-' for none), ARGV[3] created_before
# ('(<created_at>': strictly before; '+' for none), ARGV[4] how many rows at most
# The created bounds become sequence bounds with one O(log n) look-up each (the created
# index is in sequence order), then one range of KEYS[1]. Returns the rows newest first,
# flat: id, sequence, id, sequence, ...
PAGE_RANGE: Final = """
local top, bottom = ARGV[1], '-inf'
if ARGV[2] ~= '-' then
  local first = redis.call('ZRANGEBYLEX', KEYS[2], ARGV[2], '+', 'LIMIT', 0, 1)[1]
  if not first then return {} end
  bottom = string.sub(first, -16)
end
if ARGV[3] ~= '+' then
  local last = redis.call('ZREVRANGEBYLEX', KEYS[2], ARGV[3], '-', 'LIMIT', 0, 1)[1]
  if not last then return {} end
  local hi = tonumber(string.sub(last, -16))
  if top == '+inf' or hi < tonumber(top) then top = string.format('%d', hi) end
end
return redis.call('ZREVRANGEBYSCORE', KEYS[1], top, bottom, 'WITHSCORES', 'LIMIT', 0, ARGV[4])
"""

# KEYS[1] pipeline's created index, KEYS[2..] its filter indexes (keys.batch_filter_indexes:
# every state's, then every outcome's), then the hashes of some of its batches
# ARGV: per hash (in the order of KEYS), its batch id and its sequence (the batch index's score)
# Puts each visible batch in the indexes its hash says (and takes it out of the others, which
# repairs an entry a process running older code left behind); hidden or gone batches are
# skipped. Idempotent, and per batch atomic, so it may run beside the scripts that keep the
# indexes. Returns how many batches it indexed.
BACKFILL_INDEXES: Final = f"""
local STATES, OUTCOMES = {lua_names(BATCH_STATES)}, {lua_names(OUTCOMES)}
local first_hash = 2 + #STATES + #OUTCOMES
local done = 0
for i = first_hash, #KEYS do
  local id, seq = ARGV[2 * (i - first_hash) + 1], ARGV[2 * (i - first_hash) + 2]
  local f = redis.call('HMGET', KEYS[i], 'state', 'outcome', 'created_at', 'deleted')
  if f[1] and not f[4] then
    if f[3] and string.find(f[3], '{CREATED_AT_LUA_PATTERN}') then
      redis.call('ZADD', KEYS[1], 0, string.format('%s|%016d', f[3], seq))
    end
    for n, name in ipairs(STATES) do
      if name == f[1] then redis.call('ZADD', KEYS[1 + n], seq, id)
      else redis.call('ZREM', KEYS[1 + n], id) end
    end
    for n, name in ipairs(OUTCOMES) do
      local index = KEYS[1 + #STATES + n]
      if name == f[2] then redis.call('ZADD', index, seq, id)
      else redis.call('ZREM', index, id) end
    end
    done = done + 1
  end
end
return done
"""

# KEYS[1] pipeline's finished index (keys.batch_finished_index), KEYS[2..] batch hashes
# ARGV: the batch id of each hash (in the order of KEYS)
# Indexes the stopped batches that predate the finished index (or a rebuild, which restores
# hashes only), scored by their `updated_at`: a stopped batch's last change, at or after its
# stop, so it is kept at least the retention. NX: an entry APPLY_EVENTS wrote stays.
# Idempotent. Returns how many were indexed.
BACKFILL_FINISHED: Final = EPOCH_LUA + """
local done = 0
for i = 2, #KEYS do
  local f = redis.call('HMGET', KEYS[i], 'state', 'deleted', 'updated_at')
  if f[1] == 'stop' and not f[2] then
    done = done + redis.call('ZADD', KEYS[1], 'NX', epoch(f[3]), ARGV[i - 1])
  end
end
return done
"""
