"""Lua scripts of the API's write path: the Idempotency-Key record's transitions (and the
check a failed attempt's undo makes on it), the abandoning of a batch whose run command may
or may not have reached Kafka, a POST's create and the sweep of the creates whose run command
was never seen taken.

Each names its KEYS and ARGV first. An Idempotency-Key record (`core.keys.idempotency`) is a
JSON object: `s` state (`pending` until the run command is durably queued, then
`committed`), `b` batch id (chosen by the attempt that claimed it), `a` the attempt that
took a pending record over (its own new batch id; absent: `b`'s), `l` the pending record's
lease (ms, Redis's clock), `p` pipeline id, `v` the requested
version as sent (or `latest`), `h` digest of the request body ('' for none).
"""

from __future__ import annotations

from typing import Final

from redis.asyncio import Redis

from core.list_scripts import UNLIST_LUA
from core.scripts import CREATE_BATCH

# KEYS[1] idempotency record
# ARGV[1] the new pending record (JSON), ARGV[2] its lease in milliseconds, ARGV[3] the
# record's TTL in seconds (the committed record's: a retry after the attempt died must find
# the batch id it chose)
# Claims the key when free: the record gets `l`, its lease's end (Redis's clock, ms), after
# which a retry may take it over (TAKE_KEY). Returns nil when claimed now, else the existing
# record.
CLAIM_KEY: Final = """
local existing = redis.call('GET', KEYS[1])
if existing then return existing end
local t = redis.call('TIME')
local lease = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[2])
local record = string.sub(ARGV[1], 1, -2) .. ',"l":' .. string.format('%d', lease) .. '}'
redis.call('SET', KEYS[1], record, 'EX', ARGV[3])
return false
"""

# KEYS[1] idempotency record
# ARGV[1] the attempt that owns it as last read (`a`, else `b`), ARGV[2] the attempt taking
# it over, ARGV[3] its lease in milliseconds
# A pending record whose lease passed (its attempt's process died, most likely) taken over by
# a retry of the same request: the batch id stays, so whatever the dead attempt got done (the
# batch created, its run command queued) is the retry's to finish, and the key never gets a
# second batch. Returns 1 when taken over, 0 when the record changed, is committed or its
# lease still runs.
TAKE_KEY: Final = """
local existing = redis.call('GET', KEYS[1])
if not existing then return 0 end
local record = cjson.decode(existing)
if record.s ~= 'pending' or (record.a or record.b) ~= ARGV[1] or not record.l then
  return 0
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if now < record.l then return 0 end
record.a = ARGV[2]
record.l = now + tonumber(ARGV[3])
redis.call('SET', KEYS[1], cjson.encode(record), 'KEEPTTL')
return 1
"""

