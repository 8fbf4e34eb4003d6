"""What `dhub` prints must be so when it prints it (the CLI truth review): the view's percents,
what `dhub stop` and `dhub run` say happened, the times `dhub ls` shows, the URL it is given.
Scripted HTTP answers (httpx.MockTransport) through `dhub.cli.main`, no stack needed."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from rich.console import Console

import dhub.cli
import dhub.client
import dhub.config
import dhub.view
import dhub.watch
from dhub import DhubClient
from dhub.aio import AsyncDhubClient
from dhub.errors import RETRY_AFTER_MAX_S, retry_after
from dhub.models import Batch
from dhub.view import BatchView

Handler = Callable[[httpx.Request], httpx.Response]


def batch(state: str = "running", outcome: str | None = None, **steps: Any) -> Batch:
    body: dict[str, Any] = {"id": "b", "name": "p", "deployment": "run-pipeline/p",
                            "created_at": "2026-12-03T07:55:00.000Z",
                            "updated_at": "2026-12-03T07:56:00.000Z",
                            "state": {"state": state, "steps": steps or {
                                "extract": {"state": "running", "offsets": {"partition_0": 5}}}}}
    if outcome is not None:
        body["outcome"] = outcome
    return body  # type: ignore[return-value]


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
            handler: Handler, *argv: str) -> tuple[int, str, str]:
    """`dhub argv` against `handler`: its exit code, stdout and stderr."""
    monkeypatch.setattr(dhub.cli, "DhubClient", lambda url: DhubClient(
        "http://api.test", "t", transport=httpx.MockTransport(handler)))
    code = dhub.cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def render(view: BatchView) -> str:
    console = Console(width=140, record=True, color_system=None, file=io.StringIO())
    console.print(view.render(0.0))
    return console.export_text()


# -- percent -------------------------------------------------------------------------------
def test_a_step_short_of_its_total_never_reads_100_percent() -> None:
    """The API rounds a step's percent down (99.9 for 9,996 of 10,000 records) so that 100.0
    means every record; `dhub watch`/`get` formatted it with no decimals and drew "100%" with
    four records left, and a partition's percent computed here from its total did the same."""
    view = BatchView("p", verbose=True)
    view.update(batch(extract={"state": "running",
                               "offsets": {"partition_0": 4_996, "partition_1": 5_000},
                               "totals": {"partition_0": 5_000, "partition_1": 5_000},
                               "progress": {"percent": 99.9}}))
    rows = {row.split()[0]: row for row in render(view).splitlines()[1:]}
    assert "99%" in rows["extract"] and "100%" not in rows["extract"], rows
    assert "99%" in rows["partition_0"] and "100%" not in rows["partition_0"], rows
    assert "100%" in rows["partition_1"], rows  # every record of it: 100


def test_a_percent_computed_here_is_not_rounded_down_below_what_is_done() -> None:
    """Rounding down must not take a whole percent from an exact one (29/100 as a float is
    28.999...)."""
    view = BatchView("p", verbose=True)
    view.update(batch(extract={"state": "running", "offsets": {"partition_0": 29},
                               "totals": {"partition_0": 100}}))
    rows = {row.split()[0]: row for row in render(view).splitlines()[1:]}
    assert "29%" in rows["extract"] and "29%" in rows["partition_0"], rows


def test_a_partition_past_its_total_does_not_make_up_for_one_short_of_it() -> None:
    """Without the API's percent (a server that sends none), the step's was computed from all
    its offsets over all its totals: 1,500 of 1,000 records in one partition and 500 of 1,000
    in the other read 100% (the API counts each partition up to its total: 75)."""
    view = BatchView("p")
    view.update(batch(extract={"state": "running",
                               "offsets": {"partition_0": 1_500, "partition_1": 500},
                               "totals": {"partition_0": 1_000, "partition_1": 1_000}}))
    row = render(view).splitlines()[1]
    assert "75%" in row and "100%" not in row, row


