"""The web page's script is ES modules (`service/ui/*.js`, the entry `app.js`): every module the
page imports, however deep, is served from this origin as JavaScript, and the browser loads and
runs them all under the page's Content-Security-Policy. One module missing, served with another
type or refused by the policy, and the page shows nothing at all (an entry whose imports fail
never runs).

Driven as tests/test_ui.py drives the page: an API process of this tree, headless Chromium.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.test_ui import api, base_url, browser, until

__all__ = ["api", "base_url", "browser"]  # fixtures, re-used

UI = Path(__file__).resolve().parent.parent / "service" / "ui"
# `import ... from "x"`, `export ... from "x"` (across lines: `import {\n a,\n} from "x"`)
# and `import "x"`; the modules hold no semicolon inside an import's braces.
STATIC = re.compile(r'(?:^|;|\n)\s*(?:import|export)\b[^;"\']*?\bfrom\s*["\']([^"\']+)["\']'
                    r'|(?:^|;|\n)\s*import\s*["\']([^"\']+)["\']')
DYNAMIC = re.compile(r"\bimport\s*\(")


class Scripts(HTMLParser):
    """The page's `<script>` tags as (type, src)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            named = dict(attrs)
            self.found.append((named.get("type") or "", named.get("src") or ""))


def imports(source: str) -> list[str]:
    """The specifiers a module imports statically, in order (comments are no imports)."""
    code = re.sub(r"//[^\n]*", "", source)
    return [a or b for a, b in STATIC.findall(code)]


def module_graph(page_url: str, get: Callable[[str], httpx.Response]) -> dict[str, httpx.Response]:
    """Every module the page at `page_url` loads, by URL, with the answer it was served."""
    parser = Scripts()
    parser.feed(get(page_url).text)
    entries = [urljoin(page_url, src) for kind, src in parser.found if src]
    assert parser.found == [("module", "/ui/app.js")], parser.found  # one entry, a module
    seen: dict[str, httpx.Response] = {}
    todo = list(entries)
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        seen[url] = answer = get(url)
        assert answer.status_code == 200, (url, answer.status_code)
        assert not DYNAMIC.search(answer.text), f"{url}: a dynamic import this walk cannot follow"
        todo += [urljoin(url, spec) for spec in imports(answer.text)]
    return seen


def test_the_import_walk_finds_imports_and_skips_comments() -> None:
    source = ('// import { x } from "./commented.js";\nimport { a } from "./a.js";\n'
              'import {\n  b, c,\n} from "./b.js";\nimport "./side.js";\n'
              'export { d } from "./d.js";\nconst s = "import from";\n')
    assert imports(source) == ["./a.js", "./b.js", "./side.js", "./d.js"]


def test_every_module_the_page_imports_is_served_as_javascript_from_this_origin(
        base_url: str) -> None:
    with httpx.Client(timeout=10) as client:
        page_url = f"{base_url}/ui/"
        page = client.get(page_url)
        policy = page.headers["Content-Security-Policy"]
        # A module's imports are fetched under the page's policy: this origin only.
        assert "script-src 'self';" in policy and "default-src 'none'" in policy, policy
        graph = module_graph(page_url, client.get)
        # The same walk from the page at /ui (no slash): its src is absolute, so the same files.
        assert set(module_graph(f"{base_url}/ui", client.get)) == set(graph)
    origin = urlsplit(base_url)
    for url, answer in graph.items():
        where = urlsplit(url)
        assert (where.scheme, where.netloc) == (origin.scheme, origin.netloc), url
        assert where.path.startswith("/ui/") and where.path.count("/") == 2, url
        # A module with another type is not run; nosniff: not guessed either.
        assert answer.headers["Content-Type"] == "text/javascript; charset=utf-8", url
        assert answer.headers["X-Content-Type-Options"] == "nosniff", url
        assert answer.headers["Content-Security-Policy"] == policy, url
        assert answer.content == (UI / Path(where.path).name).read_bytes(), url
    # Every script of the directory is one the page runs: none is left behind, unused.
    assert {Path(urlsplit(u).path).name for u in graph} == {p.name for p in UI.glob("*.js")}
    # The stream reader is among them (what test_ui.py once found in the single script).
    assert any("text/event-stream" in answer.text for answer in graph.values())


def test_the_browser_loads_and_runs_every_module_under_the_policy(
        browser: WebDriver, base_url: str) -> None:
    browser.get(f"{base_url}/ui/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    # Drawn by app.js, which runs only once every module it imports, however deep, has loaded.
    until(browser, lambda d: d.find_element(By.ID, "token"), what="the sign-in form")
    with httpx.Client(timeout=10) as client:
        expected = set(module_graph(f"{base_url}/ui/", client.get))
    loaded: list[list[object]] = browser.execute_script(
        "return performance.getEntriesByType('resource')"
        ".filter(e => e.name.endsWith('.js')).map(e => [e.name, e.responseStatus])")
    assert {str(name) for name, _ in loaded} == expected
    assert all(status in (200, 304) for _, status in loaded), loaded
