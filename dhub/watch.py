"""Following one batch until it stops: the push stream first, long-poll GETs when there is none,
reconnecting on its own.

The stream (`Accept: text/event-stream`) sends `event: batch` (id: the body's ETag, data: the
GET's JSON) per change, then `end` once the batch is `stop`, or `deleted`. A dropped stream is
reopened with `Last-Event-ID`, so nothing is repeated and the latest state is never missed.
A server that answers the stream request with plain JSON has no streams: then each round is a
long-poll (`If-None-Match` + `?wait=`), and if `wait` is refused too, a plain GET every
`POLL_INTERVAL_S`. Transport errors and 5xx answers are retried with backoff for
`reconnect_for` seconds of continuous failure, then `ConnectionFailed`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, cast
from urllib.parse import quote

import httpx

from dhub.errors import ApiError, ConnectionFailed, NotFound, raise_for
from dhub.models import Batch, is_final

if TYPE_CHECKING:
    from dhub.client import DhubClient

# The server sends a keep-alive comment every 15 s: this much silence means the link is dead.
STREAM_READ_S: Final = 45.0
POLL_WAIT_S: Final = 30
POLL_INTERVAL_S: Final = 2.0
RECONNECT_MIN_S: Final = 0.2
RECONNECT_MAX_S: Final = 5.0

Kind = Literal["batch", "end", "deleted", "reconnecting"]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """`batch`: a new version; `end`: the batch is `stop` (`batch` is its last version);
    `deleted`: gone (`batch` is the last version seen); `reconnecting`: the link failed
    (`error` says how) and is being re-established; `batch` is the last version seen."""

    kind: Kind
    batch: Batch | None
    etag: str | None = None
    error: str | None = None
    via: Literal["stream", "poll"] = "stream"


class _Closed(Exception):
    """The stream ended without `end` or `deleted` (cut off, or the API restarted)."""


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, str | None, str]]:
    """(event, id, data) per dispatched event of a text/event-stream; comments are skipped."""
    name, event_id, data = "message", None, list[str]()
    for line in lines:
        if not line:
            if data:
                yield name, event_id, "\n".join(data)
            name, event_id, data = "message", None, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            event_id = value


class Follower:
    def __init__(self, client: DhubClient, pipeline_id: str, batch_id: str, *,
                 reconnect_for: float, stream: bool) -> None:
        self._http = client.http
        self._path = f"/api/v1/batches/{quote(pipeline_id, safe='')}/{quote(batch_id, safe='')}"
        self._reconnect_for = reconnect_for
        self.mode: Literal["stream", "poll"] = "stream" if stream else "poll"
        self._wait = True  # the server holds If-None-Match GETs (`?wait=`)
        self.etag: str | None = None
        self.last: Batch | None = None
        self._body: str | None = None

    def events(self) -> Iterator[WatchEvent]:
        failing_since: float | None = None
        delay = RECONNECT_MIN_S
        while True:
            try:
                rounds = self._stream() if self.mode == "stream" else self._poll()
                for event in rounds:
                    failing_since, delay = None, RECONNECT_MIN_S
                    yield event
                    if event.kind in ("end", "deleted"):
                        return
                if self.mode == "poll":
                    continue
                raise _Closed("the stream closed before the batch stopped")
            except NotFound:
                if self.last is None:
                    raise
                yield WatchEvent("deleted", self.last, self.etag, via=self.mode)
                return
            except (httpx.RequestError, ApiError, _Closed, ValueError) as exc:
                # ValueError: a body that is not a batch's JSON (a proxy's error page, a cut line).
                if isinstance(exc, ApiError) and not exc.retryable:
                    raise
                if self.last is None and isinstance(exc, httpx.ConnectError):
                    # Never reached: a wrong URL or a stopped API, not a link that dropped.
                    url = self._http.base_url
                    raise ConnectionFailed(f"cannot reach the API at {url}: {exc}") from exc
                now = time.monotonic()
                failing_since = now if failing_since is None else failing_since
                if now - failing_since > self._reconnect_for:
                    raise ConnectionFailed(
                        f"lost the API for over {self._reconnect_for:g} s: {exc}") from exc
                yield WatchEvent("reconnecting", self.last, self.etag, error=str(exc) or type(exc).__name__,
                                 via=self.mode)
                time.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)

    def _version(self, data: str, etag: str | None) -> WatchEvent | None:
        """The event for a received body; None when it is the version already seen."""
        if data == self._body or (etag is not None and etag == self.etag):
            return None
        self._body, self.etag = data, etag
        self.last = cast(Batch, json.loads(data))
        return WatchEvent("batch", self.last, etag, via=self.mode)

    def _stream(self) -> Iterator[WatchEvent]:
        headers = {"Accept": "text/event-stream"}
        if self.etag is not None:
            headers["Last-Event-ID"] = self.etag
        timeout = httpx.Timeout(10.0, connect=5.0, read=STREAM_READ_S)
        with self._http.stream("GET", self._path, headers=headers, timeout=timeout) as response:
            if not response.is_success:
                response.read()
                raise_for(response)
            if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
                # No streams on this server: it answered the plain GET. Long-poll from here.
                response.read()
                self.mode = "poll"
                event = self._version(response.text, response.headers.get("ETag"))
                if event is not None:
                    yield event
                if self.last is not None and is_final(self.last):
                    yield WatchEvent("end", self.last, self.etag, via="poll")
                return
            for name, event_id, data in parse_sse(response.iter_lines()):
                if name == "batch":
                    event = self._version(data, event_id)
                    if event is not None:
                        yield event
                elif name == "end":
                    yield WatchEvent("end", self.last, self.etag)
                    return
                elif name == "deleted":
                    yield WatchEvent("deleted", self.last, self.etag)
                    return

    def _poll(self) -> Iterator[WatchEvent]:
        """One round: a long-poll when there is a version to compare with, else a plain GET."""
        headers: dict[str, str] = {}
        params: dict[str, int] = {}
        had_version = self.last is not None
        timeout = httpx.Timeout(10.0, connect=5.0)
        if self.etag is not None:
            headers["If-None-Match"] = self.etag
            if self._wait:
                params["wait"] = POLL_WAIT_S
                timeout = httpx.Timeout(POLL_WAIT_S + 15.0, connect=5.0)
        response = self._http.get(self._path, headers=headers, params=params, timeout=timeout)
        if response.status_code == 400 and params:
            self._wait = False  # a server without long-poll: plain GETs at an interval
            return
        raise_for(response)
        if response.status_code != 304:
            event = self._version(response.text, response.headers.get("ETag"))
            if event is not None:
                yield event
                if self.last is not None and is_final(self.last):
                    yield WatchEvent("end", self.last, self.etag, via="poll")
                    return
        if had_version and not params:  # this round did not wait on the server: pace it
            time.sleep(POLL_INTERVAL_S)


def follow(client: DhubClient, pipeline_id: str, batch_id: str, *, reconnect_for: float = 60.0,
           stream: bool = True) -> Iterator[WatchEvent]:
    """The batch's versions until it stops (`end`) or is deleted (`deleted`)."""
    return Follower(client, pipeline_id, batch_id, reconnect_for=reconnect_for, stream=stream).events()
