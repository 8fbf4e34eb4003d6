"""Lua scripts of the list's indexes (`GET /api/v1/batches/{pipeline_id}/` and its filters)
and of the retention's finished buckets: hiding and purging a batch (out of every index), a
page's rows, the backfill of batches that predate the indexes, and the sweeper's trim of a
bucket. The scripts that create and move a batch (`core.scripts`, `core.api_scripts`) keep
the same indexes.

Each script names its KEYS and ARGV first. The indexes (`core.keys`): the batch index (id ->
sequence; its members' `created_at` never decreases along the sequence, so the created
bounds are binary searches of it), one per indexed state (pending, scheduled, running) and
one per outcome (id -> sequence, the filters' sets; `state=stop` is the outcomes' merge),
and the finished buckets (a list of ids per hour of stop, and a sorted set of those hours).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from core.keys import INDEXED_STATES, PURGED_MARK_S
from core.models import OUTCOMES

# The only form of `created_at` CREATE_BATCH takes (what `core.models.now_iso` writes):
# fixed width, so that text order is time order.
CREATED_AT_LUA_PATTERN: Final = r"^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$"


def lua_names(names: Iterable[str]) -> str:
    """A Lua array constructor of names (identifiers: nothing to escape)."""
    return "{" + ", ".join(f"'{name}'" for name in names) + "}"


# A Lua function: unix seconds of a UTC ISO-8601 time (`2026-12-02T14:08:13.123Z`, the
# fraction dropped; 0 for another form), for the finished hours' scores. Days from the civil
# date (H. Hinnant's algorithm): no os.time in Redis's Lua, and the time must be the one the
# caller passed, so a test can set it.
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

# Lua functions of the finished buckets (keys.batch_finished_hour): `finish(hours, id, iso)`
# appends batch `id` to the bucket of the UTC hour of `iso` and records that hour in the
# finished index `hours` (keys.batch_finished_index: the bucket's name is the index's with
# its last part replaced by the hour, as keys.batch_finished_hour builds it); a time of
# another form puts the batch in no bucket (kept). Returns 1 when bucketed.
HOURS_LUA: Final = EPOCH_LUA + """
local function finish(hours, id, iso)
  local y, mo, d, hh = string.match(tostring(iso), '^(%d%d%d%d)%-(%d%d)%-(%d%d)T(%d%d):')
  if not y then return 0 end
  local hour = y .. mo .. d .. hh
  redis.call('RPUSH', (string.gsub(hours, '[^:]+$', hour)), id)
  redis.call('ZADD', hours, epoch(y .. '-' .. mo .. '-' .. d .. 'T' .. hh .. ':00:00'), hour)
  return 1
end
"""

# A Lua function for the scripts that hide or remove a batch: takes batch `id` out of the
# filter indexes KEYS[first..last] (`last`: #KEYS when not given).
UNLIST_LUA: Final = """
local function unlist(id, first, last)
  for i = first, last or #KEYS do redis.call('ZREM', KEYS[i], id) end
end
"""

# KEYS[1] batch hash, KEYS[2] pipeline's batch index (zset), KEYS[3..] its filter indexes
# (keys.batch_filter_indexes), then its finished index (keys.batch_finished_index; unused: a
# hidden batch stays in its bucket, where the sweeper skips it, being the clean-up's to purge)
# ARGV[1] batch id, ARGV[2] now (ISO-8601), ARGV[3] change channel ('' for none)
# Hides the batch: GETs and the list (filtered or not) stop seeing it at once; the consumer
# purges it later. Returns 1 when hidden now, 0 when unknown or already hidden.
HIDE_BATCH: Final = UNLIST_LUA + """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'deleted') == 1 then
  return 0