def test_a_time_without_a_zone_is_no_internal_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`dhub get` of a batch whose `created_at` carries no zone (a server not this one, data
    written by hand) raised TypeError subtracting it from the clock: "internal error", exit 3,
    for a batch it could show. A stopped batch without `updated_at` showed its time as
    growing until now."""
    naive = {**batch("running"), "created_at": "2026-12-03T07:55:00"}
    stopped: dict[str, Any] = {**batch("stop", "completed"), "created_at": "2020-01-01T00:00:00Z"}
    del stopped["updated_at"]
    for body in (naive, stopped):
        def handler(request: httpx.Request, body: Any = body) -> httpx.Response:
            return httpx.Response(200, json=body)

        code, out, err = run_cli(monkeypatch, capsys, handler, "get", "p", "b")
        assert code == 0 and "internal error" not in err, err
        assert "p b" in out.splitlines()[0]
        assert ":" not in out.splitlines()[0].split("b", 1)[1], out  # no elapsed time shown


# -- stop ----------------------------------------------------------------------------------
def _stop_api(now: Batch) -> tuple[Handler, list[str]]:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if request.method == "PUT":
            assert request.url.path == "/api/v1/batches/p/b/stop"
            return httpx.Response(200, json={"message": "Batch stopped successfully"})
        assert request.url.path == "/api/v1/batches/p/b"
        return httpx.Response(200, json=now)

    return handler, calls


def test_dhub_stop_of_a_running_batch_does_not_say_it_stopped(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The API answers the stop once it is queued, "Batch stopped successfully", while the
    batch runs on until the engine cancels its run (and may even complete first): `dhub stop`
    printed that sentence, so `dhub stop p b; dhub get p b` showed a batch still running."""
    handler, calls = _stop_api(batch("running"))
    code, out, err = run_cli(monkeypatch, capsys, handler, "stop", "p", "b")
    assert code == 0, err
    assert calls[0] == "PUT"
    assert "stopped successfully" not in out.lower()
    assert "stop requested" in out and "running" in out, out


