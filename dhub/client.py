"""`DhubClient`: the Batches API from Python, typed, for the `dhub` command and upstream services.

    from dhub import DhubClient
    with DhubClient() as api:                       # DHUB_URL / DHUB_TOKEN, else the local stack
        batch_id = api.run("pipeline-sales")
        for update in api.watch("pipeline-sales", batch_id):
            print(update.kind, update.batch and update.batch["state"]["state"])

Synchronous (httpx): the command line needs nothing else, and a service on asyncio can run it
in a thread. Every failure is a `dhub.errors.DhubError`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, Final, cast
from urllib.parse import quote

import httpx

from dhub import config
from dhub.errors import NOT_JSON, ApiError, AuthError, ConnectionFailed, DhubError, raise_for
from dhub.models import Batch, Page, Pipeline
from dhub.watch import WatchEvent, follow

TIMEOUT: Final = httpx.Timeout(10.0, connect=5.0)
# A POST is retried (same Idempotency-Key, so never two batches) on these many transport
# errors or 5xx or 429 answers, when no attempt may have reached the API.
RUN_RETRIES: Final = 2
RUN_PAUSE_S: Final = 0.5
RUN_PAUSE_MAX_S: Final = 5.0
# An attempt whose answer was lost (a read timeout, a cut connection, a gateway's 5xx, the
# API's 500) may have started the batch: only the API's answer to the same key tells, so the
# POST is asked again for this long, however many attempts that takes (an API restarting
# under a POST is down for seconds). The key is remembered for a day (DHUB_IDEMPOTENCY_TTL_S).
UNKNOWN_FOR_S: Final = 60.0
# A retry that finds its key's first attempt still under way in the API (409 `in_progress`,
# "retry later") waits for it, up to the API's pending-record lifetime: after that the key is
# free again and a retry is a fresh attempt. Such answers do not count against RUN_RETRIES.
IN_PROGRESS: Final = "in_progress"
IN_PROGRESS_FOR_S: Final = 60.0
IN_PROGRESS_PAUSE_S: Final = 0.5
USER_AGENT: Final = "dhub-cli/0.1"
# The API's own 503: a dependency was down and the attempt released its key, nothing started.
API_UNAVAILABLE: Final = "unavailable"
# Transport errors of a request that never reached the API (a proxy refusing the tunnel, a
# request httpx could not form, too).
NOT_SENT: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError,
                   httpx.UnsupportedProtocol, httpx.LocalProtocolError)


def run_again(pipeline_id: str, version: str | None, idempotency_key: str) -> str:
    """The `dhub run` that asks again for the same batch: the same key and the same version
    (the API answers a key's batch only to the request it was made for; without `--version`
    a retry of a lost attempt would start the latest version instead)."""
    asked = f" --version {version}" if version is not None else ""
    return f"dhub run {pipeline_id}{asked} --idempotency-key {idempotency_key}"


class RunUnsettled(DhubError):
    """`run` gave up after an attempt that may have started the batch: asking again with
    `idempotency_key` answers its id if it did (and starts it if it did not)."""

    def __init__(self, again: str, idempotency_key: str, cause: DhubError) -> None:
        super().__init__(f"an attempt's answer was lost, and it may have started a batch; the "
                         f"API has not said since ({cause}). Ask again with the same key, which "
                         f"never starts a second batch: {again}")
        self.idempotency_key = idempotency_key


def maybe_started(exc: ConnectionFailed | ApiError) -> bool:
    """Whether the attempt that failed so may have reached the API and started the batch."""
    if isinstance(exc, ApiError):
        return exc.status >= 500 and exc.code != API_UNAVAILABLE
    return not isinstance(exc.__cause__, NOT_SENT)


class RunAttempts:
    """The retry decisions of one `run` (both clients): after each failed attempt, `after`
    gives the pause before the next one or raises what ends the run."""

    def __init__(self, pipeline_id: str, key: str, version: str | None = None) -> None:
        self._again, self._key = run_again(pipeline_id, version, key), key
        self._started = time.monotonic()
        self._failures = 0
        self._unknown_since: float | None = None

    def after(self, exc: ConnectionFailed | ApiError) -> float:
        now = time.monotonic()
        if isinstance(exc, ApiError) and exc.code == IN_PROGRESS:
            # Its first attempt is still under way in the API: wait for its answer.
            self._unknown_since = self._unknown_since or now
            if now - self._started < IN_PROGRESS_FOR_S:
                return IN_PROGRESS_PAUSE_S
            raise RunUnsettled(self._again, self._key, exc) from exc
        if self._unknown_since is None and maybe_started(exc):
            self._unknown_since = now
        retry = isinstance(exc, ConnectionFailed) or exc.retryable
        self._failures += 1
        pause = min(RUN_PAUSE_S * self._failures, RUN_PAUSE_MAX_S)
        if isinstance(exc, ApiError) and exc.retry_after is not None:
            pause = max(pause, exc.retry_after)  # "retry later" (429, 503) says how much later
        if self._unknown_since is None:
            if retry and self._failures <= RUN_RETRIES:
                return pause
            raise exc
        # A replay answers the key's batch before the request's own checks: any other 4xx
        # of the API's says no attempt committed one, but for 401/403 (the token is checked
        # first). One from a gateway in front of it (its 404 page mid-redeploy) says nothing
        # of the batch: asked again, with the same key.
        answered = isinstance(exc, ApiError) and exc.from_api
        if answered and not retry and not isinstance(exc, AuthError):
            raise exc
        if (retry or not answered) and now - self._unknown_since < UNKNOWN_FOR_S:
            return pause
        raise RunUnsettled(self._again, self._key, exc) from exc


def answer_json(response: httpx.Response, url: str) -> Any:
    """A successful answer's JSON. One that is not JSON (a captive portal, a gateway's sign-in
    page, a --url that is not the API) is an `ApiError` of its status: it raised
    JSONDecodeError, which `dhub` printed as an internal error, a bug of its own."""
    try:
        return response.json()
    except (ValueError, UnicodeDecodeError):
        kind = response.headers.get("Content-Type") or "no Content-Type"
        raise ApiError(response.status_code, NOT_JSON, f"the answer is not JSON ({kind}): "
                       f"is {url} the Batches API?") from None


def seg(value: str) -> str:
    """One path segment: ids are [A-Za-z0-9._-], quoted anyway so a typo cannot change the route."""
    return quote(value, safe="")


class DhubClient:
    def __init__(self, url: str | None = None, token: str | None = None, *,
                 timeout: httpx.Timeout = TIMEOUT, transport: httpx.BaseTransport | None = None) -> None:
        """`url` and `token` default to `DHUB_URL` / `DHUB_TOKEN`, then the local stack's
        (`dhub.config`); raises `config.ConfigError` when no token is found."""
        if token is None:
            target = config.resolve(url)
            url, token = target.url, target.token
        else:
            config.check_token(token, "the token given")
            url = config.base_url(url, source="the URL given")
        self.url = url
        self.answered = False  # any answer from the API yet (`dhub.watch.Follower`)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport,
                                  headers={"Authorization": f"Bearer {token}",
                                           "User-Agent": USER_AGENT})

    def __enter__(self) -> DhubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @property
    def http(self) -> httpx.Client:
        """The underlying client (auth header and base URL set), for `dhub.watch`."""
        return self._http

    # -- one request ---------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.RequestError as exc:
            raise ConnectionFailed(f"cannot reach the API at {self.url}: {exc}") from exc
        self.answered = True
        raise_for(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return answer_json(self.request(method, path, **kwargs), self.url)

    # -- batches -------------------------------------------------------------------------
    def run(self, pipeline_id: str, version: str | None = None, *,
            idempotency_key: str | None = None) -> str:
        """Starts a batch; its id. Retried on transport errors and 5xx with one
        Idempotency-Key, so a retry never starts a second batch, and while the API says the
        key's first attempt is still in progress (`RunAttempts`); `RunUnsettled` when it
        gives up after an attempt that may have started the batch."""
        key = idempotency_key or uuid.uuid4().hex
        params = {"pipeline_version": version} if version is not None else None
        attempts = RunAttempts(pipeline_id, key, version)
        while True:
            try:
                body = self._json("POST", f"/api/v1/batches/{seg(pipeline_id)}", params=params,
                                  headers={"Idempotency-Key": key})
                return str(body["item"])
            except (ConnectionFailed, ApiError) as exc:
                time.sleep(attempts.after(exc))

    def get(self, pipeline_id: str, batch_id: str) -> Batch:
        return cast(Batch, self._json("GET", f"/api/v1/batches/{seg(pipeline_id)}/{seg(batch_id)}"))

    def latest(self, pipeline_id: str) -> Batch:
        """The pipeline's newest batch (404 when it has none)."""
        return cast(Batch, self._json("GET", f"/api/v1/batches/{seg(pipeline_id)}"))

    def page(self, pipeline_id: str, limit: int = 100, token: str | None = None) -> Page:
        params: dict[str, str | int] = {"limit": limit}
        if token is not None:
            params["token"] = token
        return cast(Page, self._json("GET", f"/api/v1/batches/{seg(pipeline_id)}/", params=params))

    def batches(self, pipeline_id: str, limit: int | None = None, page_size: int = 100) -> Iterator[Batch]:
        """The pipeline's batches, newest first, at most `limit`, a page at a time."""
        token: str | None = None
        left = limit
        while left is None or left > 0:
            size = page_size if left is None else min(page_size, left)
            page = self.page(pipeline_id, size, token)
            yield from page["items"].values()
            if left is not None:
                left -= len(page["items"])
            token = page["token"]
            # Only the token says the end: a page may come back empty with one (its batches
            # were deleted between the server's reads); tokens only go down, so this ends.
            if token is None:
                return

    def stop(self, pipeline_id: str, batch_id: str) -> str:
        """Accepted once the stop is queued; the batch reaches `stop` when the engine confirms."""
        body = self._json("PUT", f"/api/v1/batches/{seg(pipeline_id)}/{seg(batch_id)}/stop")
        return str(body["message"])

    def delete(self, pipeline_id: str, batch_id: str) -> str:
        body = self._json("DELETE", f"/api/v1/batches/{seg(pipeline_id)}/{seg(batch_id)}")
        return str(body["message"])

    def watch(self, pipeline_id: str, batch_id: str, *, reconnect_for: float = 60.0,
              stream: bool = True) -> Iterator[WatchEvent]:
        """Every version of the batch until it stops or is deleted (`dhub.watch.follow`)."""
        return follow(self, pipeline_id, batch_id, reconnect_for=reconnect_for, stream=stream)

    # -- pipelines -----------------------------------------------------------------------
    def pipelines(self) -> dict[str, Pipeline]:
        return cast(dict[str, Pipeline], self._json("GET", "/api/v1/pipelines/")["items"])

    def pipeline(self, pipeline_id: str) -> Pipeline:
        return cast(Pipeline, self._json("GET", f"/api/v1/pipelines/{seg(pipeline_id)}"))

    def register(self, pipeline_id: str, spec: Mapping[str, Any]) -> Pipeline:
        """Registers a version of the pipeline (`name`, `version`, `steps`); the same
        definition again is fine, another definition under an existing version is a 409."""
        body = json.dumps(dict(spec)).encode()
        return cast(Pipeline, self._json("PUT", f"/api/v1/pipelines/{seg(pipeline_id)}", content=body,
                                         headers={"Content-Type": "application/json"}))
