"""The `dhub` client's own logic against scripted HTTP answers (httpx.MockTransport): the
fallbacks of `watch` (a server without streams, without long-poll), resuming a dropped stream
with Last-Event-ID, a batch deleted between two connections, giving up after the reconnect
budget (through the blocking client and the asyncio one); exit codes; where the token comes from; the view's percent, rate and ETA."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

import dhub.watch
from dhub import DhubClient, WatchEvent, exit_code
from dhub.aio import AsyncDhubClient
from dhub.config import ConfigError, resolve
from dhub.errors import ConnectionFailed
from dhub.models import Batch
from dhub.view import BatchView

PATH = "/api/v1/batches/p/b"


def batch(state: str = "running", outcome: str | None = None, **steps: dict[str, Any]) -> Batch:
    body: dict[str, Any] = {"id": "b", "name": "p", "deployment": "run-pipeline/p",
                            "state": {"state": state, "steps": steps or {
                                "extract": {"state": "running", "offsets": {"partition_0": 5}}}}}
    if outcome is not None:
        body["outcome"] = outcome
    return body  # type: ignore[return-value]


def sse(*events: tuple[str, str | None, Any]) -> bytes:
    out = b": keep-alive\n\n"
    for name, event_id, data in events:
        out += f"event: {name}\n".encode() + (f"id: {event_id}\n".encode() if event_id else b"")
        out += b"data: " + json.dumps(data).encode() + b"\n\n"
    return out


Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler) -> DhubClient:
    return DhubClient("http://api.test", "t", transport=httpx.MockTransport(handler))


def watch(driver: str, handler: Handler, **kwargs: Any) -> tuple[list[WatchEvent], Exception | None]:
    """The events of a watch through the blocking client or the asyncio one, and the error
    that ended it (None when it ended by itself)."""
    events: list[WatchEvent] = []
    if driver == "sync":
        try:
            events.extend(client(handler).watch("p", "b", **kwargs))
        except Exception as exc:
            return events, exc
        return events, None

    async def collect() -> Exception | None:
        async with AsyncDhubClient("http://api.test", "t", transport=httpx.MockTransport(handler)) as api:
            try:
                async for event in api.watch("p", "b", **kwargs):
                    events.append(event)
            except Exception as exc:
                return exc
        return None

    error = asyncio.run(collect())
    return events, error


DRIVERS = pytest.mark.parametrize("driver", ["sync", "async"])


@pytest.fixture(autouse=True)
def no_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dhub.watch, "RECONNECT_MIN_S", 0.0)
    monkeypatch.setattr(dhub.watch, "POLL_INTERVAL_S", 0.0)


@DRIVERS
def test_a_dropped_stream_is_resumed_with_last_event_id(driver: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        assert request.headers["Authorization"] == "Bearer t"
        assert request.headers["Accept"] == "text/event-stream"
        if len(seen) == 1:  # one version, then the connection ends without `end`
            return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                                  content=sse(("batch", '"v1"', batch())))
        # The server skips what the client has, so only the new version and `end` follow.
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                              content=sse(("batch", '"v2"', batch("stop", "completed")), ("end", None, {})))

    events, error = watch(driver, handler)
    assert error is None
    assert [e.kind for e in events] == ["batch", "reconnecting", "connected", "batch", "end"]
    assert "Last-Event-ID" not in seen[0].headers
    assert seen[1].headers["Last-Event-ID"] == '"v1"'
    assert events[-1].batch is not None and exit_code(events[-1].batch) == 0
    assert {e.via for e in events} == {"stream"}


@DRIVERS
def test_a_server_without_streams_is_long_polled(driver: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:  # the stream request, answered as a plain GET
            return httpx.Response(200, json=batch(), headers={"ETag": '"v1"'})
        if len(seen) == 2:  # the wait ends without a change
            return httpx.Response(304, headers={"ETag": '"v1"'})
        return httpx.Response(200, json=batch("stop", "failed"), headers={"ETag": '"v2"'})

    events, error = watch(driver, handler)
    assert error is None
    assert [(e.kind, e.via) for e in events] == [("batch", "poll"), ("batch", "poll"), ("end", "poll")]
    # Long-polls naming the first version until the final one, then one more for as long as
    # the stream waits before `end` (an outcome can still be settled): it brought no change.
    assert [(r.headers["If-None-Match"], r.url.params["wait"]) for r in seen[1:]] == [
        ('"v1"', "30"), ('"v1"', "30"), ('"v2"', str(dhub.watch.END_QUIET_S))]
    for request in seen[1:]:
        assert "text/event-stream" not in request.headers.get("Accept", "")
    assert events[-1].batch is not None and exit_code(events[-1].batch) == 1


@DRIVERS
def test_a_server_refusing_wait_is_polled_plainly(driver: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if "wait" in request.url.params:
            return httpx.Response(400, json={"error": {"code": "bad_request", "message": "no"}})
        if len(seen) == 1:
            return httpx.Response(200, json=batch(), headers={"ETag": '"v1"'})
        if request.headers.get("If-None-Match") == '"v1"' and len(seen) < 5:
            return httpx.Response(304)
        return httpx.Response(200, json=batch("stop", "cancelled"), headers={"ETag": '"v2"'})

    events, error = watch(driver, handler, stream=False)
    assert error is None
    assert [e.kind for e in events] == ["batch", "batch", "end"]
    assert "wait" not in seen[-1].url.params  # after the 400, plain GETs
    assert events[-1].batch is not None and exit_code(events[-1].batch) == 2


@DRIVERS
def test_a_batch_gone_between_connections_is_deleted(driver: str) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                                  content=sse(("batch", '"v1"', batch())))
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "unknown batch"}})

    events, error = watch(driver, handler)
    assert error is None
    assert [e.kind for e in events] == ["batch", "reconnecting", "deleted"]


@DRIVERS
def test_the_watch_gives_up_after_its_reconnect_budget(driver: str) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                                  content=sse(("batch", '"v1"', batch())))
        raise httpx.ConnectError("refused", request=request)

    events, error = watch(driver, handler, reconnect_for=0.0)
    assert [e.kind for e in events] == ["batch", "reconnecting"]
    assert isinstance(error, ConnectionFailed) and "lost the API" in str(error)


def test_exit_codes_from_outcomes_and_steps() -> None:
    assert exit_code(batch("running")) is None
    assert [exit_code(batch("stop", o)) for o in ("completed", "failed", "crashed", "cancelled")] == [0, 1, 1, 2]
    ok = {"state": "success", "offsets": {}}
    assert exit_code(batch("stop", None, a=ok, b=ok)) == 0
    assert exit_code(batch("stop", None, a=ok, b={"state": "failed", "offsets": {}})) == 1
    assert exit_code(batch("stop", None, a=ok, b={"state": "none", "offsets": {}})) == 2


def test_the_token_comes_from_dhub_token_then_the_state_dirs_file(tmp_path: Path) -> None:
    (tmp_path / "api-token").write_text("from-file\n")
    env = {"DHUB_STATE_DIR": str(tmp_path)}
    assert resolve(env=env).token == "from-file"
    assert resolve(env=env).url == "http://127.0.0.1:8080"
    assert resolve(env={**env, "DHUB_TOKEN": "from-env", "DHUB_URL": "http://h:1/"}).token == "from-env"
    assert resolve(env={**env, "DHUB_URL": "http://h:1/"}).url == "http://h:1"
    assert resolve("https://x", env=env).url == "https://x"
    with pytest.raises(ConfigError, match="no API token"):
        resolve(env={"DHUB_STATE_DIR": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match="http"):
        resolve(env={**env, "DHUB_URL": "ftp://h"})


def render(view: BatchView, now: float) -> str:
    console = Console(width=120, record=True, color_system=None, file=io.StringIO())
    console.print(view.render(now))
    return console.export_text()


def test_the_view_shows_percent_rate_and_eta_when_the_step_carries_them() -> None:
    view = BatchView("p", verbose=True)
    view.update(batch(extract={"state": "running", "offsets": {"partition_0": 500, "partition_1": 1500},
                               "totals": {"partition_0": 1000, "partition_1": 3000},
                               "progress": {"percent": 50.0, "records_per_s": 2000.0, "eta_s": 65.0}},
                      load={"state": "none", "offsets": {}}))
    text = render(view, 0.0)
    assert "2,000/4,000 rec" in text and "50%" in text and "2,000/s" in text and "eta 01:05" in text
    # Per partition: percent from its own total; no ETA without a measured rate.
    assert "500/1,000 rec" in text and "1,500/3,000 rec" in text
    assert text.count("%") == 3  # the step and its two partitions; not load (no total)


def test_without_totals_the_view_shows_records_and_a_measured_rate_only() -> None:
    view = BatchView("p")
    steps: dict[str, Any] = {"extract": {"state": "running", "offsets": {"partition_0": 100}}}
    view.update(batch(**steps))
    first = render(view, 0.0)
    assert "100 rec" in first and "%" not in first and "eta" not in first
    # A second version: the rate is measured from the offsets between them.
    view.update(batch(extract={"state": "running", "offsets": {"partition_0": 5100}}))
    text = render(view, time.monotonic() + 1.0)
    assert "5,100 rec" in text and "%" not in text and "eta" not in text
    assert "/s" in text


def test_the_command_line_loads_none_of_the_services_code() -> None:
    code = ("import sys, dhub.cli\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    roots = set(out.stdout.split())
    assert {"dhub", "httpx", "rich", "yaml"} <= roots
    assert not roots & {"core", "service", "consumers", "pipelines", "prefect", "pydantic", "redis"}, roots


def test_the_bars_give_way_on_a_narrow_terminal() -> None:
    view = BatchView("p", verbose=True)
    view.update(batch(extract={"state": "success", "offsets": {"partition_0": 20_000},
                               "totals": {"partition_0": 20_000}}))
    for width, bar in ((80, 16), (120, 30)):
        console = Console(width=width, record=True, color_system=None, file=io.StringIO())
        console.print(view)
        rows = console.export_text().splitlines()
        # One line per step and partition (none wrapped); full bars, narrower on a narrow screen.
        assert [r.split()[0] for r in rows[1:]] == ["extract", "partition_0"], rows
        assert all("20,000/20,000 rec" in r and r.split()[2] == "━" * bar for r in rows[1:]), rows


def test_a_stalled_batch_and_step_are_flagged() -> None:
    view = BatchView("p")
    stalled: Any = batch(extract={"state": "running", "offsets": {"partition_0": 5},
                                  "progress": {"percent": None, "records_per_s": 0.0, "eta_s": None,
                                               "stalled": True}})
    stalled["stalled"] = True
    view.update(stalled)
    text = render(view, 0.0)
    assert "running  stalled" in text.splitlines()[0]
    assert "running stalled" in text.splitlines()[1]
    view.update(batch())
    assert "stalled" not in render(view, 0.0)


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_an_empty_page_with_a_token_is_not_the_lists_end(driver: str) -> None:
    """The server may answer an empty page with a token (every batch it read was deleted
    between its reads, past its 8 reads): `dhub ls` took it for the end and listed nothing
    while an older batch was there throughout."""
    older = {"id": "b-old", "state": {"state": "stop"}}

    def handler(request: httpx.Request) -> httpx.Response:
        if "token" not in request.url.params:
            return httpx.Response(200, json={"items": {}, "token": "below-the-deleted"})
        assert request.url.params["token"] == "below-the-deleted"
        return httpx.Response(200, json={"items": {"b-old": older}, "token": None})

    if driver == "sync":
        listed = list(client(handler).batches("p", limit=1))
    else:
        async def collect() -> list[Any]:
            async with AsyncDhubClient("http://api.test", "t",
                                       transport=httpx.MockTransport(handler)) as api:
                return [batch async for batch in api.batches("p", limit=1)]
        listed = asyncio.run(collect())
    assert listed == [older]