# KEYS[1] idempotency record
# ARGV[1] the batch id, ARGV[2] the committed record (JSON), ARGV[3] TTL in seconds
# pending -> committed, only for the batch the record holds (by the attempt that chose it, or
# one that took the record over: either queued its run command). Returns 1 when committed
# (or already committed by this attempt: a call retried after its reply was lost), 0 when the
# record is another attempt's. A record gone (its pending TTL passed while Redis did not take
# the commit) is committed all the same: the batch runs, and a retry of its request must
# get it, not a second batch. (A released record is gone too, but only a failed attempt
# releases, and it never commits.)
COMMIT_KEY: Final = """
local existing = redis.call('GET', KEYS[1])
if not existing then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
local record = cjson.decode(existing)
if record.b ~= ARGV[1] then return 0 end
if record.s == 'committed' then return 1 end
if record.s ~= 'pending' then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""

# KEYS[1] idempotency record
# ARGV[1] the attempt (its own new batch id: `a` of a record taken over, else `b`)
# A failed attempt frees its pending record, so a retry starts afresh. A committed record
# or another attempt's (one that took it over) is left alone. Returns 1 when released, else 0.
RELEASE_KEY: Final = """
local existing = redis.call('GET', KEYS[1])
if not existing then return 0 end
local record = cjson.decode(existing)
if record.s ~= 'pending' or (record.a or record.b) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS[1] idempotency record
# ARGV[1] the failed attempt (its own new batch id: `a` of a record it took over, else `b`),
# ARGV[2] the batch it was to create, ARGV[3] the lease in milliseconds
# Asked before a failed attempt's undo or abandon of its batch, which may come late (Redis
# away past the lease): whether the batch is still the attempt's to undo. Not when the record
# holds it for another attempt (a retry took the key over: it finishes the batch and answers
# with it) or committed with it: purged or hidden, the key's 200 would name a batch that is
# gone or cancelled. A record still this attempt's own gets a new lease, so no retry takes
# the batch over before the undo is done; it is released only after (RELEASE_KEY): released
# here, a process dying before its undo left a batch whose run command may be on the topic,
# and a retry claiming afresh would run a second one. Returns 1 when the batch is the
# attempt's to undo (its record held again, or gone, or holding another batch), 0 when it is
# the key's.
HOLD_FOR_UNDO: Final = """
local existing = redis.call('GET', KEYS[1])
if not existing then return 1 end
local record = cjson.decode(existing)
if record.b ~= ARGV[2] then return 1 end
if record.s == 'pending' and (record.a or record.b) == ARGV[1] then
  local t = redis.call('TIME')
  record.l = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[3])
  redis.call('SET', KEYS[1], cjson.encode(record), 'KEEPTTL')
  return 1
end
return 0
"""

# KEYS[1] batch hash, KEYS[2] pipeline's batch index (zset), KEYS[3] batch's seen-event-ids zset,
# optionally KEYS[4..] the pipeline's filter indexes (keys.batch_filter_indexes)
# ARGV[1] batch id, ARGV[2] now (ISO-8601), ARGV[3] reason, ARGV[4] TTL of the hidden record
# in seconds, ARGV[5] change channel ('' for none)
# Makes a batch unrunnable after an ambiguous run command: `stop`/`failed` with the reason,
# hidden (GET 404, not listed; the commands consumer skips a hidden batch's run), and
# expiring as a backstop should the queued delete never be handled. Without the list's
# indexes among KEYS, the filtered list skips the hidden batch by its hash until the delete
# purges it. Returns 1 when abandoned now, 0 when the batch is unknown or already hidden.
ABANDON_BATCH: Final = UNLIST_LUA + """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'deleted') == 1 then
  return 0
end
unlist(ARGV[1], 4)
redis.call('HSET', KEYS[1], 'state', 'stop', 'outcome', 'failed', 'reason', ARGV[3],
           'deleted', '1', 'updated_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'rev', 1)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[4])
if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[5], KEYS[1]) end
return 1
"""

