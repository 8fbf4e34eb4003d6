"""How single values are written inside a packed batch hash (`core.packing`): each one
either as a value that writes back to exactly the same text, or as the text itself, so
`unpacked` always gives back the hash `pack` was given.

- JSON values (a batch's `steps`, its `config`) are kept parsed only when orjson writes them
  back byte for byte.
- Decimal integers (offsets, totals) become ints when Python writes them back the same way.
- Times in `core.models.now_iso`'s fixed-width form become milliseconds after the batch's
  `created_at`, a few digits instead of 24 characters.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Final

import orjson

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_LIMIT: Final = 10**17  # integers packed: their differences fit JSON's 64 bits


def json_value(text: str, keep_strings: bool = False) -> Any:
    """`text`'s JSON value when orjson writes it back exactly as `text`, else `text`; a
    string value stays `text` when `keep_strings` (the decoder reads a string as the text)."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    if (keep_strings and isinstance(value, str)) or value is None:
        return text
    return value if orjson.dumps(value).decode() == text else text


def number(value: str | None) -> int | str | None:
    """A decimal as Python writes an int becomes that int (small enough that a difference of
    two stays in JSON's 64-bit integers); anything else stays as it is."""
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        return value
    return n if -_LIMIT < n < _LIMIT and str(n) == value else value


def ms_of(iso: str | None) -> int | None:
    """Milliseconds since the epoch of a time in `core.models.now_iso`'s form
    (`2026-12-02T14:08:13.123Z`, fixed width: it writes back exactly), else None."""
    if (iso is None or len(iso) != 24 or not iso.isascii() or iso[23] != "Z"
            or iso[10] != "T" or iso[19] != "." or iso[4] != "-" or iso[7] != "-"
            or iso[13] != ":" or iso[16] != ":" or not iso[20:23].isdigit()):
        return None
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        return None
    return round(when.timestamp() * 1000)


def time_after(iso: str | None, base_ms: int | None) -> int | str | None:
    """A step's time as milliseconds after the batch's creation, when it reads back so."""
    if iso is None or base_ms is None:
        return iso
    ms = ms_of(iso)
    return iso if ms is None else ms - base_ms


def iso_at(value: int | str, base_ms: int | None) -> str:
    """The time `time_after` packed, in `now_iso`'s form again."""
    if isinstance(value, str):
        return value
    if base_ms is None:
        raise ValueError("packed step time without the batch's created_at")
    day, ms = divmod(base_ms + value, 86_400_000)
    seconds, ms = divmod(ms, 1000)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{_date(day)}T{hours:02d}:{minutes:02d}:{seconds:02d}.{ms:03d}Z"


@lru_cache(maxsize=64)
def _date(day: int) -> str:
    """The date `day` days after the epoch (a batch's times share a few)."""
    return (_EPOCH + timedelta(days=day)).date().isoformat()
