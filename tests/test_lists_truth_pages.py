"""A page's answer while batches it read leave before their hashes are read (hidden by a
DELETE, or out of the page's filter): the page reads on below them, so a page with a token
holds `limit` batches (one emptied by a racing DELETE was taken by `dhub ls` for the end of
the list, listing nothing though older batches were there throughout)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

from redis.asyncio import Redis

from core.codec import Event
from core.list_filter import ListFilter
from core.settings import Settings
from core.store import BatchStore
from dhub.aio import AsyncDhubClient
from service.appkeys import STORE
from tests.helpers import STATIC_TOKEN, api_client, api_settings
from tests.test_lists_truth import P, make


class _HideAfterIndexRead:
    """The pager's Redis, or its scripts, acting on the batches a chosen index read returned
    right after that read (as DELETEs or stops landing between a page's two round trips do)."""

    def __init__(self, inner: Any, act: Callable[[list[str]], Awaitable[None]]) -> None:
        self._inner, self._act, self._reads = inner, act, 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def _after(self, ids: list[str]) -> None:
        if self._reads > 0:
            self._reads -= 1
            await self._act(ids)

    async def zrevrangebyscore(self, *args: Any, **kwargs: Any) -> Any:
        rows = cast(list[tuple[str, float]], await self._inner.zrevrangebyscore(*args, **kwargs))
        await self._after([batch_id for batch_id, _ in rows])
        return rows

    async def page_range(self, *args: Any, **kwargs: Any) -> Any:
        flat = cast(list[str], await self._inner.page_range(*args, **kwargs))
        await self._after(flat[::2])
        return flat


def _race(store: BatchStore, act: Callable[[list[str]], Awaitable[None]]) -> None:
    """`act` runs once, after the next index read of the store's pages (either kind: the
    scripts' hook hands its read to the Redis hook, which acts on the first of all)."""
    pager = store._pager
    hook = _HideAfterIndexRead(pager._redis, act)
    pager._redis = hook  # type: ignore[assignment]
    pager._scripts = _HideAfterIndexRead(pager._scripts, hook._after)  # type: ignore[assignment]


async def test_dhub_ls_sees_the_older_batch_while_the_newest_is_deleted(
        topics: Settings, redis: Redis) -> None:
    """`dhub ls p --limit 1` while b002 is deleted mid-page: the page was empty with a token
    and the client took that for the end, listing nothing though b001 was there throughout."""
    store = BatchStore.from_settings(redis, topics)
    await make(store, 3)

    async def delete_newest(read: list[str]) -> None:
        await store.hide(P, read[0])

    async with api_client(api_settings(topics)) as api:
        _race(api.app[STORE], delete_newest)
        async with AsyncDhubClient(str(api.make_url("")), STATIC_TOKEN) as client:
            listed = [batch["id"] async for batch in client.batches(P, limit=1)]
    assert listed == ["b001"]


async def test_a_page_with_a_token_holds_limit_batches_though_some_left_meanwhile(
        redis: Redis, topics: Settings) -> None:
    """Batches hidden, or leaving the page's filter, between its index read and its hash
    read are passed over and the page read on below them: a page that has a token is full."""
    store = BatchStore.from_settings(redis, topics)

    async def leave(read: list[str]) -> None:
        # Every batch the read returned but its last: some hidden, the others stopped.
        for n, batch_id in enumerate(read[:-1]):
            if n % 2:
                await store.hide(P, batch_id)
            else:
                await store.apply([Event("batch.state", batch_id, P, state="stop",
                                         outcome="cancelled", ts=1.0)])

    # Read first: b011..b007 (4 and one more). b011 and b009 stop (still listed unfiltered),
    # b010 and b008 are hidden; b007 stays running.
    unfiltered = [["b011", "b009", "b007", "b006"], ["b005", "b004", "b003", "b002"],
                  ["b001", "b000"]]
    running = [["b007", "b006", "b005", "b004"], ["b003", "b002", "b001", "b000"]]
    since = "2000-01-01T00:00:00.000Z"  # a created bound: the pages' script, not a ZREVRANGE
    for where, want in ((ListFilter(), unfiltered), (ListFilter(state="running"), running),
                        (ListFilter(created_after=since), unfiltered),
                        (ListFilter(state="running", created_after=since), running)):
        await redis.flushdb()
        ids = await make(store, 12)
        await store.apply([Event("batch.state", b, P, state="running", ts=1.0) for b in ids])
        store = BatchStore.from_settings(redis, topics)  # a pager that knows no pipeline yet
        _race(store, leave)
        pages: list[list[str]] = []
        token: str | None = None
        while True:
            page = await store.page(P, 4, token, where)
            pages.append(list(page.items))
            token = page.token
            if token is None:
                break
            assert len(page.items) == 4, (where, pages)
        assert pages == want, where
