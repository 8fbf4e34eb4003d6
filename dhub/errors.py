"""What the client raises: every failure is a `DhubError`, so a caller catches one type."""

from __future__ import annotations

import contextlib
from typing import Any

import httpx


class DhubError(Exception):
    """Base of the client's errors."""


class ConnectionFailed(DhubError):
    """The API could not be reached (or stayed unreachable for the whole reconnect budget)."""


class ApiError(DhubError):
    """The API answered with an error: `status`, and the body's stable `code` and `message`."""

    def __init__(self, status: int, code: str, message: str, body: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body

    @property
    def retryable(self) -> bool:
        """A dependency of the API was down (503) or the API itself failed: try again later."""
        return self.status >= 500


class AuthError(ApiError):
    """401 (no valid token) or 403 (the token may not do this)."""


class NotFound(ApiError):
    """404: unknown pipeline, version or batch (a deleted batch is unknown at once)."""


def raise_for(response: httpx.Response) -> None:
    """The API's error answer as the matching `ApiError`."""
    if response.is_success or response.status_code == 304:
        return
    code, message, body = "http_error", response.reason_phrase, None
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
    raise kind(status, code, message, body)
