"""What a `dhub` watch says must hold when it says it: a long-polled watch ends with the outcome
the batch settled on, not the first `stop` it saw; a watch whose link is back does not go on
saying it is reconnecting (both found by the edge review)."""

from __future__ import annotations

import argparse
import io
import json
import time
import types
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from rich.console import Console

import dhub.watch
from core.codec import Event
from core.settings import Settings
from dhub import DhubClient, WatchEvent
from dhub.aio import AsyncDhubClient
from dhub.commands import cmd_watch
from dhub.view import BatchView
from tests.cache_support import PIPELINE, cached_api, direct_store, engines, new_batches
from tests.helpers import STATIC_TOKEN


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis")


async def test_a_long_polled_watch_ends_with_the_settled_outcome(
        test_settings: Settings, redis: Redis) -> None:
    """`dhub watch --no-stream` (or any watch of a server without streams) ended on the
    first `stop` version it saw. A stopped batch's outcome can still be settled by a later
    stop event (a run Prefect completed after a cancel), which is why the push stream sends
    `end` only after END_QUIET_S (2 s) of quiet: the long-poll watch exited 2 (cancelled)
    while GET said completed (0)."""
    store = direct_store(redis, test_settings)
    [batch_id] = await new_batches(store)
    now = time.time()
    async with cached_api(test_settings) as api:
        async with AsyncDhubClient(str(api.make_url("")).rstrip("/"), STATIC_TOKEN) as client:
            watch = client.watch(PIPELINE, batch_id, stream=False).__aiter__()
            first = await anext(watch)
            assert first.kind == "batch"
            await store.apply([Event("batch.state", batch_id, PIPELINE, state="stop",
                                     outcome="cancelled", reason="stopped", ts=now)])
            stopped = await anext(watch)
            assert stopped.batch is not None and stopped.batch.get("outcome") == "cancelled"
            await store.apply([Event("batch.state", batch_id, PIPELINE, state="stop",
                                     outcome="completed", ts=now + 1)])
            rest: list[Any] = [event async for event in watch]
        response = await api.get(f"/api/v1/batches/{PIPELINE}/{batch_id}",
                                 headers={"Authorization": f"Bearer {STATIC_TOKEN}"})
        assert (await response.json())["outcome"] == "completed"
    assert rest[-1].kind == "end"
    assert rest[-1].batch["outcome"] == "completed"


def test_a_watch_that_reconnected_does_not_go_on_saying_reconnecting() -> None:
    """A stream dropped and reopened with Last-Event-ID naming the current version is
    answered with nothing until the batch next changes (keep-alive comments only, which the
    watch does not hand out). Until then the last word of the watch stayed `reconnecting`:
    `dhub watch` kept its yellow "reconnecting: ..." note (piped: the last line), the NDJSON
    ended on a `reconnecting` event, for as long as the batch did not change (a slow step:
    minutes) although the link was back."""
    running = {"id": "b", "name": "p", "deployment": "d",
               "state": {"state": "running", "steps": {}}}
    done = {**running, "outcome": "completed", "state": {"state": "stop", "steps": {}}}
    calls = 0
    events: list[WatchEvent] = []
    while_open: list[str] = []

    def reopened() -> Iterator[bytes]:
        yield b": keep-alive\n\n"
        while_open.append(events[-1].kind)  # what the watch says while the link is back
        yield (b'event: batch\nid: "v2"\ndata: ' + json.dumps(done).encode()
               + b"\n\nevent: end\ndata: {}\n\n")

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                                  content=b'event: batch\nid: "v1"\ndata: '
                                  + json.dumps(running).encode() + b"\n\n")
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                              content=reopened())

    with DhubClient("http://api.test", "t", transport=httpx.MockTransport(handler)) as api:
        events.extend(api.watch("p", "b"))
    assert while_open and while_open[0] != "reconnecting", [e.kind for e in events]


def _dropped_then_back(request: httpx.Request) -> httpx.Response:
    """A stream of one version that drops (closed without `end`), then a stream of the batch
    completing (a stateful handler: the calls are counted on the function)."""
    calls = _dropped_then_back.__dict__.setdefault("calls", [])
    calls.append(request)
    running = {"id": "b", "name": "p", "deployment": "d",
               "state": {"state": "running", "steps": {}}}
    if len(calls) == 1:
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                              content=b'event: batch\nid: "v1"\ndata: '
                              + json.dumps(running).encode() + b"\n\n")
    done = {**running, "outcome": "completed", "state": {"state": "stop", "steps": {}}}
    return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                          content=b'event: batch\nid: "v2"\ndata: ' + json.dumps(done).encode()
                          + b"\n\nevent: end\ndata: {}\n\n")


