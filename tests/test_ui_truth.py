"""What the web page shows against what the API says: a deleted batch, an unknown pipeline, a
list the API cannot read, a token no header can carry, a malformed link (review, eighth session).

Driven as tests/test_ui.py drives the page: headless Chromium on an API process of this tree.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import uuid
from urllib.parse import urlsplit, urlunsplit

import httpx
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from core.settings import Settings
from tests.conftest import free_port
from tests.tcp_proxy import TcpProxy
from tests.test_ui import Api, api, base_url, browser, register, token, until

__all__ = ["api", "base_url", "browser", "token"]  # fixtures, re-used


def signed_in(driver: WebDriver, base_url: str, token: str, view: str) -> None:
    driver.get(f"{base_url}/ui/#token={token}")
    until(driver, lambda d: d.execute_script("return sessionStorage.getItem('dhub.token')"),
          what="the fragment's token taken")
    driver.execute_script("location.hash = arguments[0]", view)


def test_a_batch_deleted_while_watched_is_not_left_showing_its_last_state(
        browser: WebDriver, base_url: str, token: str) -> None:
    pipeline_id = register(base_url, token)
    auth = {"Authorization": f"Bearer {token}"}
    answer = httpx.post(f"{base_url}/api/v1/batches/{pipeline_id}", headers=auth, timeout=10)
    assert answer.status_code == 200, answer.text
    batch_id = str(answer.json()["item"])
    signed_in(browser, base_url, token, f"#/p/{pipeline_id}/{batch_id}")
    until(browser, lambda d: d.find_element(By.ID, "batch").get_attribute("data-state") not in
          ("", None), what="the batch shown")
    until(browser, lambda d: d.find_element(By.ID, "live").text == "live", what="stream open")
    gone = httpx.delete(f"{base_url}/api/v1/batches/{pipeline_id}/{batch_id}", headers=auth,
                        timeout=10)
    assert gone.status_code == 200, gone.text
    assert get_status(base_url, token, pipeline_id, batch_id) == 404
    until(browser, lambda d: d.find_element(By.ID, "batch").get_attribute("data-state")
          == "deleted", what="the deleted event")
    # The flash saying so disappears after 12 s; what stays on the page is the state badge.
    badges = [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#batch .toolbar .badge")]
    assert "deleted" in badges, f"the page still shows the deleted batch as {badges}"


def get_status(base_url: str, token: str, pipeline_id: str, batch_id: str) -> int:
    return httpx.get(f"{base_url}/api/v1/batches/{pipeline_id}/{batch_id}",
                     headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code


def test_an_unknown_pipeline_is_not_shown_as_an_empty_one(
        browser: WebDriver, base_url: str, token: str) -> None:
    pipeline_id = f"ui-nosuch-{uuid.uuid4().hex[:8]}"
    listing = httpx.get(f"{base_url}/api/v1/batches/{pipeline_id}/",
                        headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert listing.status_code == 404, listing.text
    signed_in(browser, base_url, token, f"#/p/{pipeline_id}")
    until(browser, lambda d: d.find_element(By.ID, "live").text == "offline",
          what="the list stream's 404")
    text = browser.find_element(By.ID, "main").text
    assert "No batch yet" not in text, f"an unknown pipeline shown as empty: {text!r}"
    assert "unknown" in text.lower() or "no such" in text.lower(), text



def test_a_list_the_api_cannot_read_is_not_shown_as_empty(
        browser: WebDriver, base_url: str, token: str, live: Settings) -> None:
    """Redis unreachable: the list answers 503; the page says the pipeline has no batch."""
    pipeline_id = register(base_url, token)
    auth = {"Authorization": f"Bearer {token}"}
    answer = httpx.post(f"{base_url}/api/v1/batches/{pipeline_id}", headers=auth, timeout=10)
    assert answer.status_code == 200, answer.text
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    redis = urlsplit(live.redis_url)
    proxy = TcpProxy(redis.hostname or "127.0.0.1", redis.port or 6379)
    asyncio.run_coroutine_threadsafe(proxy.start(), loop).result(10)
    down = Api(free_port())
    saved = os.environ.get("DHUB_REDIS_URL")
    os.environ["DHUB_REDIS_URL"] = urlunsplit(redis._replace(netloc=re.sub(
        r"[^@]*$", f"127.0.0.1:{proxy.port}", redis.netloc, count=1)))
    try:
        down.start()
    finally:
        if saved is None:
            os.environ.pop("DHUB_REDIS_URL")
        else:
            os.environ["DHUB_REDIS_URL"] = saved
    try:
        listing = httpx.get(f"{down.url}/api/v1/batches/{pipeline_id}/", headers=auth, timeout=10)
        assert listing.status_code == 200 and listing.json()["items"], listing.text
        asyncio.run_coroutine_threadsafe(proxy.stop(), loop).result(10)  # Redis unreachable
        listing = httpx.get(f"{down.url}/api/v1/batches/{pipeline_id}/", headers=auth, timeout=10)
        assert listing.status_code == 503, listing.text
        signed_in(browser, down.url, token, f"#/p/{pipeline_id}")
        until(browser, lambda d: d.find_element(By.ID, "live").text == "reconnecting…",
              what="the list stream's 503")
        text = browser.find_element(By.ID, "main").text
        assert "No batch yet" not in text, f"an unreadable list shown as empty: {text!r}"
    finally:
        down.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_a_token_no_request_can_carry_is_refused_not_kept(
        browser: WebDriver, base_url: str, token: str) -> None:
    """A pasted token with a curly quote cannot go in a header: the form shows fetch's
    TypeError but keeps the token, and the next load is "signed in" with streams that
    retry it for ever ("reconnecting…")."""
    browser.get(f"{base_url}/ui/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    field = until(browser, lambda d: d.find_element(By.ID, "token"), what="the login form")
    field.send_keys(token + "\u2019")
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    until(browser, lambda d: d.find_element(By.ID, "login-error").text, what="the refusal")
    assert browser.execute_script("return sessionStorage.getItem('dhub.token')") is None


def test_a_malformed_fragment_token_does_not_leave_a_dead_page(
        browser: WebDriver, base_url: str) -> None:
    browser.get(f"{base_url}/ui/")
    browser.execute_script("sessionStorage.clear()")
    browser.get("about:blank")  # a fresh load, not a hashchange of the same document
    browser.get(f"{base_url}/ui/#token=abc%E0%A4%A")
    until(browser, lambda d: d.execute_script("return document.readyState") == "complete",
          what="page loaded")
    # Either the login form or a message: not an empty page with no handlers attached.
    assert browser.find_elements(By.ID, "token"), browser.find_element(By.ID, "main").text