end
unlist(ARGV[1], 3, #KEYS - 1)
redis.call('HSET', KEYS[1], 'deleted', '1', 'updated_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'rev', 1)
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], KEYS[1]) end
return 1
"""

# KEYS[1] batch hash, KEYS[2] batch's seen-event-ids zset, KEYS[3] pipeline's batch index,
# KEYS[4..] its filter indexes
# (keys.batch_filter_indexes), then its finished index (unused: an id left in its bucket is
# skipped by the sweeper), then its purge mark (keys.batch_purged)
# ARGV[1] batch id, ARGV[2] change channel ('' for none)
# Removes every key and index entry of the batch (after delete, or to undo a create that
# failed), its finished bucket's id excepted, and marks it purged for keys.PURGED_MARK_S.
# PURGE_LUA's `purge(last, mark, ...)` (KEYS[last] the last filter index, `mark` the purge
# mark's key, `...` more keys to delete with the batch's) is the whole of it; the retention's
# SWEEP_BATCH calls it after its own checks.
PURGE_LUA: Final = UNLIST_LUA + f"""
local function purge(last, mark, ...)
  unlist(ARGV[1], 4, last)
  redis.call('DEL', KEYS[1], KEYS[2], ...)
  redis.call('SET', mark, '1', 'EX', {PURGED_MARK_S})
  redis.call('ZREM', KEYS[3], ARGV[1])
  if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[2], KEYS[1]) end
