"""The edge and the operator's tools telling the truth: which settings the API and the consumers
refuse to start on (and that they name the variable, never a secret), which passwords a log
line hides, and what `dhub` makes of a gateway's answers, a token it cannot send and a retry
whose first attempt is still in progress. Findings whose fix lies outside these files are in
tests/test_edge_truth_pending.py."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
from pydantic import ValidationError

from core.logs import JsonFormatter, scrub
from core.settings import BadSetting, Settings
from dhub import DhubClient
from dhub.cli import main
from dhub.errors import ApiError
from dhub.models import EXIT_ERROR
from service.auth import AuthConfigError, Authenticator
from tests.cache_support import engines
from tests.helpers import RSA_PUBLIC, api_settings


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis", "kafka")


# -- settings ------------------------------------------------------------------------------
@pytest.mark.parametrize(("variable", "value"), [
    # SET ... EX 0 fails: every POST's Idempotency-Key stays `pending` (an error logged) and
    # frees after 60 s, so a retry then runs a second batch.
    ("DHUB_IDEMPOTENCY_TTL_S", "0"),
    ("DHUB_IDEMPOTENCY_TTL_S", "-60"),
    # ZREMRANGEBYRANK seen 0 -1: every event id forgotten at once (no de-duplication).
    ("DHUB_DEDUP_WINDOW", "0"),
    # aiohttp reads a limit of 0 as none at all: any body accepted, however large.
    ("DHUB_MAX_BODY_BYTES", "0"),
])
def test_a_setting_out_of_its_range_is_refused_at_start_naming_it(
        monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert variable.removeprefix("DHUB_").lower() in str(info.value)


def test_an_unreadable_rs256_public_key_is_refused_at_start(test_settings: Settings) -> None:
    """A key the API cannot parse (here as an env file often carries it: `\\n` escapes for
    the newlines) started the API; then every RS256 token was answered 401 "invalid token:
    Could not parse the provided public key", blaming each client's token for the server's
    setting. Now the API does not start, and says which variable is wrong (not its value)."""
    escaped = RSA_PUBLIC.replace("\n", "\\n")
    for key in (escaped, "not a key"):
        settings = api_settings(test_settings, jwt_rs256_public_key=key)
        with pytest.raises(AuthConfigError) as info:
            Authenticator.from_settings(settings)
        assert "DHUB_JWT_RS256_PUBLIC_KEY" in str(info.value)
        assert key not in str(info.value)
    # A good key still starts.
    Authenticator.from_settings(api_settings(test_settings, jwt_rs256_public_key=RSA_PUBLIC))


# -- dhub ----------------------------------------------------------------------------------
def _proxy_error(request: httpx.Request) -> httpx.Response:
    # What a gateway in front of the API answers while the API restarts: JSON, not the API's.
    return httpx.Response(502, json={"error": "upstream connect error"})


def test_an_error_body_that_is_not_the_apis_is_an_api_error() -> None:
    """A 502 whose JSON `error` is a string (a gateway's) raised AttributeError inside the
    client: `dhub get` printed a traceback and "internal error", and a watch (which retries
    5xx answers) ended instead of reconnecting."""
    with (DhubClient("http://api.test", "t", transport=httpx.MockTransport(_proxy_error)) as api,
          pytest.raises(ApiError) as info):
        api.get("p", "b")
    assert info.value.status == 502 and info.value.retryable
    assert "upstream connect error" in info.value.message


def test_a_watch_reconnects_through_a_gateways_json_502() -> None:
    calls = 0
    done = {"id": "b", "name": "p", "deployment": "d", "outcome": "completed",
            "state": {"state": "stop", "steps": {}}}

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return _proxy_error(request)
        body = (b'event: batch\nid: "v1"\ndata: ' + json.dumps(done).encode()
                + b"\n\nevent: end\ndata: {}\n\n")
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"}, content=body)

    with DhubClient("http://api.test", "t", transport=httpx.MockTransport(handler)) as api:
        events = list(api.watch("p", "b"))
    assert [e.kind for e in events] == ["reconnecting", "connected", "batch", "end"]


# -- secrets in log lines ------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    # redis-py passes unknown query names to the connection: `?password=` is a password.
    "redis://db:6379/0?password=s3cret-in-query",
    "rediss://db:6380/0?ssl_password=s3cret-in-query&db=2",
    "redis://user:s3cret-in-query@db:6379/0?password=s3cret-in-query",
])
def test_a_password_in_the_urls_query_is_redacted(url: str) -> None:
    """The consumers log their Redis and Prefect URLs at start with their passwords masked;
    the masking used then hid only the userinfo's password: DHUB_REDIS_URL=
    redis://db:6379/0?password=... (a form redis-py takes) reached the log line whole."""
    redacted = scrub(url)
    assert "s3cret" not in redacted
    assert redacted.startswith(url.split("?")[0].replace(":s3cret-in-query@", ":***@"))
    assert scrub("redis://db:6379/0?db=3&socket_timeout=2") == (
        "redis://db:6379/0?db=3&socket_timeout=2")


@pytest.mark.parametrize("text", [
    "a" * 60_000 + "://" + "b" * 60_000,  # a refused config key, quoted in its refusal
    "1a" * 30_000 + "://x",
    "x://" * 30_000 + " ?password=p",
])
def test_scrubbing_a_long_text_takes_time_linear_in_it(text: str) -> None:
    """A refusal quoting a published command's config key (up to a Kafka record's size)
    went through `scrub` on the commands consumer's loop, whose patterns took time quadratic
    in a run of scheme-like text: ~20 s for a 120 KB key, every lane and heartbeat waiting.
    A fifth of the text scrubbed must cost about a fifth of the time, not a 25th."""
    def timed(sample: str) -> float:
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            scrub(sample)
            best = min(best, time.perf_counter() - started)
        return best

    small = text[: len(text) // 5]
    # Linear: ~5x; quadratic: ~25x. Floors keep a fast machine's noise out of the ratio.
    assert timed(text) < 12 * max(timed(small), 2e-4), "scrub is not linear in its text"
    assert scrub("see 1http://u:pw@h/x") == "see 1http://u:***@h/x"  # the scheme's start


def test_a_proxys_404_page_mid_watch_is_not_a_deleted_batch() -> None:
    """A gateway answering 404 with its own page while the API behind it is redeployed
    (ingress-nginx's "default backend - 404") ended a watch of a running batch as
    `deleted`: `dhub watch` printed "was deleted" and exited 2. Only the API's own 404 (its
    JSON error, code `not_found`) says the batch is gone; anything else is the link."""
    calls = 0
    running = {"id": "b", "name": "p", "deployment": "d",
               "state": {"state": "running", "steps": {}}}
    done = {**running, "outcome": "completed", "state": {"state": "stop", "steps": {}}}

    def stream(*events: bytes) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                              content=b"".join(events))

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:  # one version, then the API goes away
            return stream(b'event: batch\nid: "v1"\ndata: ' + json.dumps(running).encode()
                          + b"\n\n")
        if calls == 2:
            return httpx.Response(404, headers={"Content-Type": "text/html"},
                                  content=b"default backend - 404")
        return stream(b'event: batch\nid: "v2"\ndata: ' + json.dumps(done).encode() + b"\n\n",
                      b"event: end\ndata: {}\n\n")

    with DhubClient("http://api.test", "t", transport=httpx.MockTransport(handler)) as api:
        events = list(api.watch("p", "b"))
    assert [e.kind for e in events] == ["batch", "reconnecting", "reconnecting", "connected", "batch", "end"]
    assert events[-1].batch is not None and events[-1].batch.get("outcome") == "completed"


@pytest.mark.parametrize("token", ["s3cret-t\u00f8ken-0123", "\u201cs3cret-token-0123\u201d",
                                   "s3cret-token\u200b-0123", "s3cret\x7ftoken-0123"])
def test_a_token_no_header_can_carry_is_refused_without_echoing_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], token: str) -> None:
    """DHUB_TOKEN pasted with a curly quote, a zero-width space or a non-ASCII letter:
    httpx raised UnicodeEncodeError('ascii', 'Bearer <the token>', ...) and `dhub` printed
    "internal error: " with that repr (the whole token) and a traceback on stderr; a
    control character reached the API as "400 malformed HTTP request"."""
    monkeypatch.setenv("DHUB_TOKEN", token)
    monkeypatch.setenv("DHUB_URL", "http://127.0.0.1:9")  # never reached
    code = main(["ls", "p"])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR
    assert "DHUB_TOKEN" in err and "internal error" not in err
    assert "s3cret" not in err


