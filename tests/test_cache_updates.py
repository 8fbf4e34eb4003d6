"""A change message that carries the batch's new hash replaces the cached entry: a watched
batch keeps being served from the cache while events change it, and never a stale value."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import orjson
import pytest
from redis.asyncio import Redis

from core.codec import Event
from core.layout import published_fields, render
from core.settings import Settings
from service.cache import BatchCache, published_rev
from tests.cache_support import PIPELINE, cache_of, cached_api, direct_store, engines, get, new_batches
from tests.conftest import eventually


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis")


def _live_cache() -> BatchCache:
    cache = BatchCache()
    cache.reset(live=True)
    return cache


FIELDS = {"id": "b1", "name": "n", "deployment": "d", "state": "running", "pipeline_id": "p",
          "pipeline_version": "1", "created_at": "t0", "updated_at": "t1",
          "steps": '["extract"]', "step:extract": "running", "off:extract:0": "7", "rev": "3"}


def _published(fields: dict[str, str]) -> str:
    return orjson.dumps([x for pair in fields.items() for x in pair]).decode()


def test_an_update_replaces_a_held_entry_and_is_rendered_on_its_first_get() -> None:
    cache = _live_cache()
    cache.put("k", b"old", cache.generation)
    cache.update("k", _published(FIELDS))
    assert cache.get("k") == orjson.dumps(render(FIELDS))
    assert cache.get("k") == orjson.dumps(render(FIELDS))  # rendered once, kept


def _counted_renders(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import service.cache

    rendered: list[str] = []
    real = service.cache.published_body

    def counting(published: str) -> bytes | None:
        rendered.append(published)
        return real(published)

    monkeypatch.setattr(service.cache, "published_body", counting)
    return rendered


def test_an_entry_read_since_its_last_change_is_rendered_as_the_next_one_arrives(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rendered = _counted_renders(monkeypatch)
    cache = _live_cache()
    cache.put("k", b"old", cache.generation)  # a read filled it
    cache.update("k", _published(FIELDS))
    assert len(rendered) == 1  # before any GET
    assert cache.get("k") == orjson.dumps(render(FIELDS))
    assert len(rendered) == 1  # the GET found it rendered
    second = {**FIELDS, "off:extract:0": "8", "rev": "4"}
    cache.update("k", _published(second))  # read since: rendered at once again
    assert len(rendered) == 2 and cache.get("k") == orjson.dumps(render(second))


def test_an_entry_not_read_since_its_last_change_waits_for_its_get(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Changes of a batch nobody reads between them are not rendered one by one: no more
    renders than reads."""
    rendered = _counted_renders(monkeypatch)
    cache = _live_cache()
    cache.put("k", b"old", cache.generation)
    cache.update("k", _published(FIELDS))  # read (filled) since the last change: rendered
    for n in range(4, 9):  # nobody reads between these
        cache.update("k", _published({**FIELDS, "off:extract:0": str(n), "rev": str(n)}))
    assert len(rendered) == 1
    last = {**FIELDS, "off:extract:0": "8", "rev": "8"}
    assert cache.get("k") == orjson.dumps(render(last))
    assert len(rendered) == 2  # the GET rendered the latest, once
    assert cache.get("k") == orjson.dumps(render(last)) and len(rendered) == 2


def test_an_update_of_a_key_not_held_stores_nothing() -> None:
    cache = _live_cache()
    cache.update("k", _published(FIELDS))
    assert cache.get("k") is None and len(cache) == 0


def test_an_update_to_a_hidden_batch_serves_nothing() -> None:
    cache = _live_cache()
    cache.put("k", b"old", cache.generation)
    cache.update("k", _published({**FIELDS, "deleted": "1"}))
    assert cache.get("k") is None and len(cache) == 0


def test_a_fill_that_began_before_an_update_is_refused() -> None:
    cache = _live_cache()
    cache.put("k", b"old", cache.generation)
    generation = cache.generation
    cache.update("k", _published(FIELDS))
    cache.put("k", b"read before the change", generation)
    assert cache.get("k") == orjson.dumps(render(FIELDS))


