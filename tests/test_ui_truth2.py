"""What the web page shows against what the API says, second review: the list across a
reconnect of its stream and older than its first page, bars and percents of steps not done,
refusals (400, 403), times, large counts, long ids, a lost answer to Run batch.

Driven as tests/test_ui.py drives the page: headless Chromium on an API process of this tree.
Batches are written straight into the stack's Redis (as the API's create writes them, no run
started: nothing here loads the engine, save one 10-record batch that Run batch starts),
under pipeline ids of each test's own, and purged once the module is done. A few tests hook
the page's fetch to play a slow or broken network (the hooks say what they do).
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from core.connections import open_redis
from core.messages import Event
from core.settings import Settings
from core.store import BatchStore
from pipelines.sales import demo_spec
from tests.conftest import free_port
from tests.helpers import HS_SECRET, hs_token
from tests.test_ui import Api, api, base_url, browser, listed, register, token, until
from tests.test_ui_truth import signed_in as _signed_in

__all__ = ["api", "base_url", "browser", "token"]  # fixtures, re-used


# Every batch written here, purged from the stack's Redis once the module is done.
WRITTEN: list[tuple[str, str]] = []


@pytest.fixture(scope="module", autouse=True)
def purge_written(live: Settings) -> Iterator[None]:
    yield

    async def go() -> None:
        redis = await open_redis(live)
        try:
            store = BatchStore.from_settings(redis, live)
            for pipeline_id, batch_id in WRITTEN:
                await store.purge(pipeline_id, batch_id)
            # What purge leaves of a pipeline (its sequence, empty buckets): all ours.
            for pipeline_id in {p for p, _ in WRITTEN}:
                left = [k async for k in redis.scan_iter(match=f"dhub:{{{pipeline_id}}}:*")]
                if left:
                    await redis.delete(*left)
        finally:
            await redis.aclose()

    asyncio.run(go())
    WRITTEN.clear()


def write_batches(live: Settings, pipeline_id: str, count: int,
                  events: Iterable[Event] = (), ids: list[str] | None = None) -> list[str]:
    """`count` batches of `pipeline_id` (or those `ids`) created in Redis, oldest first, then
    `events` applied."""
    ids = ids or [f"batch-{n:03d}-{uuid.uuid4().hex[:6]}" for n in range(count)]

    async def go() -> None:
        redis = await open_redis(live)
        try:
            store = BatchStore.from_settings(redis, live)
            for batch_id in ids:
                WRITTEN.append((pipeline_id, batch_id))
                await store.create(pipeline_id, batch_id, demo_spec(name=pipeline_id))
            if events:
                await store.apply(list(events))
        finally:
            await redis.aclose()

    asyncio.run(go())
    return ids


def signed_in(driver: WebDriver, base_url: str, token: str, view: str) -> None:
    """As tests/test_ui_truth.py signs in, on a freshly loaded page: going to the same page
    with another fragment is not a load, and a previous test's fetch hooks would stay."""
    driver.get("about:blank")
    _signed_in(driver, base_url, token, view)


