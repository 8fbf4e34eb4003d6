"""Following one batch until it stops: the push stream first, long-poll GETs when there is none,
reconnecting on its own.

The stream (`Accept: text/event-stream`) sends `event: batch` (id: the body's ETag, data: the
GET's JSON) per change, then `end` once the batch is `stop`, or `deleted`. A dropped stream is
reopened with `Last-Event-ID`, so nothing is repeated and the latest state is never missed.
A server that answers the stream request with plain JSON has no streams: then each round is a
long-poll (`If-None-Match` + `?wait=`), and if `wait` is refused too, a plain GET every
`POLL_INTERVAL_S`; once a polled version is `stop`, one more round (a wait of `END_QUIET_S`)
must bring no change before `end`, as the stream waits. Transport errors, 5xx and 429 answers
are retried with backoff (at least the answer's Retry-After) for `reconnect_for` seconds of
continuous failure, then `ConnectionFailed`.

`Follower` decides (which request next, what an answer means, whether to retry) without doing
any I/O, so the blocking driver here (`follow`) and the asyncio one (`dhub.aio`) share it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
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
# A stopped batch's outcome can still be settled by a later stop event (a run Prefect completed
# after a cancel): the push stream sends `end` only after this much quiet (service.streams'
# END_QUIET_S), and a polled watch waits as long for no change before it ends.
END_QUIET_S: Final = 2
RECONNECT_MIN_S: Final = 0.2
RECONNECT_MAX_S: Final = 5.0
# The error code of the API's own 404 (a gateway's 404 carries none).
API_NOT_FOUND: Final = "not_found"

Kind = Literal["batch", "end", "deleted", "reconnecting", "connected"]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """`batch`: a new version; `end`: the batch is `stop` (`batch` is its last version);
    `deleted`: gone (`batch` is the last version seen); `reconnecting`: the link failed
    (`error` says how) and is being re-established; `connected`: after `reconnecting`, the API
    answered again (a stream reopened, a poll answered), handed out before whatever that answer
    brings (a reopened stream of an unchanged batch brings nothing until it changes). For
    both, `batch` is the last version seen."""

    kind: Kind
    batch: Batch | None
    etag: str | None = None
    error: str | None = None
    via: Literal["stream", "poll"] = "stream"


class Closed(Exception):
    """The stream ended without `end` or `deleted` (cut off, or the API restarted)."""


# What a watch retries: the link (httpx), a 5xx or 429, a cut stream, a body that is not a batch's
# JSON (a proxy's error page, a cut line). Other API errors (401, 400, ...) end it.
RETRIED: Final = (httpx.RequestError, ApiError, Closed, ValueError)


class SseParser:
    """A text/event-stream, a line at a time: `feed` returns (event, id, data) when a blank
    line dispatches an event with data; comment lines (`: keep-alive`) are skipped."""

    def __init__(self) -> None:
        self._name = "message"
        self._id: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str | None, str] | None:
        if not line:
            event = (self._name, self._id, "\n".join(self._data)) if self._data else None
            self._name, self._id, self._data = "message", None, []
            return event
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._name = value
        elif field == "data":
            self._data.append(value)
        elif field == "id":
            self._id = value
        return None


@dataclass(frozen=True, slots=True)
class Round:
    """One request of a watch: a stream, or a (long-)poll GET."""

    stream: bool
    headers: dict[str, str]
    params: dict[str, int]
    timeout: httpx.Timeout


def is_stream(response: httpx.Response) -> bool:
    content_type: str = response.headers.get("Content-Type", "")
    return content_type.startswith("text/event-stream")


class Follower:
    """The decisions of a watch of `path`, without I/O. A driver loops: `next_round()`, send
    it; a plain answer goes to `answered` (after reading its body), a stream's lines to
    `line`, a stream that ends to `stream_ended`, an exception to `failed`; each returns the
    events to hand out; stop once `done`, sleep `pause()` between rounds."""

    def __init__(self, pipeline_id: str, batch_id: str, *, reconnect_for: float, stream: bool,
                 url: str = "", reached: bool = False) -> None:
        self._url = url
        # The client has had an answer from the API before (`run --watch`'s POST, the latest
        # batch's GET): a refused connection is then the link failing, not a wrong URL.
        self._reached = reached
        self.path = f"/api/v1/batches/{quote(pipeline_id, safe='')}/{quote(batch_id, safe='')}"
        self._reconnect_for = reconnect_for
        self.mode: Literal["stream", "poll"] = "stream" if stream else "poll"
        self._wait = True  # the server holds If-None-Match GETs (`?wait=`)
        self.etag: str | None = None
        self.last: Batch | None = None
        self._body: str | None = None
        self.done = False
        self._failing_since: float | None = None
        self._delay = RECONNECT_MIN_S
        self._paced = False  # the last round did not wait on the server
        self._reconnecting = False  # `reconnecting` was handed out, no answer has come since
        self._settling = False  # polled: a final version seen, waiting END_QUIET_S for no change
        self._parser = SseParser()

    def next_round(self) -> Round:
        self._parser = SseParser()
        if self.mode == "stream":
            headers = {"Accept": "text/event-stream"}
            if self.etag is not None:
                headers["Last-Event-ID"] = self.etag
            return Round(True, headers, {}, httpx.Timeout(10.0, connect=5.0, read=STREAM_READ_S))
        if self.etag is None:
            return Round(False, {}, {}, httpx.Timeout(10.0, connect=5.0))
        if not self._wait:
            return Round(False, {"If-None-Match": self.etag}, {}, httpx.Timeout(10.0, connect=5.0))
        wait = END_QUIET_S if self._settling else POLL_WAIT_S
        return Round(False, {"If-None-Match": self.etag}, {"wait": wait},
                     httpx.Timeout(wait + 15.0, connect=5.0))

    def pause(self) -> float:
        """How long to wait before the next round: only plain polling is paced here."""
        return POLL_INTERVAL_S if self._paced and not self.done else 0.0

    def _alive(self) -> None:
        self._failing_since, self._delay = None, RECONNECT_MIN_S

    def _back(self) -> list[WatchEvent]:
        """`connected` when an answer arrives after `reconnecting`: without it the watch's last
        word stays `reconnecting` until the batch next changes, though the link is back."""
        if not self._reconnecting:
            return []
        self._reconnecting = False
        return [WatchEvent("connected", self.last, self.etag, via=self.mode)]

    def opened(self) -> list[WatchEvent]:
        """A stream's response arrived (before any line of it)."""
        return self._back()

    def _version(self, data: str, etag: str | None) -> list[WatchEvent]:
        if data == self._body or (etag is not None and etag == self.etag):
            return []
        self._body, self.etag = data, etag
        self.last = cast(Batch, json.loads(data))
        return [WatchEvent("batch", self.last, etag, via=self.mode)]

    def _finish(self, kind: Kind) -> list[WatchEvent]:
        self.done = True
        return [WatchEvent(kind, self.last, self.etag, via=self.mode)]

    def answered(self, response: httpx.Response, round_: Round) -> list[WatchEvent]:
        """A plain (read) answer: to a poll, or to a stream request on a server without streams."""
        self._paced = False
        if round_.params and response.status_code == 400:
            self._wait = False  # a server without long-poll: plain GETs at an interval
            self._alive()
            return self._back()
        raise_for(response)
        self._alive()
        if round_.stream:
            self.mode = "poll"  # no streams on this server: it answered the plain GET
        self._paced = self.mode == "poll" and not round_.params and self.last is not None
        events = self._back()
        if response.status_code == 304:
            return events + (self._finish("end") if self._settling else [])
        events += self._version(response.text, response.headers.get("ETag"))
        if self.last is not None and is_final(self.last):
            # `end` once a round after the final version brings no change: its outcome may
            # still be settled by a later stop event, which the stream waits out too.
            if self._settling and not any(e.kind == "batch" for e in events):
                events += self._finish("end")
            self._settling = True
        else:
            self._settling = False
        return events

    def line(self, line: str) -> list[WatchEvent]:
        """One line of the stream."""
        # Any line, a keep-alive comment too, is the link working: `reconnect_for` counts
        # continuous failure only, not the quiet of a reopened stream of an unchanged batch.
        self._alive()
        event = self._parser.feed(line)
        if event is None:
            return []
        name, event_id, data = event
        if name == "batch":
            return self._version(data, event_id)
        if name == "end":
            return self._finish("end")
        if name == "deleted":
            return self._finish("deleted")
        return []

    def stream_ended(self) -> list[WatchEvent]:
        if self.done:
            return []
        raise Closed("the stream closed before the batch stopped")

    def failed(self, exc: BaseException) -> tuple[list[WatchEvent], float]:
        """The events for a failed round and how long to wait before the next; raises what
        ends the watch (an API refusal, the API never reached, the reconnect budget spent)."""
        # Only the API's own 404 (its JSON error, `not_found`) says the batch is gone; a
        # gateway's 404 page while the API behind it is redeployed is the link failing.
        gone = isinstance(exc, NotFound) and exc.code == API_NOT_FOUND
        if isinstance(exc, NotFound) and (gone or self.last is None):
            if self.last is None:
                raise exc
            return self._finish("deleted"), 0.0  # deleted while we were reconnecting
        if not isinstance(exc, RETRIED) or (isinstance(exc, ApiError) and not exc.retryable
                                            and not isinstance(exc, NotFound)):
            raise exc
        if self.last is None and not self._reached and isinstance(exc, httpx.ConnectError):
            # Never reached: a wrong URL or a stopped API, not a link that dropped.
            raise ConnectionFailed(f"cannot reach the API at {self._url}: {exc}") from exc
        now = time.monotonic()
        self._failing_since = now if self._failing_since is None else self._failing_since
        if now - self._failing_since > self._reconnect_for:
            raise ConnectionFailed(f"lost the API for over {self._reconnect_for:g} s: {exc}") from exc
        delay, self._delay = self._delay, min(self._delay * 2, RECONNECT_MAX_S)
        if isinstance(exc, ApiError) and exc.retry_after is not None:
            delay = max(delay, exc.retry_after)  # "retry later" (429, 503) says how much later
        # Never past the reconnect budget: a Retry-After of 60 s must not hold a watch given
        # 5 s for that long before it gives up.
        delay = min(delay, max(0.0, self._reconnect_for - (now - self._failing_since)) + 0.1)
        error = str(exc) or type(exc).__name__
        self._reconnecting = True
        return [WatchEvent("reconnecting", self.last, self.etag, error=error, via=self.mode)], delay


def follow(client: DhubClient, pipeline_id: str, batch_id: str, *, reconnect_for: float = 60.0,
           stream: bool = True) -> Iterator[WatchEvent]:
    """The batch's versions until it stops (`end`) or is deleted (`deleted`), blocking."""
    http = client.http
    watch = Follower(pipeline_id, batch_id, reconnect_for=reconnect_for, stream=stream,
                     url=client.url, reached=client.answered)
    while not watch.done:
        round_ = watch.next_round()
        try:
            if round_.stream:
                with http.stream("GET", watch.path, headers=round_.headers,
                                 timeout=round_.timeout) as response:
                    if not response.is_success or not is_stream(response):
                        response.read()
                        yield from watch.answered(response, round_)
                    else:
                        yield from watch.opened()
                        for line in response.iter_lines():
                            yield from watch.line(line)
                            if watch.done:
                                return
                        yield from watch.stream_ended()
            else:
                response = http.get(watch.path, headers=round_.headers, params=round_.params,
                                    timeout=round_.timeout)
                yield from watch.answered(response, round_)
            pause = watch.pause()
        except RETRIED as exc:
            events, pause = watch.failed(exc)
            yield from events
        if pause and not watch.done:
            time.sleep(pause)
