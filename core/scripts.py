"""Lua scripts: every multi-step Redis write is one of these, so it is atomic.

Each script names its KEYS and ARGV first. Batch hash layout (see `core.keys.batch`):
`state`, `outcome`, `reason`, `flow_run_id`, `rev`, `updated_at`, ..., `step:<name>` -> step
state, `off:<step>:<partition>` -> offset (a decimal string), `stop_ts` -> the `ts` of the
stop event that decided `outcome` and `reason` (a decimal string, seconds since the epoch;
internal, not rendered), `deleted` once hidden.
"""

from __future__ import annotations

from typing import Final

from redis.asyncio import Redis

# KEYS[1] batch hash, KEYS[2] pipeline's batch index (zset), KEYS[3] pipeline's sequence counter
# ARGV[1] batch id, ARGV[2..] field, value, field, value, ... of the new hash
# Returns the batch's creation sequence, or 0 when the batch already exists.
CREATE_BATCH: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local seq = redis.call('INCR', KEYS[3])
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
fields[#fields + 1] = 'seq'
fields[#fields + 1] = seq
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], seq, ARGV[1])
return seq
"""

# KEYS[1] batch hash, KEYS[2] pipeline's batch index (zset)
# ARGV[1] batch id, ARGV[2] now (ISO-8601), ARGV[3] change channel ('' for none)
# Hides the batch: GETs and the list stop seeing it at once; the consumer purges it later.
# Returns 1 when hidden now, 0 when unknown or already hidden.
HIDE_BATCH: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'deleted') == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'deleted', '1', 'updated_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'rev', 1)
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], KEYS[1]) end
return 1
"""

# KEYS[1] batch hash, KEYS[2] batch's seen-event-ids zset
# ARGV[1] now (ISO-8601), ARGV[2] how many event ids to remember, ARGV[3] change channel
# ('' for none; a change publishes the key and the new hash), ARGV[4] JSON array of events,
# each an object with
#   id (optional), t = 'batch.state' | 'step.state' | 'step.offsets', and per type:
#   batch.state: state, outcome?, reason?, flow_run_id?, ts? ("<decimal seconds>", read
#   on stops only; absent counts as 0)   step.state: step, state
#   step.offsets: step, offsets = {partition: "<decimal offset>"}
# Rules: batch state only moves forward (pending < scheduled < running < stop); among the
# stops applied, the one with the greatest ts decides outcome and reason (ties: the first
# applied), because Prefect allows Cancelled -> Running -> Completed: a cancel that lost the
# race to a starting run is followed by the run's real end, which must win whatever the
# order of arrival; a step state only moves forward and success/failed are
# final; an offset only grows (max by value, so offsets events need no id: re-delivered or
# merged ones can only raise an offset, never lose one); a state event whose id was seen
# before changes nothing; unknown steps are ignored. Once the batch is `stop` its seen ids
# are deleted and no more are remembered: the rules above already make every later event,
# duplicate or not, harmless. Returns the number of events that changed the batch, or -1
# when the batch is unknown or deleted (its events are dropped).
APPLY_EVENTS: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'deleted') == 1 then
  return -1
end
local BATCH_RANK = {pending = 0, scheduled = 1, running = 2, stop = 3}
local STEP_RANK = {none = 0, pending = 1, running = 2, success = 3, failed = 3}
local events = cjson.decode(ARGV[4])
-- A stop's ts as a number and as the string stored (the string as sent: a Lua number
-- written back would keep only 14 digits, too few for microseconds since the epoch).
local function stop_ts(ev)
  local n = tonumber(ev.ts)
  if n == nil or n ~= n or n == math.huge or n == -math.huge then return 0, '0' end
  if type(ev.ts) == 'string' then return n, ev.ts end
  return n, string.format('%.17g', n)