def api_ids(base_url: str, token: str, pipeline_id: str) -> list[str]:
    """Every batch id of the pipeline as the API lists them, newest first."""
    ids: list[str] = []
    page_token: str | None = None
    while True:
        params = {"limit": "1000", **({"token": page_token} if page_token else {})}
        answer = httpx.get(f"{base_url}/api/v1/batches/{pipeline_id}/", params=params,
                           headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        ids += list(body["items"])
        page_token = body["token"]
        if page_token is None:
            return ids


def test_a_failed_step_of_unknown_totals_is_not_drawn_as_a_full_bar(
        browser: WebDriver, base_url: str, token: str, live: Settings) -> None:
    """A full bar says the partition was done; a failed step without totals only says how
    many records it processed before failing."""
    pipeline_id = f"ui2-{uuid.uuid4().hex[:8]}"
    batch_id = f"batch-failed-{uuid.uuid4().hex[:8]}"

    async def go() -> None:
        redis = await open_redis(live)
        try:
            store = BatchStore.from_settings(redis, live)
            WRITTEN.append((pipeline_id, batch_id))
            await store.create(pipeline_id, batch_id, demo_spec(name=pipeline_id))
            await store.apply([
                Event("batch.state", batch_id, pipeline_id, state="running"),
                Event("step.state", batch_id, pipeline_id, step="extract", state="running"),
                Event("step.offsets", batch_id, pipeline_id, step="extract",
                      offsets={"partition_0": 500}),
                Event("step.state", batch_id, pipeline_id, step="extract", state="failed"),
                Event("batch.state", batch_id, pipeline_id, state="stop", outcome="failed"),
            ])
        finally:
            await redis.aclose()

    asyncio.run(go())
    got = httpx.get(f"{base_url}/api/v1/batches/{pipeline_id}/{batch_id}",
                    headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    extract = got["state"]["steps"]["extract"]
    assert extract["state"] == "failed" and extract["offsets"] == {"partition_0": 500}, got
    assert not extract.get("totals"), got  # how far 500 is of the partition: unknown

    signed_in(browser, base_url, token, f"#/p/{pipeline_id}/{batch_id}")
    bar = until(browser, lambda d: d.find_element(
        By.CSS_SELECTOR, "#steps .step[data-step='extract'][data-state='failed'] "
        ".partition[data-partition='partition_0'] .bar"), what="the failed step's bar")
    now = bar.get_attribute("aria-valuenow")
    width = browser.execute_script(
        "const bar = arguments[0]; return bar.firstChild.getBoundingClientRect().width"
        " / bar.getBoundingClientRect().width", bar)
    assert now != "100" and width < 0.99, f"drawn full (aria-valuenow {now}, width {width:.2f})"
    count = browser.find_element(By.CSS_SELECTOR, "#steps .step[data-step='extract'] .count")
    assert count.text == "500"


# In the page before it opens a view: every push stream's fetch goes through here, so the
# test can cut the open stream (`__drop()`), hold the next connection until it says so
# (`__release()`) and slow its body (each chunk a second late): a slow network's reconnect.
# A MutationObserver notes every time the list's table showed fewer batch rows than it
# showed before the drop.
SLOW_STREAMS = """
const realFetch = window.fetch.bind(window);
window.__streams = 0;
window.__shrunk = [];
let drop = null;
let released = null;
window.__release = () => released && released();
window.__drop = () => drop && drop();
window.fetch = async (url, init) => {
  const accept = (init && init.headers && init.headers.Accept) || '';
  if (!accept.includes('text/event-stream')) return realFetch(url, init);
  const n = ++window.__streams;
  if (n > 1) await new Promise((resolve) => { released = resolve; });
  const response = await realFetch(url, init);
  const reader = response.body.getReader();
  const body = new ReadableStream({
    start(controller) { drop = () => controller.error(new TypeError('dropped')); },
    async pull(controller) {
      if (n > 1) await new Promise((resolve) => setTimeout(resolve, 1000));
      const { value, done } = await reader.read();
      if (done) controller.close(); else controller.enqueue(value);
    },
    cancel() { reader.cancel(); },
  });
  return new Response(body, { status: response.status, headers: response.headers });
};
"""

WATCH_ROWS = """
window.__before = arguments[0];
new MutationObserver(() => {
  const rows = document.querySelectorAll('#batches tbody tr[data-batch-id]').length;
  if (rows < window.__before) window.__shrunk.push(
    rows + ': ' + document.querySelector('#batches tbody').innerText.slice(0, 80));
}).observe(document.getElementById('main'), { childList: true, subtree: true });
"""


def test_the_list_keeps_its_rows_through_a_reconnect_and_drops_one_deleted_meanwhile(
        browser: WebDriver, base_url: str, token: str, live: Settings) -> None:
    pipeline_id = f"ui2-{uuid.uuid4().hex[:8]}"
    ids = write_batches(live, pipeline_id, 3)
    signed_in(browser, base_url, token, "#/")
    browser.execute_script(SLOW_STREAMS)
    browser.execute_script("location.hash = arguments[0]", f"#/p/{pipeline_id}")
    until(browser, lambda d: len(listed(d)) == 3, what="the three batches")
    until(browser, lambda d: d.find_element(By.ID, "live").text == "live", what="stream open")
    browser.execute_script(WATCH_ROWS, 3)

    browser.execute_script("window.__drop()")
    until(browser, lambda d: d.execute_script("return window.__streams") == 2,
          what="the page reconnecting")
    gone = httpx.delete(f"{base_url}/api/v1/batches/{pipeline_id}/{ids[1]}",
                        headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert gone.status_code == 200, gone.text
    browser.execute_script("window.__release()")
    until(browser, lambda d: d.find_element(By.ID, "live").text == "live", what="reconnected")
    # The page's first events come a second late: the rows shown meanwhile are the ones the
    # list had (the badge said reconnecting), never an empty or partial list.
    until(browser, lambda d: sorted(listed(d)) == sorted([ids[0], ids[2]]), timeout=15,
          what="the batch deleted meanwhile gone from the list")
    assert api_ids(base_url, token, pipeline_id) == [ids[2], ids[0]]
    shrunk = [s for s in browser.execute_script("return window.__shrunk") if not s.startswith("2:")]
    assert not shrunk, f"the list showed fewer batches while reconnecting: {shrunk}"
    assert listed(browser) == [ids[2], ids[0]]  # newest first, as the API lists them


def test_batches_older_than_the_first_page_are_offered(
        browser: WebDriver, base_url: str, token: str, live: Settings) -> None:
    """The page lists the newest 50: the 51st and older were hidden with nothing saying so."""
    pipeline_id = f"ui2-{uuid.uuid4().hex[:8]}"
    write_batches(live, pipeline_id, 62)
    everything = api_ids(base_url, token, pipeline_id)
    assert len(everything) == 62
    signed_in(browser, base_url, token, f"#/p/{pipeline_id}")
    until(browser, lambda d: len(listed(d)) == 50, what="the first page")
    # The control exists from the start, hidden until the page knows of older batches (and
    # disabled during a read): awaited shown and enabled, not asserted at first sight.
    older = until(browser, lambda d: next(
        (b for b in d.find_elements(By.ID, "older") if b.is_displayed() and b.is_enabled()),
        None), what="an 'older' control, shown and enabled")
    older.click()
    until(browser, lambda d: len(listed(d)) == 62, what="the older batches")
    assert listed(browser) == everything
    until(browser, lambda d: not d.find_element(By.ID, "older").is_displayed(),
          what="no more 'older' once the last page is shown")


def test_a_view_left_does_not_mark_the_next_one_final(
        browser: WebDriver, base_url: str, token: str, live: Settings) -> None:
    """Leaving a view closes its stream; the close ended in the stream's 'final' status after
    the next view had set its own: the pipelines view (no stream) showed 'final'."""
    pipeline_id = f"ui2-{uuid.uuid4().hex[:8]}"
    [batch_id] = write_batches(live, pipeline_id, 1)
    signed_in(browser, base_url, token, f"#/p/{pipeline_id}/{batch_id}")
    until(browser, lambda d: d.find_element(By.ID, "live").text == "live", what="stream open")
    browser.find_element(By.CSS_SELECTOR, "#crumbs a[href='#/']").click()
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#pipelines tr"),
          what="the pipelines view")
    # The aborted stream's end comes a moment later: give it a few of the page's turns.
    browser.execute_async_script("setTimeout(arguments[0], 300)")
    live_badge = browser.find_element(By.ID, "live")
    assert not live_badge.is_displayed(), f"the pipelines view says {live_badge.text!r}"


def test_a_token_that_may_not_read_is_not_shown_loading_for_ever(
        browser: WebDriver, token: str, live: Settings) -> None:
    """A JWT with batches:write but not batches:read: the API answers 403 to every read. The
    list and the pipelines said "Loading…" (and the batch page nothing) once the 12 s flash
    was gone."""
    pipeline_id = f"ui2-{uuid.uuid4().hex[:8]}"
    [batch_id] = write_batches(live, pipeline_id, 1)
    server = Api(free_port())
    saved = {name: os.environ.get(name) for name in JWT_ENV}
    os.environ.update(JWT_ENV)
    try:
        server.start()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    try:
        writer = hs_token("batches:write", aud="ui2-aud", iss="ui2-iss")
        refused = httpx.get(f"{server.url}/api/v1/batches/{pipeline_id}/",
                            headers={"Authorization": f"Bearer {writer}"}, timeout=10)
        assert refused.status_code == 403, refused.text
        for view, what in ((f"#/p/{pipeline_id}", "the list"),
                           (f"#/p/{pipeline_id}/{batch_id}", "the batch"),
                           ("#/", "the pipelines")):
            signed_in(browser, server.url, writer, view)
            until(browser, lambda d: d.find_element(By.ID, "flash").text, what=f"{what} refused")
            # What stays once the flash is gone: the view itself must say it.
            browser.execute_script("document.getElementById('flash').hidden = true")
            text = browser.find_element(By.ID, "main").text
            assert "Loading" not in text, f"{what}: {text!r}"
            assert "batches:read" in text, f"{what} does not say why it is empty: {text!r}"
    finally:
        server.stop()


JWT_ENV = {"DHUB_JWT_HS256_SECRET": HS_SECRET, "DHUB_JWT_AUDIENCE": "ui2-aud",
           "DHUB_JWT_ISSUER": "ui2-iss"}


def test_a_step_not_done_is_never_shown_at_100_percent(
        browser: WebDriver, base_url: str, token: str, live: Settings) -> None:
    """The list rounded 99.5% to "(100%)"; the API's percent has one decimal, so 9,996 of
    10,000 records came as 100.0 and the batch page said "100.0%" with 4 records left. The
    API now rounds down as well (99.9); the page's own guard stays for any 100 short of done."""
    pipeline_id = f"ui2-{uuid.uuid4().hex[:8]}"
    ids = [f"batch-pct{n}-{uuid.uuid4().hex[:6]}" for n in range(2)]
    events = []
    for batch_id, done in zip(ids, (9_950, 9_996), strict=True):
        events += [
            Event("batch.state", batch_id, pipeline_id, state="running"),
            Event("step.state", batch_id, pipeline_id, step="extract", state="running"),
            Event("step.offsets", batch_id, pipeline_id, step="extract",
                  offsets={"partition_0": done}, totals={"partition_0": 10_000}),
        ]
    write_batches(live, pipeline_id, 0, events, ids=ids)
    auth = {"Authorization": f"Bearer {token}"}
    percents = [httpx.get(f"{base_url}/api/v1/batches/{pipeline_id}/{b}", headers=auth,
                          timeout=10).json()["state"]["steps"]["extract"]["progress"]["percent"]
                for b in ids]
    assert percents == [99.5, 99.9], percents  # the API's, rounded down

    signed_in(browser, base_url, token, f"#/p/{pipeline_id}")
    cells = until(browser, lambda d: [d.find_element(
        By.CSS_SELECTOR, f"#batches tr[data-batch-id='{b}'] td.num").text for b in ids]
        if all("records" in c.text for c in d.find_elements(By.CSS_SELECTOR, "#batches td.num"))
        and len(listed(d)) == 2 else None, what="both batches' progress")
    assert not [c for c in cells if "100%" in c], cells
    browser.execute_script("location.hash = arguments[0]", f"#/p/{pipeline_id}/{ids[1]}")
    summary = until(browser, lambda d: d.find_element(
        By.CSS_SELECTOR, "#steps .step[data-step='extract'] .summary").text, what="the summary")
    assert "9,996 records" in summary and "100.0%" not in summary, summary


def test_times_say_their_zone(
        browser: WebDriver, base_url: str, token: str, live: Settings) -> None:
    """The page showed the API's UTC times in the browser's zone with no zone named: in
    Seoul, a batch created at 14:21 UTC read "11:21:49 PM", which no reader could tell from
    11:21 PM UTC (or a colleague's screenshot from their own zone)."""
    pipeline_id = f"ui2-{uuid.uuid4().hex[:8]}"
    [batch_id] = write_batches(live, pipeline_id, 1)
    created = httpx.get(f"{base_url}/api/v1/batches/{pipeline_id}/{batch_id}",
                        headers={"Authorization": f"Bearer {token}"}, timeout=10
                        ).json()["created_at"]
    browser.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": "Asia/Seoul"})
    try:
        signed_in(browser, base_url, token, f"#/p/{pipeline_id}")
        cell = until(browser, lambda d: d.find_element(
            By.CSS_SELECTOR, f"#batches tr[data-batch-id='{batch_id}'] td:last-child").text,
            what="the created time")
        seoul = datetime.fromisoformat(created.replace("Z", "+00:00")).astimezone(
            timezone(timedelta(hours=9)))
        assert f"{seoul:%-I:%M:%S}" in cell, (cell, created)
        assert "GMT+9" in cell, f"no zone named: {cell!r} (the API says {created})"
    finally:
        browser.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": ""})


def test_records_past_2_to_the_53_are_counted_exactly(
        browser: WebDriver, base_url: str, token: str, live: Settings) -> None:
    """Each offset is at most 2**53 - 1 (the codec's bound), but the page's sum of a step's
    partitions was a JavaScript number: 2**53 - 1 and 2 records read 9,007,199,254,740,992."""
    pipeline_id = f"ui2-{uuid.uuid4().hex[:8]}"
    batch_id = f"batch-big-{uuid.uuid4().hex[:6]}"
    write_batches(live, pipeline_id, 0, [
        Event("batch.state", batch_id, pipeline_id, state="running"),
        Event("step.state", batch_id, pipeline_id, step="extract", state="running"),
        Event("step.offsets", batch_id, pipeline_id, step="extract",
              offsets={"partition_0": 2**53 - 1, "partition_1": 2}),
    ], ids=[batch_id])
    got = httpx.get(f"{base_url}/api/v1/batches/{pipeline_id}/{batch_id}",
                    headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    offsets = got["state"]["steps"]["extract"]["offsets"]
    assert offsets == {"partition_0": 2**53 - 1, "partition_1": 2}, offsets
    exact = f"{sum(offsets.values()):,} records"
    signed_in(browser, base_url, token, f"#/p/{pipeline_id}")
    listed_text = until(browser, lambda d: d.find_element(
        By.CSS_SELECTOR, f"#batches tr[data-batch-id='{batch_id}'] td.num").text,
        what="the list's progress")
    assert exact in listed_text, (listed_text, exact)
    browser.execute_script("location.hash = arguments[0]", f"#/p/{pipeline_id}/{batch_id}")
    summary = until(browser, lambda d: d.find_element(
        By.CSS_SELECTOR, "#steps .step[data-step='extract'] .summary").text, what="the summary")
    assert exact in summary, (summary, exact)


def test_a_long_batch_id_does_not_push_its_state_out_of_sight(
        browser: WebDriver, base_url: str, token: str, live: Settings) -> None:
    """Ids may be 128 characters (published batches name their own): one unbroken id made
    the list's table wider than the page, and the table's clipping hid its other columns; a
    long pipeline id pushed Run batch off the page."""
    pipeline_id = ("ui2-" + uuid.uuid4().hex * 4)[:128]
    batch_id = ("batch-" + uuid.uuid4().hex * 4)[:128]
    write_batches(live, pipeline_id, 0, [
        Event("batch.state", batch_id, pipeline_id, state="running"),
    ], ids=[batch_id])
    signed_in(browser, base_url, token, f"#/p/{pipeline_id}")
    until(browser, lambda d: d.find_element(
        By.CSS_SELECTOR, f"#batches tr[data-batch-id='{batch_id}']"), what="the row")
    hidden = browser.execute_script("""
        const row = document.querySelector('#batches tbody tr');
        const table = document.getElementById('batches').getBoundingClientRect();
        const view = document.documentElement.clientWidth;
        return [...row.children].map((cell, n) => [n, cell.getBoundingClientRect()])
          .filter(([, r]) => r.right > Math.min(table.right, view) + 1 || r.width < 1)
          .map(([n, r]) => `column ${n}: ${Math.round(r.left)}-${Math.round(r.right)}`
                           + ` of ${Math.round(Math.min(table.right, view))}`);""")
    assert not hidden, hidden
    run = browser.execute_script("return [document.getElementById('run').getBoundingClientRect()"
                                 ".right, document.documentElement.clientWidth]")
    assert run[0] <= run[1], f"Run batch off the page: {run}"
    badge = browser.find_element(By.CSS_SELECTOR, f"#batches tr[data-batch-id='{batch_id}'] .badge")
    assert badge.is_displayed() and badge.text == "running"
    browser.execute_script("location.hash = arguments[0]", f"#/p/{pipeline_id}/{batch_id}")
    state = until(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#batch .toolbar .badge"),
                  what="the batch's state")
    right = browser.execute_script(
        "return [arguments[0].getBoundingClientRect().right,"
        " document.getElementById('delete').getBoundingClientRect().right,"
        " document.getElementById('logout').getBoundingClientRect().right,"
        " document.documentElement.clientWidth]", state)
    # (The state badge, the Delete button and the header's Log out, then the page's width.)
    assert max(right[:3]) <= right[3], f"off the page: {right}"


def test_a_malformed_view_link_does_not_leave_the_last_view_showing_live(
        browser: WebDriver, base_url: str, token: str, live: Settings) -> None:
    """`#/p/%E0%A4%A` (a link cut short) threw in the router after the last view's stream
    was closed: that view stayed on screen, its header saying "live", updated no more."""
    pipeline_id = f"ui2-{uuid.uuid4().hex[:8]}"
    write_batches(live, pipeline_id, 1)
    signed_in(browser, base_url, token, f"#/p/{pipeline_id}")
    until(browser, lambda d: len(listed(d)) == 1, what="the list")
    until(browser, lambda d: d.find_element(By.ID, "live").text == "live", what="stream open")
    browser.execute_script("location.hash = '#/p/%E0%A4%A'")
    until(browser, lambda d: not d.find_elements(By.ID, "batches") or not d.find_element(
        By.ID, "live").is_displayed() or d.find_element(By.ID, "live").text != "live",
        timeout=5, what="the list left, or no longer said live")
    assert not browser.find_elements(By.ID, "batches"), "the closed list is still shown"


def test_an_id_the_api_refuses_is_not_shown_as_reconnecting(
        browser: WebDriver, base_url: str, token: str) -> None:
    """`#/p/sales pipeline` (a space): the API answers 400, which no retry changes; the page
    said "reconnecting…" and "Loading…" for ever, as if the API were away."""
    for view, what in (("#/p/sales%20pipeline", "the list"), ("#/p/sales/batch%201", "the batch")):
        signed_in(browser, base_url, token, view)
        until(browser, lambda d: d.find_element(By.ID, "live").text in ("offline", ""),
              timeout=5, what=f"{what}: the refusal taken as final, not retried")
        text = browser.find_element(By.ID, "main").text
        assert "must match" in text, f"{what} does not say the API refused the id: {text!r}"
        assert "Loading" not in text, f"{what}: {text!r}"


def test_a_click_on_a_busy_row_opens_the_batch(
        browser: WebDriver, base_url: str, token: str, live: Settings) -> None:
    """The list rebuilt every row on each change (every offset report, several a second):
    a press on a running batch's row and its release fell on different nodes, so the click
    was lost and the batch never opened."""
    pipeline_id = f"ui2-{uuid.uuid4().hex[:8]}"
    batch_id = f"batch-busy-{uuid.uuid4().hex[:6]}"
    write_batches(live, pipeline_id, 0, [
        Event("batch.state", batch_id, pipeline_id, state="running"),
        Event("step.state", batch_id, pipeline_id, step="extract", state="running"),
    ], ids=[batch_id])
    signed_in(browser, base_url, token, f"#/p/{pipeline_id}")
    until(browser, lambda d: d.find_element(
        By.CSS_SELECTOR, f"#batches tr[data-batch-id='{batch_id}'][data-state='running']"),
        what="the running batch")
    stop = threading.Event()

    def report() -> None:  # offsets every 20 ms, as a busy step reports them
        async def go() -> None:
            redis = await open_redis(live)
            try:
                store = BatchStore.from_settings(redis, live)
                done = 0
                while not stop.is_set():
                    done += 10
                    await store.apply([Event("step.offsets", batch_id, pipeline_id,
                                             step="extract", offsets={"partition_0": done})])
                    await asyncio.sleep(0.02)
            finally:
                await redis.aclose()
        asyncio.run(go())

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        until(browser, lambda d: "records" in d.find_element(
            By.CSS_SELECTOR, f"#batches tr[data-batch-id='{batch_id}'] td.num").text,
            what="the offsets moving")
        cell = browser.find_element(By.CSS_SELECTOR, f"#batches tr[data-batch-id='{batch_id}'] td.num")
        # A person's click: press, a fraction of a second, release (the row changes meanwhile).
        ActionChains(browser).move_to_element(cell).click_and_hold().pause(0.4).release().perform()
        until(browser, lambda d: d.execute_script("return location.hash")
              == f"#/p/{pipeline_id}/{batch_id}", timeout=5, what="the batch opened by the click")
    finally:
        stop.set()
        reporter.join(10)


# The batch's stream answered by the page itself: the versions given, then held open.
FAKE_BATCH_STREAM = """
const versions = arguments[0];
const realFetch = window.fetch.bind(window);
window.fetch = async (url, init) => {
  const accept = (init && init.headers && init.headers.Accept) || '';
  if (!accept.includes('text/event-stream')) return realFetch(url, init);
  const text = versions.map((v, n) =>
    `event: batch\\nid: "v${n}"\\ndata: ${JSON.stringify(v)}\\n\\n`).join('');
  const body = new ReadableStream({ start(c) { c.enqueue(new TextEncoder().encode(text)); } });
  return new Response(body, { status: 200, headers: { 'Content-Type': 'text/event-stream' } });
};
"""


def test_a_batch_restored_to_an_earlier_version_is_shown_as_the_api_now_says(
        browser: WebDriver, base_url: str, token: str) -> None:
    """A stream may send a lower version (service.streams: a rebuild restores one; Redis is
    the truth). The page only ever added partitions and steps: one the restored version does
    not have stayed on screen with its old records."""
    def batch(offsets: dict[str, int], percent: float | None) -> dict[str, object]:
        step: dict[str, object] = {"state": "running", "offsets": offsets}
        if percent is not None:
            step["totals"] = {"partition_0": 1000, "partition_1": 1000}
            step["progress"] = {"percent": percent, "records_per_s": 10.0, "eta_s": 1.0}
        return {"id": "batch-r", "name": "p", "deployment": "run-pipeline/p",
                "state": {"state": "running", "steps": {"extract": step}}}

    newer = batch({"partition_0": 900, "partition_1": 700}, 80.0)
    restored = batch({"partition_0": 300}, None)
    signed_in(browser, base_url, token, "#/")
    browser.execute_script(FAKE_BATCH_STREAM, [newer, restored])
    browser.execute_script("location.hash = '#/p/p/batch-r'")
    until(browser, lambda d: d.find_element(
        By.CSS_SELECTOR, ".partition[data-partition='partition_0']").get_attribute(
        "data-offset") == "300", what="the restored version shown")
    rows = [r.get_attribute("data-partition") for r in browser.find_elements(
        By.CSS_SELECTOR, "#steps .partition")]
    assert rows == ["partition_0"], f"partitions the API no longer says: {rows}"
    assert not browser.find_element(By.CSS_SELECTOR, ".step-bar").is_displayed(), \
        "the step's 80% bar stayed though the API no longer gives a percent"


def test_a_resumed_batch_says_which_batch_it_goes_on_from(
        browser: WebDriver, base_url: str, token: str, live: Settings) -> None:
    """The API's body names `resumed_from`; the page left it out, so steps done by the
    earlier batch read as this one's own work."""
    pipeline_id = f"ui2-{uuid.uuid4().hex[:8]}"
    old_id, new_id = (f"batch-{kind}-{uuid.uuid4().hex[:6]}" for kind in ("old", "new"))

    async def go() -> None:
        redis = await open_redis(live)
        try:
            store = BatchStore.from_settings(redis, live)
            WRITTEN.extend([(pipeline_id, old_id), (pipeline_id, new_id)])
            await store.create(pipeline_id, old_id, demo_spec(name=pipeline_id))
            await store.create(pipeline_id, new_id, demo_spec(name=pipeline_id),
                               extra={"resumed_from": old_id})
        finally:
            await redis.aclose()

    asyncio.run(go())
    got = httpx.get(f"{base_url}/api/v1/batches/{pipeline_id}/{new_id}",
                    headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    assert got["resumed_from"] == old_id, got
    signed_in(browser, base_url, token, f"#/p/{pipeline_id}/{new_id}")
    until(browser, lambda d: d.find_element(By.ID, "batch").get_attribute("data-state"),
          what="the batch shown")
    link = until(browser, lambda d: d.find_element(By.CSS_SELECTOR, "dl.meta a[data-resumed-from]"),
                 what="the batch it goes on from")
    assert link.text == old_id
    link.click()
    until(browser, lambda d: d.execute_script("return location.hash")
          == f"#/p/{pipeline_id}/{old_id}", what="the earlier batch opened")


# A page's fetch hook starts with this: `droppable(response)` is a push stream's answer that
# `__drop()` cuts (the API process going away).
DROPPABLE_STREAMS = """
const realFetch = window.fetch.bind(window);
let drop = null;
window.__drop = () => drop && drop();
const droppable = (response) => {
  const reader = response.body.getReader();
  const body = new ReadableStream({
    start(controller) { drop = () => controller.error(new TypeError('dropped')); },
    async pull(controller) {
      const { value, done } = await reader.read();
      if (done) controller.close(); else controller.enqueue(value);
    },
    cancel() { reader.cancel(); },
  });
  return new Response(body, { status: response.status, headers: response.headers });
};
"""

# Push streams can be cut (`__drop()`); the list's JSON reads are answered by the API at once
# but handed to the page only on `__answer()`: what the stream says meanwhile is newer.
HELD_READS = DROPPABLE_STREAMS + """
window.__held = 0;
const waiting = [];
window.__answer = () => { while (waiting.length) waiting.shift()(); };
window.fetch = async (url, init) => {
  const accept = (init && init.headers && init.headers.Accept) || '';
  const response = await realFetch(url, init);
  if (accept.includes('text/event-stream')) return droppable(response);
  if (String(url).includes('?limit=')) {
    window.__held += 1;
    await new Promise((resolve) => waiting.push(resolve));
  }
  return response;
};
"""


def test_what_the_stream_says_during_a_reread_of_the_list_wins_over_it(
        browser: WebDriver, base_url: str, token: str, live: Settings) -> None:
    """After a reconnect the list is read again; a batch created while that read was on its
    way must stay, and one deleted meanwhile must not come back from the older read."""
    pipeline_id = f"ui2-{uuid.uuid4().hex[:8]}"
    first, second = write_batches(live, pipeline_id, 2)
    signed_in(browser, base_url, token, "#/")
    browser.execute_script(HELD_READS)
    browser.execute_script("location.hash = arguments[0]", f"#/p/{pipeline_id}")
    until(browser, lambda d: d.execute_script("return window.__held") == 1, what="first read")
    browser.execute_script("window.__answer()")
    until(browser, lambda d: sorted(listed(d)) == sorted([first, second]), what="both batches")
    until(browser, lambda d: d.find_element(By.ID, "live").text == "live", what="stream open")

    browser.execute_script("window.__drop()")
    until(browser, lambda d: d.execute_script("return window.__held") == 2,
          timeout=15, what="the reconnect's read answered (held in the page)")
    [third] = write_batches(live, pipeline_id, 1)
    gone = httpx.delete(f"{base_url}/api/v1/batches/{pipeline_id}/{second}",
                        headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert gone.status_code == 200, gone.text
    until(browser, lambda d: sorted(listed(d)) == sorted([first, third]),
          what="the stream's create and delete shown")
    browser.execute_script("window.__answer()")
    until(browser, lambda d: d.find_element(By.ID, "older").get_attribute("hidden") is not None
          and not d.execute_script("return document.getElementById('older').disabled"),
          what="the read applied")
    assert sorted(listed(browser)) == sorted([first, third]), listed(browser)
    assert sorted(api_ids(base_url, token, pipeline_id)) == sorted([first, third])


# The first POST that runs a batch reaches the API, whose answer is then lost on the way
# back (the connection dropped): the batch was accepted, the page is told nothing.
LOST_ANSWER = """
const realFetch = window.fetch.bind(window);
window.__posts = [];
window.fetch = async (url, init) => {
  if (init && init.method === 'POST') {
    window.__posts.push((init.headers && init.headers['Idempotency-Key']) || null);
    const response = await realFetch(url, init);
    if (window.__posts.length === 1) throw new TypeError('Failed to fetch');
    return response;
  }
  return realFetch(url, init);
};
"""


def test_run_whose_answer_is_lost_reports_the_batch_it_started(
        browser: WebDriver, base_url: str, token: str) -> None:
    """Run batch's POST carried no Idempotency-Key: an answer lost on the way back showed an
    error though the batch had started (and the obvious second click started another)."""
    pipeline_id = register(base_url, token, rows=10, partitions=1)
    signed_in(browser, base_url, token, "#/")
    browser.execute_script(LOST_ANSWER)
    browser.execute_script("location.hash = arguments[0]", f"#/p/{pipeline_id}")
    until(browser, lambda d: d.find_element(By.ID, "live").text == "live", what="stream open")
    browser.find_element(By.ID, "run").click()
    until(browser, lambda d: d.execute_script("return window.__posts.length") >= 1,
          what="the POST sent")
    started = until(browser, lambda d: d.find_element(By.ID, "flash").text, timeout=30,
                    what="the run's outcome said")
    ids = api_ids(base_url, token, pipeline_id)
    assert len(ids) == 1, ids
    assert started == f"Started {ids[0]}.", f"the page said {started!r}; the API ran {ids}"
    keys = browser.execute_script("return window.__posts")
    assert len(keys) >= 2 and keys[0] and len(set(keys)) == 1, keys  # retried, same key


def test_a_step_ended_without_records_does_not_say_they_are_still_to_come(
        browser: WebDriver, base_url: str, token: str, live: Settings) -> None:
    """A step that succeeded (or failed) having reported no offsets read "no records yet",
    as if it were still running."""
    pipeline_id = f"ui2-{uuid.uuid4().hex[:8]}"
    batch_id = f"batch-empty-{uuid.uuid4().hex[:6]}"
    write_batches(live, pipeline_id, 0, [
        Event("batch.state", batch_id, pipeline_id, state="running"),
        Event("step.state", batch_id, pipeline_id, step="extract", state="running"),
        Event("step.state", batch_id, pipeline_id, step="extract", state="success"),
        Event("step.state", batch_id, pipeline_id, step="transform", state="running"),
        Event("step.state", batch_id, pipeline_id, step="transform", state="failed"),
        Event("batch.state", batch_id, pipeline_id, state="stop", outcome="failed"),
    ], ids=[batch_id])
    signed_in(browser, base_url, token, f"#/p/{pipeline_id}/{batch_id}")
    for step in ("extract", "transform"):
        def note(d: WebDriver, step: str = step) -> str:
            return str(d.find_element(By.CSS_SELECTOR, f"#steps .step[data-step='{step}'] p.muted").text)

        text = until(browser, note, what=f"{step}'s note")
        assert "yet" not in text, f"{step} ({text!r}) reads as still to come"
