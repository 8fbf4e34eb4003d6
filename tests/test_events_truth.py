"""The events path told the truth under faults an earlier review left out (second look).

Each test failed on the code before its fix. Tests on a broken Redis run their own
redis-server (the shared one must never be broken).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import cast

import orjson
import pytest
from redis.asyncio import Redis

from consumers.events import EventsConsumer
from consumers.plumbing.polls import bad_script_data
from core import keys, layout
from core.codec import Event
from core.connections import open_redis
from core.packing import unpacked
from core.retry import Verdict, classify
from core.settings import Settings
from tests.conftest import PrivateRedis, eventually
from tests.test_consumers_support import make_spec, new_batch, options, running
from tests.test_events_faults import Stream, _parsed_error, dead_letters, wait_out

MISCONF = ("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to "
           "persist to disk. Commands that may modify the data set are disabled, because this "
           "instance is configured to report errors during writes if RDB snapshotting fails "
           "(stop-writes-on-bgsave-error option). Please check the Redis logs for details "
           "about the RDB error.")


@pytest.mark.parametrize("reply", [MISCONF, f"{MISCONF} script: c1e43c3aa97ad5311d37ce7cb61"
                                            "54c6836988fa3, on @user_script:1."])
def test_a_redis_that_cannot_persist_is_waited_out_not_taken_for_bad_data(reply: str) -> None:
    """Redis refuses writes with MISCONF while its RDB save fails (a full disk): the same
    "not now" as OOM, never a batch's data (outside a script and inside one)."""
    error = _parsed_error(reply)
    assert classify(error) is Verdict.UNAVAILABLE
    assert not bad_script_data(error)


@pytest.mark.parametrize("reply", [
    "NOPERM this user has no permissions to run the 'evalsha' command",
    "NOPERM this user has no permissions to access one of the keys used as arguments",
    # Inside a script, as Redis 7.0 (this machine's, read off it) and 7.2 word it: no code.
    "ERR The user executing the script can't run this command or subcommand script: 4a15868"
    "380d4c0a43cee2d948637aff2e12939b5, on @user_script:1.",
    "ERR ACL failure in script: User u has no permissions to run the 'hset' command script: "
    "4a15868380d4c0a43cee2d948637aff2e12939b5, on @user_script:1.",
])
def test_an_acl_denying_a_command_is_waited_out_not_taken_for_bad_data(reply: str) -> None:
    error = _parsed_error(reply)
    assert classify(error) is Verdict.UNAVAILABLE
    assert not bad_script_data(error)


async def _bgsave_fails(admin: Redis, directory: Path) -> None:
    """The next save cannot rename its file into place: Redis refuses writes (MISCONF)."""
    await admin.config_set("save", "3600 1")  # stop-writes-on-bgsave-error needs a save point
    (directory / "dump.rdb" / "in-the-way").mkdir(parents=True)
    await admin.bgsave()

    async def refusing() -> bool:
        return bool((await admin.info("persistence"))["rdb_last_bgsave_status"] == "err")
    await eventually(refusing, timeout=10, interval=0.05)


async def _bgsave_works(admin: Redis, directory: Path) -> None:
    (directory / "dump.rdb" / "in-the-way").rmdir()
    (directory / "dump.rdb").rmdir()

    async def saved() -> bool:
        info = await admin.info("persistence")
        if info["rdb_bgsave_in_progress"]:
            return False
        if info["rdb_last_bgsave_status"] == "ok":
            return True
        await admin.bgsave()
        return False
    await eventually(saved, timeout=10, interval=0.1)


async def _three_batches(settings: Settings, admin: Redis) -> Stream:
    stream = Stream(settings, admin)
    spec = make_spec(stream.pipeline_id)
    stream.batch_ids = [await new_batch(admin, settings, stream.pipeline_id, spec)
                        for _ in range(3)]
    return stream


def _ends(stream: Stream) -> Callable[[str], list[Event]]:
    """What ends each batch: its step's last offsets and success, then its stop."""
    ev = stream.event
    return lambda b: [ev(b, "step.offsets", step="extract", offsets={"p0": 9}),
                      ev(b, "step.state", step="extract", state="success"),
                      ev(b, "batch.state", state="stop", outcome="completed")]


async def _all_ended(admin: Redis, stream: Stream) -> None:
    """Every batch shows what `_ends` sent: nothing of it was lost."""
    for batch_id in stream.batch_ids:
        fields = unpacked(cast(dict[str, str], await admin.hgetall(
            keys.batch(stream.pipeline_id, batch_id))))
        assert (fields["state"], fields["outcome"], fields["step:extract"],
                fields["off:extract:p0"]) == ("stop", "completed", "success", "9")


async def test_events_met_by_a_redis_that_cannot_persist_are_applied_once_it_can(
        topics: Settings, private_redis: PrivateRedis) -> None:
    """A Redis whose RDB save fails (disk full) answers every write MISCONF. The events
    consumer took that for the batches' own data: every batch of the poll went to the dead
    letters as "could not apply" and the poll was committed, so the events were lost for
    good although Redis took writes again minutes later. They are waited out like OOM."""
    settings = topics.model_copy(update={"redis_url": private_redis.url})
    admin = await open_redis(settings)
    stream = await _three_batches(settings, admin)
    ev = stream.event

    def flow_run(b: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, b))

    started: Callable[[str], list[Event]] = lambda b: [  # noqa: E731
        ev(b, "batch.state", state="scheduled", flow_run_id=flow_run(b)),
        ev(b, "batch.state", state="running"),
        ev(b, "step.state", step="extract", state="running")]
    consumer = EventsConsumer(settings, options())
    try:
        async with running(consumer):
            await stream.publish(started)
            await wait_out(consumer, stream, "MISCONF",
                           lambda: _bgsave_fails(admin, private_redis.directory),
                           lambda: _bgsave_works(admin, private_redis.directory), _ends(stream))
        assert consumer.dead == 0 and await dead_letters(settings) == 0
        await _all_ended(admin, stream)
    finally:
        await admin.aclose()


