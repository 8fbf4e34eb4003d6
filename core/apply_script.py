"""APPLY_EVENTS, the events consumer's one script: a poll's events applied to the batch
hashes of one pipeline, with the list's indexes and the retention's buckets kept in step.

It follows the hash layout `core.layout` owns (its field names and state orders: the rank
tables are generated from it); `core.scripts.Scripts` registers it with the others.
"""

from __future__ import annotations

from typing import Final

from core.keys import INDEXED_STATES
from core.layout import BATCH_RANK, STEP_RANK, lua_rank
from core.list_scripts import HOURS_LUA, lua_names
from core.models import OUTCOMES

# KEYS: the pipeline's filter indexes (keys.batch_filter_indexes: every indexed state's, then
# every outcome's; F keys in all), its finished index (KEYS[F+1]: keys.batch_finished_index),
# then per batch its hash and its seen-event-ids zset (KEYS[F+2i], KEYS[F+2i+1]): one call
# applies the events of many batches of one pipeline (their keys share its hash tag), so a
# poll costs a few calls instead of one per batch.
# ARGV[1] now (ISO-8601), ARGV[2] how many event ids to remember, ARGV[3] change channel
# ('' for none; a change publishes the key and the new hash), ARGV[4] JSON array with, per
# batch (in the order of KEYS), the array of its events, each an array (compact: no field
# names to parse, no id where none is read; null = absent):
#   ["b", id, state, outcome, reason, flow_run_id, ts]  batch.state; ts is read on stops
#                    only ("<decimal seconds>"; absent counts as 0)
#   ["s", id, step, state, ts]                          step.state; ts on final states
#                    (decimal seconds) and on running (ISO-8601 in ARGV[1]'s form)
#   ["o", step, partition, "<decimal offset>", ...]     step.offsets (any number of pairs)
#   ["t", step, partition, "<decimal total>", ...]      the totals a step.offsets carried
# Rules: batch state only moves forward (pending < scheduled < running < stop); among the
# stops applied, the one with the greatest ts decides outcome and reason (ties: the first
# applied), because Prefect allows Cancelled -> Running -> Completed: a cancel that lost the
# race to a starting run is followed by the run's real end, which must win whatever the order
# of arrival; a step state only moves forward, and between its two final states (success,
# failed) the one with the greater ts holds (ties: the first applied), kept in
# `ended:<step>` (milliseconds): a failed flow run retried in Prefect that then completes ends its steps
# again, and the guesses of the reconciler (a running step of a dead run `failed`, ts 0) yield
# to any real end; an offset only grows (max by value, so offsets events need no id:
# re-delivered or merged ones can only raise an offset, never lose one); a state event whose
# id was seen before changes nothing; unknown steps are ignored. Once the batch is `stop` its
# seen ids are deleted and no more are remembered: the rules above already make every later
# event, duplicate or not, harmless. Returns, per batch, the number of its events that changed
# it, or -1 when the batch is unknown or deleted (its events are dropped). Each batch's hash
# is read once and written once (what changed, in one HSET): a batch whose data raises an
# error is left untouched and stops the call there; the batches before it are applied, the
# others not (the caller applies them again one by one: every rule above is idempotent). A
# batch whose state or outcome changed moves between the filter indexes (a ZREM and a ZADD;
# `stop` has no state index: its outcome's holds it); the hot path, a batch's offsets, touches
# no index. A batch reaching `stop` is appended to the finished bucket of ARGV[1]'s hour (the
# retention sweeper's: core.list_scripts.HOURS_LUA), once: the state reaches `stop` once.
_APPLY_EVENTS_TEXT: Final = """
local BATCH_RANK = BATCH_RANK_TABLE
local STEP_RANK = STEP_RANK_TABLE
local STATES, OUTCOMES = STATE_NAMES, OUTCOME_NAMES  -- the indexed states (not stop)
local state_index, outcome_index = {}, {}
for n, name in ipairs(STATES) do state_index[name] = KEYS[n] end
for n, name in ipairs(OUTCOMES) do outcome_index[name] = KEYS[#STATES + n] end
local FIRST = #STATES + #OUTCOMES + 1  -- the finished index; the batches' keys follow it
local finished = KEYS[FIRST]
local now, window, channel = ARGV[1], tonumber(ARGV[2]), ARGV[3]
-- A stop's ts as a number and as the string stored (the string as sent: a Lua number
-- written back would keep only 14 digits, too few for microseconds since the epoch).
local function stop_ts(ts)
  local n = tonumber(ts)
  if n == nil or n ~= n or n == math.huge or n == -math.huge then return 0, '0' end
  if type(ts) == 'string' then return n, ts end
  return n, string.format('%.17g', n)
end
-- A step end's ts in whole milliseconds, as stored in `ended:<step>` (a finished batch keeps
-- one per step: milliseconds are shorter than the ts as sent, and exact as Lua numbers).
local function ended_ms(ts)
  local n = stop_ts(ts)
  return string.format('%d', math.floor(n * 1000))
end
local function text(value)  -- a string field of an event, or nil (absent: JSON null)
  if type(value) == 'string' then return value end
  return nil
end

-- One batch: its hash is read once (HGETALL) into `h`, the events are applied to `h`, and
-- what changed is written at the end in one HSET (and the ids to remember in the zset).
-- Reads before writes: an error (a batch's bad data) leaves that batch untouched.
local function apply(hash, seen, events)
  -- In RESP3 the hash comes as a map, which Redis turns into a Lua table in C: building it
  -- from RESP2's flat array in Lua cost a third of a batch's apply (measured on Redis 7.0).
  -- Only this call: every other reply keeps the RESP2 form the rules below read.
  redis.setresp(3)
  local h = redis.call('HGETALL', hash).map
  redis.setresp(2)
  if next(h) == nil then return -1 end
  if h.deleted then return -1 end
  -- A packed finished batch (core.packing): its caller unpacks it and applies again.
  if h.packed then return -2 end
  local set, unset = {}, {}
  local function put(field, value) h[field] = value; set[field] = value; unset[field] = nil end
  local function drop(field) h[field] = nil; set[field] = nil; unset[field] = true end
  local state, state0, outcome0 = h.state, h.state, h.outcome
  local stopped = state == 'stop'
  local changed = 0
  local seen_n = tonumber(h.seen_n) or 0
  local remember = {}  -- ids to remember, in order (their scores are seen_n + position)
  local taken = {}     -- ids met in this call
  for _, ev in ipairs(events) do
    local kind = ev[1]
    local fresh = true
    if not stopped and kind ~= 'o' and type(ev[2]) == 'string' then
      if taken[ev[2]] or redis.call('ZSCORE', seen, ev[2]) then
        fresh = false
      else
        taken[ev[2]] = true
        remember[#remember + 1] = ev[2]
      end
    end
    local did = false
    if fresh and kind == 'b' then
      local name, outcome, reason = ev[3], text(ev[4]) or 'completed', text(ev[5])
      local new = BATCH_RANK[name]
      if new and new > (BATCH_RANK[state] or 0) then
        state = name
        put('state', state)
        if state == 'stop' then
          stopped = true
          local _, ts = stop_ts(ev[7])
          put('outcome', outcome)
          put('stop_ts', ts)
          if reason then put('reason', reason) end
        end
        did = true
      elseif name == 'stop' and state == 'stop' then
        local ts, ts_text = stop_ts(ev[7])
        if ts > (tonumber(h.stop_ts) or 0) then
          put('stop_ts', ts_text)
          if h.outcome ~= outcome then
            put('outcome', outcome)
            did = true
          end
          if (h.reason or false) ~= (reason or false) then
            if reason then put('reason', reason) else drop('reason') end
            did = true
          end
        end
      end
      local flow_run_id = text(ev[6])
      if flow_run_id and h.flow_run_id == nil then
        put('flow_run_id', flow_run_id)
        did = true
      end
    elseif fresh and kind == 's' then
      local field = 'step:' .. tostring(ev[3])
      local cur = h[field]
      local new = STEP_RANK[ev[4]]
      local final = ev[4] == 'success' or ev[4] == 'failed'
      if cur and new and new > (STEP_RANK[cur] or 0) then
        put(field, ev[4])
        if ev[4] == 'running' and not h['started:' .. ev[3]] then
          -- Progress: the step's rate counts from when it began, by its event's clock (the
          -- clock of its offsets too): applied late, as a backlog is, the time of the apply
          -- would put all the step's work in the moment of catching up. Not later than now
          -- (a clock ahead), not before the batch existed (a clock far behind, a ts of 0).
          local began = text(ev[5])
          if not began or began > now then began = now end
          if h.created_at and began < h.created_at then began = h.created_at end
          put('started:' .. ev[3], began)
        end
        if final then put('ended:' .. ev[3], ended_ms(ev[5])) end
        did = true
      elseif cur and final and cur ~= ev[4] and new == STEP_RANK[cur] then
        local ms = ended_ms(ev[5])
        -- A hash from before `ended:` keeps its first end (the rule it was applied under).
        local held = tonumber(h['ended:' .. ev[3]])
        if held and tonumber(ms) > held then
          put(field, ev[4])
          put('ended:' .. ev[3], ms)
          did = true
        end
      end
    elseif kind == 'o' then
      local step = tostring(ev[2])
      if h['step:' .. step] then
        local prefix = 'off:' .. step .. ':'
        for i = 3, #ev - 1, 2 do
          local value = ev[i + 1]
          local n = tonumber(value)
          if n then
            local field = prefix .. tostring(ev[i])
            local cur = tonumber(h[field])
            if cur == nil or n > cur then
              put(field, value)
              put('moved:' .. step, now)  -- progress: when the step last moved (stalls)
              did = true
            end
          end
        end
      end
    elseif kind == 't' then
      local step = tostring(ev[2])
      if h['step:' .. step] then
        for i = 3, #ev - 1, 2 do
          local field = 'tot:' .. step .. ':' .. tostring(ev[i])
          if tonumber(ev[i + 1]) and h[field] ~= ev[i + 1] then
            put(field, ev[i + 1])
            did = true
          end
        end
      end
    end
    if did then changed = changed + 1 end
  end
  if stopped then
    -- A stopped batch keeps no dedup state (DEL: a no-op, not replicated, once done).
    redis.call('DEL', seen)
    if h.seen_n then drop('seen_n') end
  elseif #remember > 0 then
    for i, id in ipairs(remember) do redis.call('ZADD', seen, seen_n + i, id) end
    put('seen_n', string.format('%d', seen_n + #remember))
    redis.call('ZREMRANGEBYRANK', seen, 0, -(window + 1))
  end
  if changed > 0 then
    put('updated_at', now)
    put('rev', string.format('%d', (tonumber(h.rev) or 0) + 1))
  end
  local args = {}
  for field, value in pairs(set) do
    args[#args + 1] = field
    args[#args + 1] = value
    if #args >= 1000 then redis.call('HSET', hash, unpack(args)); args = {} end
  end
  if #args > 0 then redis.call('HSET', hash, unpack(args)) end
  for field in pairs(unset) do redis.call('HDEL', hash, field) end
  local id, seq = h.id, h.seq  -- the filter indexes' member and score
  if id and seq and state ~= state0 then
    if state_index[state0] then redis.call('ZREM', state_index[state0], id) end
    if state_index[state] then redis.call('ZADD', state_index[state], seq, id) end
    if state == 'stop' then finish(finished, id, now) end
  end
  if id and seq and h.outcome ~= outcome0 then
    if outcome_index[outcome0] then redis.call('ZREM', outcome_index[outcome0], id) end
    if outcome_index[h.outcome] then redis.call('ZADD', outcome_index[h.outcome], seq, id) end
  end
  if changed > 0 and channel ~= '' then
    -- The hash after the change rides along (keys.CHANGES_CHANNEL), as a JSON object:
    -- under steady traffic a cache then keeps serving the batch instead of every change
    -- costing it a read.
    redis.call('PUBLISH', channel, hash .. '\\n' .. cjson.encode(h))
  end
  return changed
end

local results = {}
for i, events in ipairs(cjson.decode(ARGV[4])) do
  results[i] = apply(KEYS[FIRST + 2 * i - 1], KEYS[FIRST + 2 * i], events)
end
return results
"""
# The state orders come from core.layout, where each is written once; the names of states
# and outcomes from core.keys and core.models (the order of keys.batch_filter_indexes).
APPLY_EVENTS: Final = HOURS_LUA + (
    _APPLY_EVENTS_TEXT.replace("BATCH_RANK_TABLE", lua_rank(BATCH_RANK))
    .replace("STEP_RANK_TABLE", lua_rank(STEP_RANK))
    .replace("STATE_NAMES", lua_names(INDEXED_STATES)).replace("OUTCOME_NAMES", lua_names(OUTCOMES)))
