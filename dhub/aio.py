"""`AsyncDhubClient`: the same client for services on asyncio (httpx.AsyncClient).

    async with AsyncDhubClient() as api:
        batch_id = await api.run("pipeline-sales")
        async for update in api.watch("pipeline-sales", batch_id):
            ...

The same methods, answers and errors as `dhub.DhubClient`; `watch` shares its decisions
(`dhub.watch.Follower`) and only does the I/O with asyncio.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import httpx

from dhub import config
from dhub.client import TIMEOUT, USER_AGENT, RunAttempts, answer_json, seg
from dhub.errors import ApiError, ConnectionFailed, raise_for
from dhub.models import Batch, Page, Pipeline
from dhub.watch import RETRIED, Follower, WatchEvent, is_stream


class AsyncDhubClient:
    def __init__(self, url: str | None = None, token: str | None = None, *,
                 timeout: httpx.Timeout = TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if token is None:
            target = config.resolve(url)
            url, token = target.url, target.token
        else:
            config.check_token(token, "the token given")
            url = config.base_url(url, source="the URL given")
        self.url = url
        self.answered = False  # any answer from the API yet (`dhub.watch.Follower`)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, transport=transport,
                                       headers={"Authorization": f"Bearer {token}",
                                                "User-Agent": USER_AGENT})

    async def __aenter__(self) -> AsyncDhubClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.RequestError as exc:
            raise ConnectionFailed(f"cannot reach the API at {self.url}: {exc}") from exc
        self.answered = True
        raise_for(response)
        return response

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return answer_json(await self.request(method, path, **kwargs), self.url)

    async def run(self, pipeline_id: str, version: str | None = None, *,
                  idempotency_key: str | None = None) -> str:
        """Starts a batch; its id (retried like `DhubClient.run`, with one Idempotency-Key)."""
        key = idempotency_key or uuid.uuid4().hex
        params = {"pipeline_version": version} if version is not None else None
        attempts = RunAttempts(pipeline_id, key, version)
        while True:
            try:
                body = await self._json("POST", f"/api/v1/batches/{seg(pipeline_id)}", params=params,
                                        headers={"Idempotency-Key": key})
                return str(body["item"])
            except (ConnectionFailed, ApiError) as exc:
                await asyncio.sleep(attempts.after(exc))

    async def get(self, pipeline_id: str, batch_id: str) -> Batch:
        return cast(Batch, await self._json("GET", f"/api/v1/batches/{seg(pipeline_id)}/{seg(batch_id)}"))

    async def latest(self, pipeline_id: str) -> Batch:
        return cast(Batch, await self._json("GET", f"/api/v1/batches/{seg(pipeline_id)}"))

    async def page(self, pipeline_id: str, limit: int = 100, token: str | None = None) -> Page:
        params: dict[str, str | int] = {"limit": limit}
        if token is not None:
            params["token"] = token
        return cast(Page, await self._json("GET", f"/api/v1/batches/{seg(pipeline_id)}/", params=params))

    async def batches(self, pipeline_id: str, limit: int | None = None,
                      page_size: int = 100) -> AsyncIterator[Batch]:
        """The pipeline's batches, newest first, at most `limit`, a page at a time."""
        token: str | None = None
        left = limit
        while left is None or left > 0:
            page = await self.page(pipeline_id, page_size if left is None else min(page_size, left), token)
            for batch in page["items"].values():
                yield batch
            if left is not None:
                left -= len(page["items"])
            token = page["token"]
            # Only the token says the end: a page may come back empty with one (its batches
            # were deleted between the server's reads); tokens only go down, so this ends.
            if token is None:
                return

    async def stop(self, pipeline_id: str, batch_id: str) -> str:
        body = await self._json("PUT", f"/api/v1/batches/{seg(pipeline_id)}/{seg(batch_id)}/stop")
        return str(body["message"])

    async def delete(self, pipeline_id: str, batch_id: str) -> str:
        body = await self._json("DELETE", f"/api/v1/batches/{seg(pipeline_id)}/{seg(batch_id)}")
        return str(body["message"])

    async def pipelines(self) -> dict[str, Pipeline]:
        return cast(dict[str, Pipeline], (await self._json("GET", "/api/v1/pipelines/"))["items"])

    async def pipeline(self, pipeline_id: str) -> Pipeline:
        return cast(Pipeline, await self._json("GET", f"/api/v1/pipelines/{seg(pipeline_id)}"))

    async def register(self, pipeline_id: str, spec: Mapping[str, Any]) -> Pipeline:
        body = json.dumps(dict(spec)).encode()
        return cast(Pipeline, await self._json("PUT", f"/api/v1/pipelines/{seg(pipeline_id)}",
                                               content=body,
                                               headers={"Content-Type": "application/json"}))

    async def watch(self, pipeline_id: str, batch_id: str, *, reconnect_for: float = 60.0,
                    stream: bool = True) -> AsyncIterator[WatchEvent]:
        """Every version of the batch until it stops (`end`) or is deleted (`deleted`)."""
        watch = Follower(pipeline_id, batch_id, reconnect_for=reconnect_for, stream=stream,
                         url=self.url, reached=self.answered)
        while not watch.done:
            round_ = watch.next_round()
            try:
                if round_.stream:
                    async with self._http.stream("GET", watch.path, headers=round_.headers,
                                                 timeout=round_.timeout) as response:
                        if not response.is_success or not is_stream(response):
                            await response.aread()
                            for event in watch.answered(response, round_):
                                yield event
                        else:
                            for event in watch.opened():
                                yield event
                            async for line in response.aiter_lines():
                                for event in watch.line(line):
                                    yield event
                                if watch.done:
                                    return
                            for event in watch.stream_ended():
                                yield event
                else:
                    response = await self._http.get(watch.path, headers=round_.headers,
                                                    params=round_.params, timeout=round_.timeout)
                    for event in watch.answered(response, round_):
                        yield event
                pause = watch.pause()
            except RETRIED as exc:
                events, pause = watch.failed(exc)
                for event in events:
                    yield event
            if pause and not watch.done:
                await asyncio.sleep(pause)