@pytest.mark.parametrize("mode", ["json", "piped", "terminal"])
def test_dhub_watch_says_when_the_link_is_back(
        mode: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """What `dhub watch` makes of `connected`: an NDJSON line, a "reconnected" line in a
    piped log (after its "reconnecting: ..." line), and the terminal's yellow note gone."""
    monkeypatch.setattr(dhub.watch, "RECONNECT_MIN_S", 0.0)
    _dropped_then_back.__dict__.pop("calls", None)
    notes: list[tuple[str | None, str | None]] = []  # (the batch's state, the note) per update
    update = BatchView.update

    def noted(view: BatchView, batch: Any, note: str | None = None) -> None:
        notes.append((batch["state"]["state"] if batch else None, note))
        update(view, batch, note)

    monkeypatch.setattr(BatchView, "update", noted)
    out = io.StringIO()
    console = Console(file=out, force_terminal=mode == "terminal", width=100)
    args = argparse.Namespace(pipeline="p", batch="b", no_stream=False, reconnect_for=60.0,
                              json=mode == "json", verbose=0)
    with DhubClient("http://api.test", "t",
                    transport=httpx.MockTransport(_dropped_then_back)) as api:
        assert cmd_watch(args, api, console) == 0
    if mode == "json":
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [line["event"] for line in lines] == [
            "batch", "reconnecting", "connected", "batch", "end"]
        assert lines[2] == {"event": "connected", "via": "stream"}
    elif mode == "piped":
        said = out.getvalue().splitlines()
        assert said[1].startswith("reconnecting: ") and said[2] == "reconnected", said
    else:
        # The update for `connected` (the running version still) clears the note.
        assert notes[:3] == [
            ("running", None), ("running", "reconnecting: the stream closed before the batch stopped"),
            ("running", None)], notes


def test_a_long_poll_answered_after_failures_says_connected(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The long-poll's answer (here a 304: no change while the link was down) is the link back."""
    monkeypatch.setattr(dhub.watch, "RECONNECT_MIN_S", 0.0)
    running = {"id": "b", "name": "p", "deployment": "d",
               "state": {"state": "running", "steps": {}}}
    done = {**running, "outcome": "completed", "state": {"state": "stop", "steps": {}}}
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return httpx.Response(200, json=running, headers={"ETag": '"v1"'})
        if calls == 2:
            raise httpx.ConnectError("refused", request=request)
        if calls == 3:
            return httpx.Response(304, headers={"ETag": '"v1"'})
        if request.headers["If-None-Match"] == '"v2"':
            return httpx.Response(304, headers={"ETag": '"v2"'})
        return httpx.Response(200, json=done, headers={"ETag": '"v2"'})

    with DhubClient("http://api.test", "t", transport=httpx.MockTransport(handler)) as api:
        events = list(api.watch("p", "b", stream=False))
    assert [(e.kind, e.etag) for e in events] == [
        ("batch", '"v1"'), ("reconnecting", '"v1"'), ("connected", '"v1"'), ("batch", '"v2"'),
        ("end", '"v2"')]
    assert {e.via for e in events} == {"poll"}


def test_a_quiet_reopened_stream_is_not_counted_as_failing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream reopened after a drop, of a batch that then did not change for longer than
    `reconnect_for` (keep-alive comments only: a slow step), was still counted as one
    continuous failure since the drop: when it next dropped, the watch gave up at once with
    "lost the API for over 60 s" though the API had been there all along."""
    now = [0.0]
    monkeypatch.setattr(dhub.watch, "RECONNECT_MIN_S", 0.0)
    monkeypatch.setattr(dhub.watch, "time", types.SimpleNamespace(
        monotonic=lambda: now[0], sleep=lambda s: None))
    running = {"id": "b", "name": "p", "deployment": "d",
               "state": {"state": "running", "steps": {}}}
    done = {**running, "outcome": "completed", "state": {"state": "stop", "steps": {}}}
    calls = 0

    def quiet() -> Iterator[bytes]:
        for _ in range(8):  # two minutes of keep-alives, one every 15 s
            now[0] += 15.0
            yield b": keep-alive\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:  # one version, then the stream drops
            content: Any = (b'event: batch\nid: "v1"\ndata: ' + json.dumps(running).encode()
                            + b"\n\n")
        elif calls == 2:  # reopened: the batch does not change, then it drops again
            content = quiet()
        else:
            content = (b'event: batch\nid: "v2"\ndata: ' + json.dumps(done).encode()
                       + b"\n\nevent: end\ndata: {}\n\n")
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                              content=content)

    with DhubClient("http://api.test", "t", transport=httpx.MockTransport(handler)) as api:
        events = list(api.watch("p", "b", reconnect_for=60.0))
    assert [e.kind for e in events] == [
        "batch", "reconnecting", "connected", "reconnecting", "connected", "batch", "end"]
