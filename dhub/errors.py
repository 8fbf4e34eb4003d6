"""What the client raises: every failure is a `DhubError`, so a caller catches one type."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final

import httpx

# A Retry-After longer than this is waited this long (a watch's reconnect budget goes on).
RETRY_AFTER_MAX_S: Final = 60.0


class DhubError(Exception):
    """Base of the client's errors."""


class ConnectionFailed(DhubError):
    """The API could not be reached (or stayed unreachable for the whole reconnect budget)."""


# The codes of errors the API did not say itself: an answer without its JSON error, one that
# is not JSON at all (`dhub.client.answer_json`).
HTTP_ERROR: Final = "http_error"
NOT_JSON: Final = "not_json"


class ApiError(DhubError):
    """The API answered with an error: `status`, and the body's stable `code` and `message`."""

    def __init__(self, status: int, code: str, message: str, body: Any = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body
        self.retry_after = retry_after  # seconds, from the answer's Retry-After

    @property
    def from_api(self) -> bool:
        """Whether the API itself said this (its JSON error, with a code), not something in
        front of it (a gateway's page while the API is redeployed, a proxy's 404)."""
        return self.code not in (HTTP_ERROR, NOT_JSON)

    @property
    def retryable(self) -> bool:
        """A dependency of the API was down (503), the API itself failed, or it (or a gateway
        in front of it) says too many requests (429): try again later."""
        return self.status >= 500 or self.status == 429


class AuthError(ApiError):
    """401 (no valid token) or 403 (the token may not do this)."""


class NotFound(ApiError):
    """404: unknown pipeline, version or batch (a deleted batch is unknown at once)."""


def raise_for(response: httpx.Response) -> None:
    """The API's error answer as the matching `ApiError`."""
    if response.is_success or response.status_code == 304:
        return
    code, message, body = HTTP_ERROR, response.reason_phrase, None
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code", code))
        message = str(error.get("message", message))
    elif isinstance(error, str) and error:
        # Not the API's shape (a gateway's `{"error": "..."}`): still an ApiError of its
        # status, so a 5xx is retried like any other, never an AttributeError here.
        message = error
    status = response.status_code
    kind = AuthError if status in (401, 403) else NotFound if status == 404 else ApiError
    raise kind(status, code, message, body, retry_after(response.headers.get("Retry-After")))


def retry_after(value: str | None) -> float | None:
    """Retry-After's seconds (RFC 9110 10.2.3: a number of seconds or an HTTP date), at most
    RETRY_AFTER_MAX_S; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    # ASCII digits only: "²" (a latin-1 byte 0xB2) is a digit to str.isdigit, not to float.
    if value.isascii() and value.isdigit():
        return min(float(value), RETRY_AFTER_MAX_S)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(0.0, (when - datetime.now(UTC)).total_seconds()), RETRY_AFTER_MAX_S)
