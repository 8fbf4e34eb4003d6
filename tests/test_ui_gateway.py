"""The web page open on a running batch (or a pipeline's list) whose stream is cut while the
API is redeployed, and whose reconnect a gateway answers with its own 404 page: the page
said "No such batch (deleted, or never existed)" (or "Unknown pipeline") and stopped
reconnecting, while GET answered the batch running. `dhub watch` had been taught that only
the API's own 404 (its JSON error) means deleted; the page now is too, and retries any other
4xx as a link failure."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from core.connections import open_redis
from core.messages import Event
from core.settings import Settings
from core.store import BatchStore
from pipelines.sales import demo_spec
from tests.test_ui import api, base_url, browser, register, token, until
from tests.test_ui_truth2 import DROPPABLE_STREAMS, signed_in

__all__ = ["api", "base_url", "browser", "token"]  # fixtures, re-used

# Every push stream's fetch goes through here: `__drop()` cuts the open one (the API process
# going away), and while `__gateway` is set a stream request gets the gateway's own 404 page.
GATEWAY = DROPPABLE_STREAMS + """
window.__gateway = false;
window.__gatewayHits = 0;
window.fetch = async (url, init) => {
  const accept = (init && init.headers && init.headers.Accept) || '';
  if (!accept.includes('text/event-stream')) return realFetch(url, init);
  if (window.__gateway) {
    window.__gatewayHits++;
    return new Response('<html><body><h1>404 Not Found</h1><hr>nginx</body></html>',
                        { status: 404, headers: { 'Content-Type': 'text/html' } });
  }
  return droppable(await realFetch(url, init));
};
"""


def running_batch(live: Settings) -> tuple[str, str]:
    pipeline_id = f"uigw-{uuid.uuid4().hex[:8]}"
    batch_id = f"batch-{uuid.uuid4().hex[:8]}"

    async def go() -> None:
        redis = await open_redis(live)
        try:
            store = BatchStore.from_settings(redis, live)
            await store.create(pipeline_id, batch_id, demo_spec(name=pipeline_id))
            await store.apply([Event("batch.state", batch_id, pipeline_id, state="running")])
        finally:
            await redis.aclose()

    asyncio.run(go())
    return pipeline_id, batch_id


def purge(live: Settings, pipeline_id: str, batch_id: str) -> None:
    async def go() -> None:
        redis = await open_redis(live)
        try:
            await BatchStore.from_settings(redis, live).purge(pipeline_id, batch_id)
            left = [k async for k in redis.scan_iter(match=f"dhub:{{{pipeline_id}}}:*")]
            if left:
                await redis.delete(*left)
        finally:
            await redis.aclose()

    asyncio.run(go())


def blip(browser: WebDriver) -> None:
    """The API goes away (its stream is cut), the gateway answers its 404 page to the
    reconnect, then the API is back; returns once the page is live again, or 15 s on."""
    browser.execute_script("window.__gateway = true; window.__drop();")
    until(browser, lambda d: d.execute_script("return window.__gatewayHits") >= 1,
          what="the reconnect answered by the gateway")
    browser.execute_script("window.__gateway = false;")
    # The API is back: the page has 15 s (its reconnect backoff tops at 10 s) to say so; what
    # it says then is the test's to judge.
    deadline = time.monotonic() + 15
    while (time.monotonic() < deadline
           and browser.find_element(By.ID, "live").text != "live"):
        time.sleep(0.2)


def test_a_gateway_404_during_a_redeploy_does_not_leave_a_running_batch_shown_deleted(
        browser: WebDriver, base_url: str, token: str, live: Settings) -> None:
    pipeline_id, batch_id = running_batch(live)
    try:
        signed_in(browser, base_url, token, "#/")
        browser.execute_script(GATEWAY)
        browser.execute_script("location.hash = arguments[0]", f"#/p/{pipeline_id}/{batch_id}")
        until(browser, lambda d: d.find_element(By.ID, "batch").get_attribute("data-state")
              == "running", what="the running batch shown")
        until(browser, lambda d: d.find_element(By.ID, "live").text == "live", what="stream open")
        blip(browser)
        got = httpx.get(f"{base_url}/api/v1/batches/{pipeline_id}/{batch_id}",
                        headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert got.status_code == 200 and got.json()["state"]["state"] == "running", got.text
        main = browser.find_element(By.ID, "main").text
        live_text = browser.find_element(By.ID, "live").text
        assert "No such batch" not in main and live_text == "live", (
            f"the API answers the batch running, the page says {main!r} (header {live_text!r})")
    finally:
        purge(live, pipeline_id, batch_id)


def test_a_gateway_404_during_a_redeploy_does_not_leave_a_pipeline_shown_unknown(
        browser: WebDriver, base_url: str, token: str, live: Settings) -> None:
    pipeline_id, batch_id = running_batch(live)
    try:
        signed_in(browser, base_url, token, "#/")
        browser.execute_script(GATEWAY)
        browser.execute_script("location.hash = arguments[0]", f"#/p/{pipeline_id}")
        until(browser, lambda d: d.find_elements(
            By.CSS_SELECTOR, f"#batches tbody tr[data-batch-id='{batch_id}']"),
            what="the batch listed")
        until(browser, lambda d: d.find_element(By.ID, "live").text == "live", what="stream open")
        blip(browser)
        got = httpx.get(f"{base_url}/api/v1/batches/{pipeline_id}/",
                        headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert got.status_code == 200 and batch_id in got.json()["items"], got.text
        main = browser.find_element(By.ID, "main").text
        live_text = browser.find_element(By.ID, "live").text
        assert "Unknown pipeline" not in main and live_text == "live", (
            f"the API lists {batch_id} running, the page says {main!r} (header {live_text!r})")
    finally:
        purge(live, pipeline_id, batch_id)


# The page's POSTs: the first reaches the API (which starts the batch) and its answer is lost;
# the retry is answered by the gateway's own 404 page; the next reaches the API again.
LOST_THEN_GATEWAY = """
const realFetch = window.fetch.bind(window);
window.__posts = 0;
window.fetch = async (url, init) => {
  if (!init || init.method !== 'POST') return realFetch(url, init);
  window.__posts++;
  if (window.__posts === 1) {
    await realFetch(url, init);
    throw new TypeError('network error');
  }
  if (window.__posts === 2) {
    return new Response('<html><body>default backend - 404</body></html>',
                        { status: 404, headers: { 'Content-Type': 'text/html' } });
  }
  return realFetch(url, init);
};
"""


def test_run_batch_after_a_lost_answer_and_a_gateways_404_shows_the_batch_it_started(
        browser: WebDriver, base_url: str, token: str) -> None:
    """Run batch, its answer lost (the batch had started) and its retry answered by a
    gateway's 404 page: the page said the run failed while the batch ran, and the obvious
    second click started another. Only the API's own 4xx ends the retries now."""
    pipeline_id = register(base_url, token)
    auth = {"Authorization": f"Bearer {token}"}
    signed_in(browser, base_url, token, f"#/p/{pipeline_id}")
    until(browser, lambda d: d.find_element(By.ID, "live").text == "live", what="list stream")
    browser.execute_script(LOST_THEN_GATEWAY)
    browser.find_element(By.ID, "run").click()
    flashed = until(browser, lambda d: (f := d.find_element(By.ID, "flash")).is_displayed()
                    and f.text, timeout=30, what="the run's answer")
    items = list(httpx.get(f"{base_url}/api/v1/batches/{pipeline_id}/", headers=auth,
                           timeout=10).json()["items"])  # the batch ids
    try:
        assert len(items) == 1  # the first attempt started it
        started = items[0]
        assert flashed == f"Started {started}.", (
            f"the page said {flashed!r} after {browser.execute_script('return window.__posts')}"
            f" POSTs, while {started} runs")
    finally:
        for item in items:
            httpx.put(f"{base_url}/api/v1/batches/{pipeline_id}/{item}/stop", headers=auth,
                      timeout=10)