def test_dhub_stop_of_a_finished_batch_says_how_it_ended(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A batch that had completed: `dhub stop` said it was "stopped successfully", as if the
    stop had cut it short."""
    handler, _ = _stop_api(batch("stop", "completed"))
    code, out, err = run_cli(monkeypatch, capsys, handler, "stop", "p", "b")
    assert code == 0, err
    assert "stopped successfully" not in out.lower()
    assert "completed" in out, out
    code, out, err = run_cli(monkeypatch, capsys, handler, "stop", "p", "b", "--json")
    line = json.loads(out)
    assert line["message"] == "Batch stopped successfully"  # the API's answer, as it came
    assert line["state"] == "stop" and line["outcome"] == "completed"


# -- run -----------------------------------------------------------------------------------
@pytest.fixture
def no_run_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dhub.client, "RUN_PAUSE_S", 0.0)
    monkeypatch.setattr(dhub.client, "IN_PROGRESS_PAUSE_S", 0.0)


def _lost_then(*after: Callable[[httpx.Request], httpx.Response]) -> tuple[Handler, list[httpx.Request]]:
    """A POST whose answer is lost (read timeout: the API may have created the batch), then
    each of `after` in turn, the last one for good."""
    posts: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        posts.append(request)
        if len(posts) == 1:
            raise httpx.ReadTimeout("timed out", request=request)
        return after[min(len(posts) - 2, len(after) - 1)](request)

    return handler, posts


def _refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def _created(request: httpx.Request) -> httpx.Response:
    return httpx.Response(202, json={"item": "batch-1", "message": "accepted"})


def test_a_run_whose_answer_was_lost_asks_again_while_the_api_restarts(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        no_run_pauses: None) -> None:
    """The first POST's answer is lost (the API restarting under it, after it created the
    batch); the retries with its Idempotency-Key meet the API down for a few seconds: `dhub
    run` gave up after two of them (1.5 s), exited 3 "cannot reach the API", as if nothing had
    started, while the batch ran (and the user's second `dhub run` started another). A run
    whose first attempt may have reached the API asks again until the API answers."""
    handler, posts = _lost_then(*[_refused] * 6, _created)
    code, out, err = run_cli(monkeypatch, capsys, handler, "run", "p")
    assert (code, out.strip()) == (0, "batch-1"), err
    assert len(posts) == 8 and len({r.headers["Idempotency-Key"] for r in posts}) == 1


def test_a_run_that_cannot_learn_its_fate_says_a_batch_may_have_started(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        no_run_pauses: None) -> None:
    """When the API stays away, `dhub run` said only that the API was unavailable: a second
    `dhub run` then started a second batch beside the one the lost attempt may have
    started. It now says so, with the key that finds out (`--idempotency-key`)."""
    monkeypatch.setattr(dhub.client, "UNKNOWN_FOR_S", 0.0)
    unavailable = httpx.Response(503, json={"error": {"code": "unavailable",
                                                      "message": "retry later"}})
    handler, posts = _lost_then(lambda request: unavailable)
    code, out, err = run_cli(monkeypatch, capsys, handler, "run", "p")
    key = posts[0].headers["Idempotency-Key"]
    assert code == 3 and out == ""
    assert "may have started" in err and f"--idempotency-key {key}" in err, err

    # Asking again with that key: the API answers the batch the lost attempt created.
    code, out, err = run_cli(monkeypatch, capsys, _created_for(key), "run", "p",
                             "--idempotency-key", key)
    assert (code, out.strip()) == (0, "batch-1"), err


def _created_for(key: str) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Idempotency-Key"] == key
        return _created(request)

    return handler


def test_a_run_refused_outright_is_not_said_to_have_maybe_started(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        no_run_pauses: None) -> None:
    """The API's own 503 (a dependency down) releases the key: nothing started, and `dhub run`
    says only that, after its few retries."""
    posts: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        posts.append(request)
        return httpx.Response(503, json={"error": {"code": "unavailable", "message": "retry later"}})

    code, _, err = run_cli(monkeypatch, capsys, handler, "run", "p")
    assert code == 3 and "503 unavailable" in err and "may have started" not in err
    assert len(posts) == 1 + dhub.client.RUN_RETRIES

    # Nor one that never left: the connection refused, a proxy refusing the tunnel.
    for error in (httpx.ConnectError, httpx.ProxyError):
        posts.clear()

        def unsent(request: httpx.Request, error: type[httpx.TransportError] = error) -> httpx.Response:
            posts.append(request)
            raise error("refused", request=request)

        code, _, err = run_cli(monkeypatch, capsys, unsent, "run", "p")
        assert code == 3 and "may have started" not in err, err
        assert len(posts) == 1 + dhub.client.RUN_RETRIES


def test_ctrl_c_during_a_run_names_the_key_that_finds_its_batch(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C while `dhub run` waited for its POST's answer (or retried it) exited 130 without
    a word, though the API may have started the batch."""
    posts: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        posts.append(request)
        raise KeyboardInterrupt

    code, out, err = run_cli(monkeypatch, capsys, handler, "run", "p")
    assert code == 130 and out == ""
    assert f"--idempotency-key {posts[0].headers['Idempotency-Key']}" in err, err


def test_the_asyncio_client_asks_again_as_long_too(no_run_pauses: None) -> None:
    handler, posts = _lost_then(*[_refused] * 6, _created)

    async def run() -> str:
        async with AsyncDhubClient("http://api.test", "t",
                                   transport=httpx.MockTransport(handler)) as api:
            return await api.run("p")

    assert asyncio.run(run()) == "batch-1" and len(posts) == 8


# -- ls ------------------------------------------------------------------------------------
def test_dhub_ls_says_its_times_are_utc(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`dhub ls` cut the API's `created_at` (UTC, `...Z`) to "2026-12-03 07:55:00" with no zone:
    read in Seoul as 07:55 local, nine hours before the batch was created. A time with
    another offset was cut the same way, its offset dropped."""
    other = {**batch("stop", "completed"), "id": "b2", "created_at": "2026-12-03T16:55:00.000+09:00"}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"items": {"b2": other, "b": batch()}, "token": None})

    monkeypatch.setenv("TZ", "Asia/Seoul")
    code, out, err = run_cli(monkeypatch, capsys, handler, "ls", "p")
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert "UTC" in rows["BATCH"], out
    assert "2026-12-03 07:55:00" in rows["b"] and "2026-12-03 07:55:00" in rows["b2"], out


# -- config --------------------------------------------------------------------------------
def test_a_url_with_a_password_is_refused_without_echoing_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """DHUB_URL=http://ops:<password>@host: httpx sent the user and password as Basic auth in
    place of the token (every request a 401, "invalid token", while DHUB_TOKEN was good), and
    with the API down `dhub` printed "cannot reach the API at http://ops:<password>@...".
    Refused at start, naming the variable, never the URL."""
    monkeypatch.setenv("DHUB_TOKEN", "t")
    for argv, env in ((["ls", "p"], "http://ops:s3cret-pw@127.0.0.1:9"),
                      (["--url", "http://ops:s3cret-pw@127.0.0.1:9", "ls", "p"], None),
                      (["--json", "ls", "p"], "127.0.0.1:s3cret-pw")):
        if env is None:
            monkeypatch.delenv("DHUB_URL", raising=False)
        else:
            monkeypatch.setenv("DHUB_URL", env)
        code = dhub.cli.main(argv)
        err = capsys.readouterr().err
        assert code == 3 and "s3cret" not in err, err
        assert ("--url" if env is None else "DHUB_URL") in err, err
    sent: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("Authorization"))
        return httpx.Response(200, json={"items": {}, "token": None})

    with pytest.raises(dhub.config.ConfigError):
        DhubClient("http://ops:s3cret-pw@api.test", "t", transport=httpx.MockTransport(handler))
    assert sent == []
    with DhubClient("http://api.test/", "t", transport=httpx.MockTransport(handler)) as api:
        assert list(api.batches("p")) == [] and sent == ["Bearer t"]



# -- watch ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("state", "said"), [("stop", "had stopped: completed"),
                                              ("running", "is not stopped")])
@pytest.mark.parametrize("json_out", [False, True])
def test_ctrl_c_during_a_watch_says_whether_the_batch_runs_on(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        state: str, said: str, json_out: bool) -> None:
    """Ctrl-C during a watch said "b is not stopped (dhub stop p b)" whatever the batch was:
    also for one already `stop` (Ctrl-C while the watch waits out the 2 s its outcome may
    still settle in, or while it reconnects), which had completed."""
    monkeypatch.setattr(dhub.watch, "RECONNECT_MIN_S", 0.0)
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:  # the version, then the link drops before `end`
            version = batch(state, "completed" if state == "stop" else None)
            return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                                  content=b'event: batch\nid: "v1"\ndata: '
                                  + json.dumps(version).encode() + b"\n\n")
        raise KeyboardInterrupt

    argv = ["watch", "p", "b"] + (["--json"] if json_out else [])
    code, _, err = run_cli(monkeypatch, capsys, handler, *argv)
    assert code == 130 and f"b {said}" in err, err


def _stream(*events: bytes) -> httpx.Response:
    return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                          content=b"".join(events))


def _version(tag: str, body: Batch) -> bytes:
    return f'event: batch\nid: "{tag}"\ndata: '.encode() + json.dumps(body).encode() + b"\n\n"


def _watch_through(monkeypatch: pytest.MonkeyPatch, *middle: httpx.Response
                   ) -> tuple[Handler, list[float]]:
    """A watch's API: a running version, then the `middle` answers one per request, then the
    completed version and `end`; and the pauses the watch took (not slept)."""
    monkeypatch.setattr(dhub.watch, "RECONNECT_MIN_S", 0.0)
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    answers = [_stream(_version("v1", batch("running"))), *middle]

    def handler(request: httpx.Request) -> httpx.Response:
        if answers:
            return answers.pop(0)
        return _stream(_version("v2", batch("stop", "completed")), b"event: end\ndata: {}\n\n")

    return handler, slept


@pytest.mark.parametrize("status", [429, 503])
def test_a_watch_told_to_retry_later_waits_and_goes_on(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], status: int) -> None:
    """A gateway's 429 (Too Many Requests, Retry-After: 1) while a watch reconnected ended the
    watch: exit 3 "429 http_error", while the batch ran on to complete. A 429 or 503 is
    "retry later": the watch waits as long as Retry-After says (no less than its own
    backoff) and goes on, within its reconnect budget."""
    handler, slept = _watch_through(monkeypatch, httpx.Response(
        status, headers={"Retry-After": "1"}, text="slow down"))
    code, out, err = run_cli(monkeypatch, capsys, handler, "watch", "p", "b", "--json")
    assert code == 0, err
    assert [json.loads(line)["event"] for line in out.splitlines()] == [
        "batch", "reconnecting", "reconnecting", "connected", "batch", "end"]
    assert 1.0 in slept, slept


def test_a_run_told_to_retry_later_waits_as_long(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        no_run_pauses: None) -> None:
    """A 429 to `dhub run` (nothing started: the request was refused) ended it at once with
    exit 3, though the answer says to try again after Retry-After."""
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    posts: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        posts.append(request)
        if len(posts) == 1:
            return httpx.Response(429, headers={"Retry-After": "2"}, text="slow down")
        return _created(request)

    code, out, err = run_cli(monkeypatch, capsys, handler, "run", "p")
    assert (code, out.strip()) == (0, "batch-1"), err
    assert slept == [2.0]
    # Seconds or an HTTP date; bounded; unreadable is none.
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after("86400") == RETRY_AFTER_MAX_S and retry_after("soon") is None


def test_run_watch_reconnects_when_the_api_restarts_right_after_the_post(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`dhub run --watch`: the API answered the POST, then went down (a restart) before the
    watch's first request: the watch took the refused connection for "never reached" (a
    wrong URL) and exited 3 at once, "cannot reach the API", though --reconnect-for promises
    60 s of reconnecting; the batch ran on to complete. Once this client had an answer from
    the API, a refused connection is the link failing."""
    monkeypatch.setattr(dhub.watch, "RECONNECT_MIN_S", 0.0)
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if request.method == "POST":
            return _created(request)
        if len(calls) <= 3:
            raise httpx.ConnectError("connection refused", request=request)
        done: Any = {**batch("stop", "completed"), "id": "batch-1"}
        return _stream(_version("v1", done), b"event: end\ndata: {}\n\n")

    code, out, err = run_cli(monkeypatch, capsys, handler, "run", "p", "--watch", "--json")
    assert code == 0, err
    assert [json.loads(line)["event"] for line in out.splitlines()] == [
        "created", "reconnecting", "reconnecting", "connected", "batch", "end"]


# -- answers that are not the API's ----------------------------------------------------------
def test_an_answer_that_is_not_json_is_not_called_a_bug_of_dhub(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A 200 that is not JSON (a captive portal, a gateway's login page, a wrong --url):
    `dhub get` printed a traceback and "internal error: JSONDecodeError(...)", a bug of dhub's
    own by its words, when the answer was not the API's."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Type": "text/html"},
                              content=b"<html>sign in</html>")

    for argv in (["get", "p", "b"], ["ls", "p"], ["--json", "stop", "p", "b"]):
        code, out, err = run_cli(monkeypatch, capsys, handler, *argv)
        assert code == 3 and out == "", (argv, out)
        assert "internal error" not in err and "Traceback" not in err, err
        assert "not JSON" in err and "text/html" in err, err


@pytest.mark.parametrize("json_out", [False, True])
def test_an_end_after_a_version_not_stopped_is_not_completed(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        json_out: bool) -> None:
    """A stream whose `end` follows a version that is not `stop` (a server not keeping the
    contract, a proxy replaying an old stream): `dhub watch --json` computed its exit code
    as `exit_code(batch) or 0` and said `"exit_code": 0`, completed, for a running batch, while
    the same watch without --json exited 2."""
    def handler(request: httpx.Request) -> httpx.Response:
        return _stream(_version("v1", batch("running")), b"event: end\ndata: {}\n\n")

    argv = ["watch", "p", "b"] + (["--json"] if json_out else [])
    code, out, err = run_cli(monkeypatch, capsys, handler, *argv)
    assert code == 2, (out, err)
    if json_out:
        assert json.loads(out.splitlines()[-1])["exit_code"] == 2


def test_a_step_with_totals_for_some_partitions_only_shows_no_percent() -> None:
    """The API gives no percent for a step that reported totals for some of its partitions
    (over those alone it read 100% while the others went on); `dhub` made one up from the
    partitions with totals: 100%, a full bar over 1,000 of 1,000 records while 700 more
    were done elsewhere."""
    view = BatchView("p")
    view.update(batch(extract={"state": "running",
                               "offsets": {"partition_0": 1_000, "partition_1": 700},
                               "totals": {"partition_0": 1_000},
                               "progress": {"percent": None, "eta_s": None}}))
    row = next(r for r in render(view).splitlines()[1:] if r.split()[0] == "extract")
    assert "%" not in row and "1,700 rec" in row and "/1,000" not in row, row


def test_the_run_to_ask_again_with_names_the_version_asked_for(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        no_run_pauses: None) -> None:
    """`dhub run p --version 2` that lost its answer printed `dhub run p --idempotency-key K`:
    the API answers a key's batch only to the request it was made for (a 409 then), and had
    the lost attempt started nothing, that advice started the latest version, not 2."""
    monkeypatch.setattr(dhub.client, "UNKNOWN_FOR_S", 0.0)
    unavailable = httpx.Response(503, json={"error": {"code": "unavailable",
                                                      "message": "retry later"}})
    handler, posts = _lost_then(lambda request: unavailable)
    code, _, err = run_cli(monkeypatch, capsys, handler, "run", "p", "--version", "2")
    key = posts[0].headers["Idempotency-Key"]
    assert code == 3 and f"dhub run p --version 2 --idempotency-key {key}" in err, err

    def interrupted(request: httpx.Request) -> httpx.Response:
        posts.append(request)
        raise KeyboardInterrupt

    posts.clear()
    code, _, err = run_cli(monkeypatch, capsys, interrupted, "run", "p", "--version", "2")
    key = posts[0].headers["Idempotency-Key"]
    assert code == 130 and f"dhub run p --version 2 --idempotency-key {key}" in err, err


def test_a_retry_after_never_holds_a_watch_past_its_reconnect_budget(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A 503 with Retry-After: 60 to a watch given `--reconnect-for 5` slept 60 s before it
    could give up; and a Retry-After of "²" (a latin-1 byte 0xB2, a digit to str.isdigit)
    raised ValueError: an internal error, exit 3."""
    handler, slept = _watch_through(
        monkeypatch, httpx.Response(503, headers={"Retry-After": "60"}, text="later"),
        httpx.Response(503, headers=[(b"Retry-After", b"\xb2")], text="later"))  # "²"

    code, _, err = run_cli(monkeypatch, capsys, handler, "watch", "p", "b", "--json",
                           "--reconnect-for", "5")
    assert code == 0, err
    assert slept and max(slept) <= 5.1, slept
    assert retry_after("\u00b2") is None


def test_small_ends_of_the_diff_review(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Three: `dhub ls` showed a time without a zone under "CREATED (UTC)" as if UTC; a
    DHUB_URL of "http://[bad" raised ValueError, an internal error instead of a config one;
    without the API's ETA, `dhub` made one from all offsets, so a partition past its total
    hid one short of it ("0s" left with 500 records to go)."""
    naive = {**batch("stop", "completed"), "id": "b3", "created_at": "2026-12-03T07:55:00"}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"items": {"b3": naive}, "token": None})

    code, out, _ = run_cli(monkeypatch, capsys, handler, "ls", "p")
    row = next(line for line in out.splitlines() if line.split()[:1] == ["b3"])
    assert code == 0 and "(no zone)" in row, out

    with pytest.raises(dhub.config.ConfigError, match="DHUB_URL"):
        dhub.config.check_url("http://[bad", "DHUB_URL")

    fig = dhub.view.figures({"state": "running", "offsets": {}},
                            {"partition_0": 1_500, "partition_1": 500},
                            {"partition_0": 1_000, "partition_1": 1_000}, 100.0,
                            use_progress=False)
    assert fig.eta_s == 5.0, fig  # 500 records left at 100/s