end
"""
PURGE_BATCH: Final = PURGE_LUA + """
purge(#KEYS - 2, KEYS[#KEYS])
return 1
"""

# KEYS[1] pipeline's batch index, KEYS[2..] the sorted sets merged, scored by sequence (the
# batch index itself, one filter index, or every outcome's index for `state=stop`)
# ARGV[1] the highest sequence wanted (inclusive, '+inf' for no bound), ARGV[2]
# created_after ('' for none: rows created at or after), ARGV[3] created_before ('' for
# none: strictly before), both in created_at's fixed-width form, ARGV[4] how many rows at
# most, ARGV[5] the batch hashes' key prefix (keys.batch(pipeline_id, ''))
# A created bound becomes a sequence bound by a binary search of the batch index by rank
# (its members' `created_at` never decreases along the sequence: CREATE_BATCH): O(log n)
# probes, each a rank read and an HGET of `created_at` (plain in every hash, packed or not).
# A member without `created_at` (its hash gone) reads as the next member's, which keeps the
# order. Then the sets' rows within the bounds (ZREVRANGEBYSCORE LIMIT), merged newest
# first, ARGV[4] at most: O(k log n + limit) for k sets (each read a chunk at a time).
# Returns the rows, flat: id, sequence, id, sequence, ...
PAGE_RANGE: Final = """
local index, prefix, limit = KEYS[1], ARGV[5], tonumber(ARGV[4])
local n = 0  -- the batch index's size, read when a created bound needs it
if ARGV[2] ~= '' or ARGV[3] ~= '' then n = redis.call('ZCARD', index) end
-- created_at of the member at `rank`, or of the first member above it that has one (nil:
-- none up to the top: past every bound)
local function created_at(rank)
  for r = rank, n - 1 do
    local id = redis.call('ZRANGE', index, r, r)[1]
    if not id then return nil end
    local at = redis.call('HGET', prefix .. id, 'created_at')
    if at then return at end
  end
  return nil
end
-- the first rank whose created_at is at or after `at` (n when none)
local function first_at(at)
  local lo, hi = 0, n
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local found = created_at(mid)
    if found == nil or found >= at then hi = mid else lo = mid + 1 end
  end
  return lo
end
local function seq_at(rank)
  return tonumber(redis.call('ZRANGE', index, rank, rank, 'WITHSCORES')[2])
end
local top, bottom = ARGV[1], '-inf'
if ARGV[2] ~= '' then
  local rank = first_at(ARGV[2])
  if rank >= n then return {} end
  bottom = string.format('%d', seq_at(rank))
end
if ARGV[3] ~= '' then
  local rank = first_at(ARGV[3]) - 1
  if rank < 0 then return {} end
  local hi = seq_at(rank)
  if top == '+inf' or hi < tonumber(top) then top = string.format('%d', hi) end
end
if #KEYS == 2 then
  return redis.call('ZREVRANGEBYSCORE', KEYS[2], top, bottom, 'WITHSCORES', 'LIMIT', 0, limit)
end
-- k sets: each read a chunk at a time (about its share of the page, then more of the
-- sets the page draws on), so the page reads about limit + k chunks, not k * limit rows.
local chunk = math.ceil(limit / (#KEYS - 1)) + 1
local rows, heads, ended = {}, {}, {}
local function refill(i, from)
  rows[i] = redis.call('ZREVRANGEBYSCORE', KEYS[i], from, bottom, 'WITHSCORES', 'LIMIT', 0, chunk)
  heads[i] = 1
  ended[i] = #rows[i] < 2 * chunk
end
for i = 2, #KEYS do refill(i, top) end
local out, seqs = {}, {}  -- seqs[i]: set i's head's sequence, as a number once read
while #out < 2 * limit do
  local best, best_seq = nil, nil
  for i = 2, #KEYS do
    local at = heads[i]
    if rows[i][at] == nil and not ended[i] then
      refill(i, '(' .. rows[i][at - 1])
      at = 1
    end
    if rows[i][at] then
      local seq = seqs[i]
      if seq == nil then seq = tonumber(rows[i][at + 1]); seqs[i] = seq end
      if best_seq == nil or seq > best_seq then best, best_seq = i, seq end
    end
  end
  if best == nil then break end
  out[#out + 1] = rows[best][heads[best]]
  out[#out + 1] = rows[best][heads[best] + 1]
  heads[best] = heads[best] + 2
  seqs[best] = nil
end
return out
"""

# KEYS[1..F] the pipeline's filter indexes (keys.batch_filter_indexes: every indexed
# state's, then every outcome's), then the hashes of some of its batches
# ARGV: per hash (in the order of KEYS), its batch id and its sequence (the batch index's score)
# Puts each visible batch in the indexes its hash says (and takes it out of the others, which
# repairs an entry a process running older code left behind); hidden or gone batches are
# skipped. Idempotent, and per batch atomic, so it may run beside the scripts that keep the
# indexes. Returns how many batches it indexed.
BACKFILL_INDEXES: Final = f"""
local STATES, OUTCOMES = {lua_names(INDEXED_STATES)}, {lua_names(OUTCOMES)}
local first_hash = 1 + #STATES + #OUTCOMES
local done = 0
for i = first_hash, #KEYS do
  local id, seq = ARGV[2 * (i - first_hash) + 1], ARGV[2 * (i - first_hash) + 2]
  local f = redis.call('HMGET', KEYS[i], 'state', 'outcome', 'deleted')
  if f[1] and not f[3] then
    for n, name in ipairs(STATES) do
      if name == f[1] then redis.call('ZADD', KEYS[n], seq, id)
      else redis.call('ZREM', KEYS[n], id) end
    end
    for n, name in ipairs(OUTCOMES) do
      local index = KEYS[#STATES + n]
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
# Buckets the stopped batches that predate the finished buckets (or a rebuild, which
# restores hashes only) by their `updated_at`: a stopped batch's last change, at or after
# its stop, so it is kept at least the retention. Hidden batches are skipped (the clean-up's
# to purge). A batch bucketed twice (stopped while this ran) is harmless: the sweeper skips
# a purged id. Returns how many were bucketed.
BACKFILL_FINISHED: Final = HOURS_LUA + """
local done = 0
for i = 2, #KEYS do
  local f = redis.call('HMGET', KEYS[i], 'state', 'deleted', 'updated_at')
  if f[1] == 'stop' and not f[2] then done = done + finish(KEYS[1], ARGV[i - 1], f[3]) end
end
return done
"""

# KEYS[1] a finished bucket (keys.batch_finished_hour), KEYS[2] the pipeline's finished
# index (keys.batch_finished_index)
# ARGV[1] the bucket's hour, ARGV[2] how many ids the sweeper read from the bucket's head
# (LRANGE 0 n-1) and handled, ARGV[3] the last of them
# Drops those ids from the bucket, and the bucket's hour from the index once the bucket is
# empty. Only when the bucket's head is still what was read (its n-th id ARGV[3]): a
# sweeper beside this one may have dropped them already, and then its next read goes on.
# Returns how many ids the bucket still holds (-1: not dropped, the head changed).
TRIM_BUCKET: Final = """
local n = tonumber(ARGV[2])
if n > 0 then
  if redis.call('LINDEX', KEYS[1], n - 1) ~= ARGV[3] then return -1 end
  redis.call('LTRIM', KEYS[1], n, -1)
end
local left = redis.call('LLEN', KEYS[1])
if left == 0 then redis.call('ZREM', KEYS[2], ARGV[1]) end
return left
"""
