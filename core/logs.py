"""One JSON object per log line on stderr, so log collectors need no parsing rules (the
consumers' and the API's processes alike)."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, Final

import orjson

# Attributes every LogRecord has; anything else was passed with `extra=` and is kept.
_STANDARD: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}


# The password of a URL quoted in a message: httpx and Prefect's client put the request's URL in
# their errors' text, so DHUB_PREFECT_API_URL's basic-auth credentials would reach the log. Up
# to the userinfo's last `@`: a password may hold one left unencoded. Both patterns start at
# a `://` and stop at the next one: a text quoting input (a refused config key) can be as long
# as a Kafka record, and a pattern starting anywhere in a run of scheme letters took time
# quadratic in it (a 120 KB key held a consumer's loop for 20 s).
_URL_PASSWORD: Final = re.compile(r"(?<=[A-Za-z0-9+.-])(://[^\s/?#@:'\"]*:)[^\s/?#'\"]+@")
# Query parameters that carry a secret: redis-py hands unknown query names to the connection,
# so `redis://db/0?password=...` (or `ssl_password=`) is a working way to give a password.
_SECRET_PARAM: Final = re.compile(
    r"(^|&)([^=&]*(?:pass|pwd|secret|token|key|auth)[^=&]*)=[^&]*", re.IGNORECASE)
# A quoted URL's query, whose secret parameters (`_SECRET_PARAM`) are masked too.
_URL_QUERY: Final = re.compile(r"(://(?:(?!://)[^\s?#'\"])*\?)([^\s#'\"]+)")


def scrub(text: str) -> str:
    """`text` with every URL's password in it replaced by `***`: the userinfo's and the
    query's secret parameters (`?password=`, a form redis-py takes). The one masking rule:
    for a whole log message, and for a URL logged or printed on purpose."""
    if "://" not in text:
        return text
    text = _URL_PASSWORD.sub(r"\1***@", text)
    if "?" in text:
        text = _URL_QUERY.sub(lambda m: m[1] + _SECRET_PARAM.sub(r"\1\2=***", m[2]), text)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD:
                out[name] = value
        if record.exc_info:
            out["exc"] = scrub(self.formatException(record.exc_info))
        return orjson.dumps(out, default=str).decode()


def setup(level: str = "INFO", *filters: logging.Filter) -> None:
    """JSON lines on stderr; `filters` (e.g. the API's request context) see every record."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for log_filter in filters:
        handler.addFilter(log_filter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Kafka's and Prefect's clients are chatty at INFO about things that are routine here.
    for noisy in ("aiokafka", "prefect", "httpx", "websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