@pytest.mark.parametrize(("url", "named"), [
    ("redis://:pw-s3cret@127.0.0.1:6379/dhub", "not a database number"),
    ("redis://:pw-s3cret@127.0.0.1:6379/db1", "not a database number"),
    ("127.0.0.1:6379", "must start with redis://"),
])
def test_a_redis_url_that_cannot_mean_what_it_says_is_refused_at_start(
        monkeypatch: pytest.MonkeyPatch, url: str, named: str) -> None:
    """redis-py reads a path that is not a number as no database at all: DHUB_REDIS_URL=
    redis://host:6379/dhub started the API and the consumers on database 0, silently. A URL
    without a scheme failed later, in redis-py's parser, without naming the variable."""
    monkeypatch.setenv("DHUB_REDIS_URL", url)
    with pytest.raises(BadSetting, match=named) as info:
        Settings()
    assert "DHUB_REDIS_URL" in str(info.value) and "s3cret" not in str(info.value)
    for good in ("redis://127.0.0.1:6379/13", "redis://:pw@db:6379", "rediss://db:6380/2/",
                 "redis://db:6379/x?db=3", "unix:///run/redis.sock?db=1"):
        monkeypatch.setenv("DHUB_REDIS_URL", good)
        assert Settings().redis_url == good


def test_a_run_whose_first_attempt_is_still_in_progress_waits_for_it() -> None:
    """`dhub run` retries a POST that timed out with the same Idempotency-Key. When the first
    attempt is still under way in the API (Kafka slow to acknowledge its run command), the
    retry is answered `409 in_progress` ("retry later"): `dhub run` exited 3 with that error
    and no batch id, while the first attempt went on to create and run the batch (a user
    running it again then started a second one). The same key is now tried again."""
    posts: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        posts.append(request)
        if len(posts) == 1:
            raise httpx.ReadTimeout("timed out", request=request)
        if len(posts) <= 4:
            return httpx.Response(409, json={"error": {
                "code": "in_progress", "message": "a request with this Idempotency-Key is "
                "still in progress; retry later"}})
        return httpx.Response(200, json={"item": "batch-1", "message": "accepted"})

    with DhubClient("http://api.test", "t", transport=httpx.MockTransport(handler)) as api:
        assert api.run("p") == "batch-1"
    assert len({r.headers["Idempotency-Key"] for r in posts}) == 1 and len(posts) == 5


def test_a_log_line_quoting_a_url_with_its_password_hides_it() -> None:
    """httpx and Prefect's client put the request's URL in their errors' text ("Server error
    '503 Service Unavailable' for url 'http://user:<password>@prefect:4200/api/...'"): with
    DHUB_PREFECT_API_URL carrying basic-auth credentials, every such error the consumers
    logged (a retry's warning, a traceback) wrote the password in the log line."""
    request = httpx.Request("GET", "http://ops:pw-s3cret@prefect:4200/api/flow_runs/x")
    error = httpx.HTTPStatusError(
        f"Server error '503 Service Unavailable' for url '{request.url}'", request=request,
        response=httpx.Response(503, request=request))
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.edge_truth.secrets")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("prefect unavailable (%s), retry 1/5", error)
        try:
            raise error
        except httpx.HTTPStatusError:
            logger.exception("call failed")
    finally:
        logger.removeHandler(handler)
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 2 and "s3cret" not in out.getvalue()
    assert "http://ops:***@prefect:4200/api/flow_runs/x" in lines[0]["msg"]
    assert "HTTPStatusError" in lines[1]["exc"]