# KEYS[1..4] as CREATE_BATCH (batch hash, pipeline's batch index, sequence, initial state's
# index), KEYS[5] the pipeline's version order (list, latest last), optionally KEYS[6] the
# pipeline's unsent runs (`keys.unsent_runs`) and KEYS[7] its versions (`keys.pipeline_versions`)
# ARGV[1] the version the batch records when it must be the latest ('' for no check),
# ARGV[2] JSON array: CREATE_BATCH's ARGV (batch id, then the hash's fields and values),
# ARGV[3] change channel ('' or absent for none): a new batch publishes its key, so a
# pipeline's push streams see it at once (service.streams), ARGV[4] (with ARGV[1] and
# KEYS[7]; '' or absent for no check) the SHA-1 of the definition the batch records, as the
# registry held it when read: a version is immutable while Redis keeps it, but registered
# again after Redis lost it, it may hold another definition under the same name
# A POST's create: CREATE_BATCH's own text, run only while ARGV[1] is still the latest
# version, so "which version is latest" needs no round trip of its own and cannot change
# between that read and the create. The fields travel as one JSON string: packing ~30
# arguments is most of the client's CPU for this call. A batch created now is entered in
# KEYS[6] at Redis's time: should the POST's process die before Kafka took its run command,
# SWEEP_UNSENT finds it there (the entry is written with the batch, so no death falls
# between the two). Returns CREATE_BATCH's reply (the sequence, 0 when the batch exists, or
# its error), or {latest} (nil: the pipeline has no version) when ARGV[1] is not the latest,
# or {latest, 'changed'} when its definition is not the one ARGV[4] names.
CREATE_LATEST_BATCH: Final = f"""
local function create(KEYS, ARGV)
{CREATE_BATCH}
end
if ARGV[1] ~= '' then
  local latest = redis.call('LINDEX', KEYS[5], -1)
  if latest ~= ARGV[1] then return {{latest}} end
  if ARGV[4] and ARGV[4] ~= '' and
      redis.sha1hex(redis.call('HGET', KEYS[7], latest) or '') ~= ARGV[4] then
    return {{latest, 'changed'}}
  end
end
local args = cjson.decode(ARGV[2])
local seq = create(KEYS, args)
if type(seq) == 'number' and seq ~= 0 then
  if KEYS[6] then
    local t = redis.call('TIME')
    redis.call('ZADD', KEYS[6], t[1] * 1000 + math.floor(t[2] / 1000), args[1])
  end
  if ARGV[3] and ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], KEYS[1]) end
end
return seq
"""

# KEYS[1] the pipeline's unsent runs (`keys.unsent_runs`)
# ARGV[1] a batch id about to be created
# The entry CREATE_LATEST_BATCH writes, for a create that is not its (a resume's
# `BatchStore.create`), written before it: an entry whose batch never came is dropped by the
# sweep. Returns 1 when entered.
ENTER_UNSENT: Final = """
local t = redis.call('TIME')
return redis.call('ZADD', KEYS[1], 'NX', t[1] * 1000 + math.floor(t[2] / 1000), ARGV[1])
"""

# KEYS[1] the pipeline's unsent runs (`keys.unsent_runs`)
# ARGV[1] the prefix of its batches' hash keys (`keys.batch(pipeline, '')`), ARGV[2] the lease
# in milliseconds, ARGV[3] how many entries at most
# The entries older than the lease (Redis's clock), each decided by its batch: one still
# `pending` and visible is claimed (its time set to now, so no other API process sends it
# again before another lease) and returned, its run command to be sent again; any other
# (purged, hidden by a delete or an abandon, or taken by the commands consumer: scheduled,
# running, stopped) needs no send and leaves the set. Returns the batch ids claimed.
SWEEP_UNSENT: Final = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]),
                       'LIMIT', 0, tonumber(ARGV[3]))
local claimed = {}
for _, id in ipairs(due) do
  local fields = redis.call('HMGET', ARGV[1] .. id, 'state', 'deleted')
  if fields[1] == 'pending' and not fields[2] then
    redis.call('ZADD', KEYS[1], now, id)
    claimed[#claimed + 1] = id
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return claimed
"""


class ApiScripts:
    """The scripts registered once on a client; calls use EVALSHA and reload on NOSCRIPT."""

    def __init__(self, redis: Redis) -> None:
        self.claim_key = redis.register_script(CLAIM_KEY)
        self.take_key = redis.register_script(TAKE_KEY)
        self.commit_key = redis.register_script(COMMIT_KEY)
        self.release_key = redis.register_script(RELEASE_KEY)
        self.hold_for_undo = redis.register_script(HOLD_FOR_UNDO)
        self.abandon_batch = redis.register_script(ABANDON_BATCH)
        self.create_latest_batch = redis.register_script(CREATE_LATEST_BATCH)
        self.enter_unsent = redis.register_script(ENTER_UNSENT)
        self.sweep_unsent = redis.register_script(SWEEP_UNSENT)