def test_an_unreadable_update_is_a_miss_not_an_error() -> None:
    cache = _live_cache()
    cache.put("k", b"old", cache.generation)
    cache.update("k", "[\"id\"")
    assert cache.get("k") is None and len(cache) == 0


def test_a_late_message_of_a_rev_not_above_the_held_one_swaps_nothing_in() -> None:
    """The feed can deliver a change after a read that saw it or a newer one."""
    cache = _live_cache()
    cache.put("k", b"read at rev 5", cache.generation, rev=5)
    for rev in ("4", "5"):
        cache.update("k", _published({**FIELDS, "rev": rev}))
        assert cache.get("k") == b"read at rev 5"
    cache.update("k", _published({**FIELDS, "rev": "6"}))
    assert cache.get("k") == orjson.dumps(render(FIELDS))


def test_a_fill_never_replaces_an_unexpired_entry_of_a_higher_rev() -> None:
    cache = _live_cache()
    cache.put("k", b"rev 5", cache.generation, rev=5)
    cache.put("k", b"rev 4, its reply later", cache.generation, rev=4)
    assert cache.get("k") == b"rev 5"
    cache.now += cache.ttl_s + 1  # expired: the TTL backstop (a rebuild may lower the rev)
    cache.put("k", b"rev 4 after a rebuild", cache.generation, rev=4)
    assert cache.get("k") == b"rev 4 after a rebuild"


def test_a_fill_that_saw_the_change_a_message_brought_meanwhile_is_kept() -> None:
    cache = _live_cache()
    generation = cache.generation
    cache.update("k", _published({**FIELDS, "rev": "4"}))  # a late message of what it read
    cache.put("k", b"read at rev 4", generation, rev=4)
    assert cache.get("k") == b"read at rev 4"
    generation = cache.generation
    cache.update("k", _published({**FIELDS, "rev": "6"}))
    cache.put("k", b"read at rev 5", generation, rev=5)  # read before that change
    assert cache.get("k") == orjson.dumps(render(FIELDS))  # rev 6's
    cache.evict("k")  # a message without a rev (a hide): no fill from before it is kept
    cache.put("k", b"read at rev 6", generation, rev=6)
    assert cache.get("k") is None


def _published_object(fields: dict[str, str]) -> str:
    return orjson.dumps(fields).decode()


@pytest.mark.parametrize("form", [_published, _published_object], ids=["array", "object"])
def test_the_rev_of_a_published_hash_is_its_field_whatever_the_values_hold(
        form: Callable[[dict[str, str]], str]) -> None:
    tricky = {**FIELDS, "reason": 'rev","9"', "name": "rev", "rev": "12", "flow_run_id": "rev",
              "x": 'rev":"7', "y": '{"rev":"8"}'}
    assert published_rev(form(tricky)) == 12
    assert published_rev(form({k: v for k, v in FIELDS.items() if k != "rev"})) == 0
    # Both forms of the feed are read alike: a consumer publishing the older array form can
    # run beside an API reading the object form during a rolling upgrade.
    assert published_fields(form(tricky)) == tricky


async def test_a_watched_batch_stays_a_hit_while_events_change_it(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    async with cached_api(test_settings) as api:
        cache = cache_of(api)
        assert (await get(api, target))[0] == 200  # the first read fills the cache
        misses = cache.misses
        for offset in range(1, 21):
            await store.apply([Event("step.offsets", target, PIPELINE, step="extract",
                                     offsets={"0": offset})])

            async def shows(offset: int = offset) -> bool:
                _status, body = await get(api, target)
                return bool(body["state"]["steps"]["extract"]["offsets"] == {"0": offset})
            await eventually(shows, timeout=5, interval=0.005)
        # Every change arrived with its value: no GET had to read Redis.
        assert cache.misses == misses