end
local state = redis.call('HGET', KEYS[1], 'state')
local stopped = state == 'stop'
local changed = 0
local remembered = false
for _, ev in ipairs(events) do
  local fresh = true
  if not stopped and ev.t ~= 'step.offsets' and type(ev.id) == 'string' then
    if redis.call('ZSCORE', KEYS[2], ev.id) then
      fresh = false
    else
      local n = redis.call('HINCRBY', KEYS[1], 'seen_n', 1)
      redis.call('ZADD', KEYS[2], n, ev.id)
      remembered = true
    end
  end
  local did = false
  if fresh and ev.t == 'batch.state' then
    local new = BATCH_RANK[ev.state]
    if new and new > (BATCH_RANK[state] or 0) then
      state = ev.state
      redis.call('HSET', KEYS[1], 'state', state)
      if state == 'stop' then
        stopped = true
        local _, text = stop_ts(ev)
        redis.call('HSET', KEYS[1], 'outcome', ev.outcome or 'completed', 'stop_ts', text)
        if type(ev.reason) == 'string' then redis.call('HSET', KEYS[1], 'reason', ev.reason) end
      end
      did = true
    elseif ev.state == 'stop' and state == 'stop' then
      local ts, text = stop_ts(ev)
      if ts > (tonumber(redis.call('HGET', KEYS[1], 'stop_ts')) or 0) then
        redis.call('HSET', KEYS[1], 'stop_ts', text)
        local outcome = ev.outcome or 'completed'
        local reason = type(ev.reason) == 'string' and ev.reason or false
        if redis.call('HGET', KEYS[1], 'outcome') ~= outcome then
          redis.call('HSET', KEYS[1], 'outcome', outcome)
          did = true
        end
        if redis.call('HGET', KEYS[1], 'reason') ~= reason then
          if reason then
            redis.call('HSET', KEYS[1], 'reason', reason)
          else
            redis.call('HDEL', KEYS[1], 'reason')
          end
          did = true
        end
      end
    end
    if type(ev.flow_run_id) == 'string'
        and redis.call('HSETNX', KEYS[1], 'flow_run_id', ev.flow_run_id) == 1 then
      did = true
    end
  elseif fresh and ev.t == 'step.state' then
    local field = 'step:' .. tostring(ev.step)
    local cur = redis.call('HGET', KEYS[1], field)
    local new = STEP_RANK[ev.state]
    if cur and new and new > (STEP_RANK[cur] or 0) then
      redis.call('HSET', KEYS[1], field, ev.state)
      did = true
    end
  elseif ev.t == 'step.offsets' and type(ev.offsets) == 'table' then
    if redis.call('HEXISTS', KEYS[1], 'step:' .. tostring(ev.step)) == 1 then
      local prefix = 'off:' .. ev.step .. ':'
      for part, value in pairs(ev.offsets) do
        local n = tonumber(value)
        if n then
          local cur = tonumber(redis.call('HGET', KEYS[1], prefix .. part))
          if cur == nil or n > cur then
            redis.call('HSET', KEYS[1], prefix .. part, value)
            did = true
          end
        end
      end
    end
  end
  if did then changed = changed + 1 end
end
if stopped then
  -- No-ops (and not replicated) once done: a stopped batch keeps no dedup state.
  redis.call('DEL', KEYS[2])
  redis.call('HDEL', KEYS[1], 'seen_n')
elseif remembered then
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[2]) + 1))
end
if changed > 0 then
  redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'rev', 1)
  if ARGV[3] ~= '' then
    -- The hash after the change rides along (keys.CHANGES_CHANNEL): under steady traffic a
    -- cache then keeps serving the batch instead of every change costing it a read.
    redis.call('PUBLISH', ARGV[3],
               KEYS[1] .. '\\n' .. cjson.encode(redis.call('HGETALL', KEYS[1])))
  end
end
return changed
"""

# KEYS[1] pipeline's versions hash, KEYS[2] pipeline's version order list
# ARGV[1] version, ARGV[2] canonical JSON of the definition
# Returns 1 when added, 0 when that version exists with the same body, -1 when it exists with
# another body (a conflict: versions are immutable).
REGISTER_PIPELINE: Final = """
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then
  if existing == ARGV[2] then return 0 end
  return -1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""


class Scripts:
    """The scripts registered once on a client; calls use EVALSHA and reload on NOSCRIPT."""

    def __init__(self, redis: Redis) -> None:
        self.create_batch = redis.register_script(CREATE_BATCH)
        self.hide_batch = redis.register_script(HIDE_BATCH)
        self.apply_events = redis.register_script(APPLY_EVENTS)
        self.register_pipeline = redis.register_script(REGISTER_PIPELINE)