def _batch(state: str, outcome: str | None, steps: dict[str, str]) -> dict[str, str]:
    fields = {"id": "b", "name": "n", "deployment": "d", "state": state, "pipeline_id": "p",
              "pipeline_version": "1", "created_at": "2026-12-01T09:59:00.000Z",
              "updated_at": "2026-12-01T10:00:10.000Z", "rev": "9",
              "steps": orjson.dumps(list(steps)).decode()}
    if outcome is not None:
        fields["outcome"] = outcome
    for step, step_state in steps.items():
        fields |= {layout.step_field(step): step_state,
                   layout.offset_field(step, "p0"): "50",
                   layout.total_field(step, "p0"): "100",
                   f"{layout.STARTED_PREFIX}{step}": "2026-12-01T10:00:00.000Z",
                   f"{layout.MOVED_PREFIX}{step}": "2026-12-01T10:00:10.000Z"}
    return fields


def test_a_step_that_ended_short_of_its_totals_has_no_time_left() -> None:
    """GET gave a step that had ended (failed, cut short by its batch's stop, or a success
    that skipped records) `eta_s` as if it were still running at its last rate: 50 s left
    for a step that will never move again. Both clients hid it; the API said it. Only a
    step running in a running batch has time left; a success has none (0)."""
    def eta(fields: dict[str, str]) -> dict[str, float | None]:
        steps = layout.render(fields)["state"]["steps"]
        return {name: step["progress"]["eta_s"] for name, step in steps.items()}

    assert eta(_batch("running", None, {"a": "success", "b": "failed", "c": "running"})) == {
        "a": 0.0, "b": None, "c": 10.0}
    # A step running when its batch stopped is shown failed (cancelled, crashed), and one
    # still `running` in a completed batch is not running any more either.
    assert eta(_batch("stop", "cancelled", {"a": "running", "b": "success"})) == {
        "a": None, "b": 0.0}
    assert eta(_batch("stop", "completed", {"a": "running"})) == {"a": None}
    # The rate and percent stay: how fast it went and how far it got.
    step = layout.render(_batch("stop", "failed", {"a": "failed"}))["state"]["steps"]["a"]
    assert step["progress"] == {"percent": 50.0, "records_per_s": 5.0, "eta_s": None}


@pytest.mark.parametrize("denied", [["-evalsha", "-eval"], ["-hset"]])
async def test_events_met_by_a_redis_user_denied_scripts_are_applied_once_allowed(
        topics: Settings, private_redis: PrivateRedis, denied: list[str]) -> None:
    """An ACL that denies the consumer's user its scripts for a while (NOPERM: an operator's
    change, rolled back) was taken for the batches' own data: every event of the poll was
    dead-lettered as "could not apply" and committed, lost for good once the ACL was fixed.
    A refusal by the server's configuration is waited out, as a full or read-only Redis is.
    Denied a command the scripts call (`-hset`), the reply has no NOPERM code (diff review)."""
    settings = topics.model_copy(update={"redis_url": private_redis.url})
    admin = await open_redis(settings)
    stream = await _three_batches(settings, admin)
    ev = stream.event

    consumer = EventsConsumer(settings, options())
    try:
        async with running(consumer):
            await stream.publish(lambda b: [ev(b, "batch.state", state="running"),
                                            ev(b, "step.state", step="extract", state="running")])
            await wait_out(consumer, stream, "NOPERM",
                           lambda: admin.acl_setuser("default", enabled=True, reset_keys=False,
                                                     commands=denied),
                           lambda: admin.acl_setuser("default", enabled=True,
                                                     commands=["+@all"]), _ends(stream))
        assert consumer.dead == 0 and await dead_letters(settings) == 0
        await _all_ended(admin, stream)
    finally:
        await admin.aclose()


@pytest.mark.parametrize("reply", [
    # EVALSHA renamed or disabled (`rename-command`, some managed Redis): no script runs at all.
    "ERR unknown command 'evalsha', with args beginning with: ",
    # The script cache flushed between the load and the call (SCRIPT FLUSH, a failover).
    "NOSCRIPT No matching script. Please use EVAL.",
])
def test_a_server_that_runs_no_script_is_not_taken_for_every_batchs_bad_data(reply: str) -> None:
    """Any permanent error reply was taken for the batch's data: on a Redis that runs no
    script every poll went batch by batch to the dead letters and was committed, every event
    lost while the consumer seemed to run. Only what a script met in a batch's keys (its own
    runtime error, a key of another type) is the batch's; the rest ends the part (restarted,
    the poll read again) instead."""
    assert not bad_script_data(_parsed_error(reply))
    for data in ("WRONGTYPE Operation against a key holding the wrong kind of value",
                 "ERR user_script:40: attempt to compare nil with number script: 1234, on "
                 "@user_script:40.",
                 "ERR Error running script (call to f_1): @user_script:1: user_script:1: "
                 "attempt to perform arithmetic on a nil value"):
        assert bad_script_data(_parsed_error(data))
