"""Lua scripts: every multi-step Redis write is one of these, so it is atomic.

Each script names its KEYS and ARGV first. The batch hash they write follows the layout
`core.layout` owns. The events' script (`APPLY_EVENTS`) is in `core.apply_script`, the
scripts of the list's indexes (hide, purge, a page's range, backfill) in `core.list_scripts`;
all are registered here.
"""

from __future__ import annotations

from typing import Final

from redis.asyncio import Redis

from core import list_scripts
from core.apply_script import APPLY_EVENTS
from core.keys import FINISHED_INDEXED
from core.list_scripts import CREATED_AT_LUA_PATTERN
from core.lua_hset import HSET_ALL_LUA

# KEYS[1] batch hash, KEYS[2] pipeline's batch index (zset), KEYS[3] pipeline's sequence counter,
# KEYS[4] the state index of the new hash's `state`
# ARGV[1] batch id, ARGV[2..] field, value, field, value, ... of the new hash, `created_at`
# among them (fixed-width ISO: core.list_scripts.CREATED_AT_LUA_PATTERN)
# Two creates of a pipeline may reach Redis in another order than their clocks read them
# (two API processes): the later one then takes the newest batch's `created_at` (and an
# `updated_at` below it too), so `created_at` never decreases along the batch index, which
# the list's created bounds rely on (a binary search: core.list_scripts.PAGE_RANGE). The
# newest batch is the batch index's last member (its hash's name: KEYS[1] with ARGV[1]
# replaced; the first of the last three that has a `created_at`, should a hash be gone).
# The pipeline's first batch (sequence 1) sets the finished buckets' marker
# (keys.batch_finished_indexed: KEYS[3] with its last part replaced): no stopped batch
# predates the buckets. Returns the batch's creation sequence, or 0 when the batch already
# exists.
CREATE_BATCH: Final = HSET_ALL_LUA + f"""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local at
for i = 2, #ARGV - 1, 2 do
  if ARGV[i] == 'created_at' then at = ARGV[i + 1] end
end
if not (at and string.find(at, '{CREATED_AT_LUA_PATTERN}')) then
  return redis.error_reply('CREATE_BATCH: created_at must read like 2026-01-31T23:59:59.999Z')
end
local hash_prefix = string.sub(KEYS[1], 1, #KEYS[1] - #ARGV[1])
for _, newest in ipairs(redis.call('ZREVRANGE', KEYS[2], 0, 2)) do
  local newest_at = redis.call('HGET', hash_prefix .. newest, 'created_at')
  if newest_at then
    if newest_at > at then at = newest_at end
    break
  end
end
local seq = redis.call('INCR', KEYS[3])
if seq == 1 then redis.call('SET', (string.gsub(KEYS[3], '[^:]+$', '{FINISHED_INDEXED}')), '1') end
local fields = {{}}
for i = 2, #ARGV, 2 do
  local field, value = ARGV[i], ARGV[i + 1]
  if field == 'created_at' or (field == 'updated_at' and value < at) then value = at end
  fields[#fields + 1] = field
  fields[#fields + 1] = value
end
fields[#fields + 1] = 'seq'
fields[#fields + 1] = seq
hset_all(KEYS[1], fields)
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('ZADD', KEYS[4], seq, ARGV[1])
return seq
"""

# KEYS[1] pipeline's versions hash, KEYS[2] pipeline's version order list
# ARGV[1] version, ARGV[2] canonical JSON of the definition, ARGV[3] (optional) the place it
# must take: added only while the order holds that many versions
# Returns 1 when added, 0 when that version exists with the same body, -1 when it exists with
# another body (a conflict: versions are immutable), -2 when it is new and ARGV[3] is not its
# place (versions were registered after it was recorded: it would come after them, latest).
REGISTER_PIPELINE: Final = """
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then
  if existing == ARGV[2] then return 0 end
  return -1
end
if ARGV[3] and redis.call('LLEN', KEYS[2]) ~= tonumber(ARGV[3]) then return -2 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""


class Scripts:
    """The scripts registered once on a client; calls use EVALSHA and reload on NOSCRIPT."""

    def __init__(self, redis: Redis) -> None:
        self.create_batch = redis.register_script(CREATE_BATCH)
        self.hide_batch = redis.register_script(list_scripts.HIDE_BATCH)
        self.apply_events = redis.register_script(APPLY_EVENTS)
        self.register_pipeline = redis.register_script(REGISTER_PIPELINE)
        # The list's indexes' (core.list_scripts).
        self.purge_batch = redis.register_script(list_scripts.PURGE_BATCH)
        self.page_range = redis.register_script(list_scripts.PAGE_RANGE)
        self.backfill_indexes = redis.register_script(list_scripts.BACKFILL_INDEXES)
        self.backfill_finished = redis.register_script(list_scripts.BACKFILL_FINISHED)
        self.trim_bucket = redis.register_script(list_scripts.TRIM_BUCKET)
