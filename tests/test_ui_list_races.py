"""A pipeline's list on the web page across a reconnect, while "Older batches" is on its way
(diff review, ninth session). In a module of its own: a fresh browser and API process, as
the held reads of earlier tests in one module slowed this one's reads past its waits."""

from __future__ import annotations

import uuid

from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from core.settings import Settings
from tests.test_ui import api, base_url, browser, listed, token, until
from tests.test_ui_truth2 import HELD_READS, api_ids, purge_written, signed_in, write_batches

__all__ = ["api", "base_url", "browser", "purge_written", "token"]  # fixtures, re-used


# HELD_READS, and a way to answer the newest held read first.
HELD_READS_NEWEST_FIRST = HELD_READS.replace(
    "window.__answer = ", "window.__answerNewest = () => waiting.length && waiting.pop()();\n"
    "window.__answer = ")


def test_an_older_page_read_across_a_reconnect_leaves_no_gap_in_the_list(
        browser: WebDriver, base_url: str, token: str, live: Settings) -> None:
    """"Older batches" asked for the page below the rows shown; a reconnect's re-read of the
    newest page answered first (new batches had pushed three old ones below it) and moved
    the rows' end up; the older page, added after, left those three missing between the two
    blocks until the next reconnect (diff review). It is now dropped, and read again."""
    pipeline_id = f"ui2-{uuid.uuid4().hex[:8]}"
    write_batches(live, pipeline_id, 60)
    signed_in(browser, base_url, token, "#/")
    browser.execute_script(HELD_READS_NEWEST_FIRST)
    browser.execute_script("location.hash = arguments[0]", f"#/p/{pipeline_id}")
    until(browser, lambda d: d.execute_script("return window.__held") == 1, what="first read")
    browser.execute_script("window.__answer()")
    until(browser, lambda d: len(listed(d)) == 50, what="the first page")
    until(browser, lambda d: d.find_element(By.ID, "live").text == "live", what="stream open")
    write_batches(live, pipeline_id, 3)  # newer than every row: 53 shown
    until(browser, lambda d: len(listed(d)) == 53, what="the three new batches")

    until(browser, lambda d: d.find_element(By.ID, "older"), what="'older'").click()
    until(browser, lambda d: d.execute_script("return window.__held") == 2, what="older's read")
    browser.execute_script("window.__drop()")
    until(browser, lambda d: d.execute_script("return window.__held") == 3,
          timeout=15, what="the reconnect's read")
    browser.execute_script("window.__answerNewest()")  # the re-read first ...
    browser.execute_script("window.__answer()")  # ... then the older page
    until(browser, lambda d: not d.execute_script(
        "return document.getElementById('older').disabled"), what="both reads applied")
    everything = api_ids(base_url, token, pipeline_id)
    shown = listed(browser)
    assert shown == everything[:len(shown)], (
        f"the list shows {len(shown)} batches with a gap: "
        f"{sorted(set(everything[:everything.index(shown[-1])]) - set(shown))} missing")
    until(browser, lambda d: d.find_element(By.ID, "older"), what="'older'").click()
    until(browser, lambda d: d.execute_script("return window.__held") == 4, what="older again")
    browser.execute_script("window.__answer()")
    until(browser, lambda d: listed(d) == everything, what="every batch, in order")
