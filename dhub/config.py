"""Where the API is and which token to send: `DHUB_URL` and `DHUB_TOKEN`, else the local stack's.

The token, in order: `DHUB_TOKEN`; else the file the local stack generates, `api-token` in
its state directory: `$DHUB_STATE_DIR` when set (the stack's own variable), else `.dhub/`
of the checkout this package lives in (an editable install, or running from the repo), else
`.dhub/` of the current directory. Deliberately not `core.settings`: the client stays a
standalone package (httpx only) that upstream services can install without the service.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

DEFAULT_URL: Final = "http://127.0.0.1:8080"
TOKEN_FILE: Final = "api-token"  # noqa: S105 -- a file name, not a secret
CHECKOUT: Final = Path(__file__).resolve().parent.parent


class ConfigError(Exception):
    """No usable URL or token; the text says what to set."""


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    token: str


def check_token(token: str, source: str) -> str:
    """`token`, when an HTTP header can carry it: ASCII, spaces and tabs included (the API
    takes the rest of `Bearer <token>` whole). Otherwise (a token pasted with a curly quote,
    a non-breaking space, a control character) httpx failed deep inside with a
    UnicodeEncodeError whose text is the whole `Bearer <token>` header, and `dhub` printed it
    as an internal error. Says where the token came from, never its value."""
    if not all(" " <= char <= "~" or char == "\t" for char in token):
        raise ConfigError(f"{source} holds a character an HTTP header cannot carry (not ASCII, "
                          "or a control character): copy the token again")
    return token


def check_url(url: str, source: str) -> str:
    """`url` without its trailing slash, when `dhub` can use it: http(s), and no user or
    password in it. httpx sends a URL's user and password as Basic auth in place of the
    token (every request a 401 that blamed the token), and every connection error quoted
    the URL, password and all. The refusal names where the URL came from, never its text."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:  # "http://[bad": an unclosed IPv6 bracket, a bad port
        raise ConfigError(f"{source} is not a URL dhub can read") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise ConfigError(f"{source} must be an http(s) URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{source} carries a user or password: dhub authenticates with its "
                          "token (DHUB_TOKEN); give the URL without them")
    return url.rstrip("/")


def token_files(env: dict[str, str] | None = None) -> list[Path]:
    env = dict(os.environ) if env is None else env
    state = env.get("DHUB_STATE_DIR")
    if state:
        return [Path(state) / TOKEN_FILE]
    return list(dict.fromkeys([CHECKOUT / ".dhub" / TOKEN_FILE, Path.cwd() / ".dhub" / TOKEN_FILE]))


def base_url(url: str | None = None, env: dict[str, str] | None = None,
             source: str = "--url") -> str:
    """The API's base URL: `url` (`--url`), else `DHUB_URL`, else the local stack's."""
    env = dict(os.environ) if env is None else env
    if url:
        return check_url(url, source)
    if env.get("DHUB_URL"):
        return check_url(env["DHUB_URL"], "DHUB_URL")
    return DEFAULT_URL


def resolve(url: str | None = None, env: dict[str, str] | None = None) -> Target:
    env = dict(os.environ) if env is None else env
    base = base_url(url, env)
    token = env.get("DHUB_TOKEN", "").strip()
    if token:
        return Target(base, check_token(token, "DHUB_TOKEN"))
    candidates = token_files(env)
    for path in candidates:
        try:
            token = path.read_text().strip()
        except OSError:
            continue
        if token:
            return Target(base, check_token(token, f"the token file {path}"))
    tried = ", ".join(str(p) for p in candidates)
    raise ConfigError(f"no API token: set DHUB_TOKEN (no token file found at {tried})")
