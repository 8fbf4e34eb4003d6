"""What a list of a pipeline's batches may be restricted to: a state, an outcome, created
bounds, parsed from a request's values (`BadFilter` says what is wrong), and how a batch's
hash matches. The pages that read a filter's indexes are `core.paging`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Final

from core.models import BATCH_STATES, OUTCOMES

# The seconds' fraction of an ISO-8601 time (extended or basic form), and of its offset.
_TIME_FRACTION: Final = re.compile(r"(?<![+\-\d])\d\d(?::?\d\d){2}[.,](\d+)")
_OFFSET_FRACTION: Final = re.compile(r"([+-])\d\d(?::?\d\d){2}[.,](\d+)")


# The query parameters that name a filter, as the list takes them.
FILTERS: Final = ("state", "outcome", "created_after", "created_before")


class BadFilter(ValueError):
    """A filter value the list does not take; the message says which and why."""


def created_bound(name: str, raw: str) -> str:
    """An ISO-8601 time with its timezone as PAGE_RANGE compares `created_at` with it: UTC, fixed
    width, milliseconds (`created_at` has no finer ones), rounded up — so `created_at >=`
    and `created_at <` the result are exact for both bounds."""
    return _rounded(name, *_instant(name, raw))


def _instant(name: str, raw: str) -> tuple[datetime, Fraction]:
    """The time `raw` names, exactly: in UTC to the microsecond, and what is left of it
    past the microsecond, in microseconds (within (-1, 1): the time's fraction and its
    offset's both count). datetime keeps six digits of either fraction and drops the
    rest; a positive offset's dropped digits put the instant earlier, a negative one's
    later."""
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise BadFilter(f"{name} must be an ISO-8601 time with a timezone, like "
                        "2026-01-31T23:59:59Z (a '+' in an offset travels as %2B)") from None
    if when.tzinfo is None:
        raise BadFilter(f"{name} must include a timezone (Z or an offset such as +02:00)")
    finer = Fraction(0)
    if (fraction := _TIME_FRACTION.search(raw)) is not None:
        finer += _past_microsecond(fraction.group(1))
    if (offset := _OFFSET_FRACTION.search(raw)) is not None:
        finer += _past_microsecond(offset.group(2)) * (-1 if offset.group(1) == "+" else 1)
    try:
        return when.astimezone(UTC), finer
    except OverflowError:
        raise BadFilter(f"{name} is out of range") from None


def _past_microsecond(digits: str) -> Fraction:
    """A seconds' fraction's digits past the sixth, as a part of a microsecond."""
    return Fraction(int(digits[6:] or "0"), 10 ** max(len(digits) - 6, 0))


def _rounded(name: str, when: datetime, finer: Fraction) -> str:
    """`_instant`'s time up to the next millisecond, in `created_at`'s form."""
    try:
        if when.microsecond % 1000 or finer > 0:
            when += timedelta(microseconds=1000 - when.microsecond % 1000)
    except OverflowError:
        raise BadFilter(f"{name} is out of range") from None
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class ListFilter:
    """What a page is restricted to; `None` for no restriction. The created bounds are in
    `created_bound`'s form: `created_after` at or after, `created_before` strictly before."""

    state: str | None = None
    outcome: str | None = None
    created_after: str | None = None
    created_before: str | None = None

    @classmethod
    def parse(cls, state: str | None = None, outcome: str | None = None,
              created_after: str | None = None, created_before: str | None = None) -> ListFilter:
        """From a request's values (raises BadFilter)."""
        if state is not None and state not in BATCH_STATES:
            raise BadFilter(f"state must be one of {', '.join(BATCH_STATES)}")
        if outcome is not None and outcome not in OUTCOMES:
            raise BadFilter(f"outcome must be one of {', '.join(OUTCOMES)}")
        after_at = _instant("created_after", created_after) if created_after is not None else None
        before_at = (_instant("created_before", created_before)
                     if created_before is not None else None)
        # The times as given: rounded to milliseconds, a valid window narrower than one
        # (.0001 to .0009) would read as not earlier. It is empty (`disjoint`).
        if after_at is not None and before_at is not None and after_at >= before_at:
            raise BadFilter("created_after must be earlier than created_before")
        after = _rounded("created_after", *after_at) if after_at is not None else None
        before = _rounded("created_before", *before_at) if before_at is not None else None
        return cls(state, outcome, after, before)

    @property
    def active(self) -> bool:
        return self != NO_FILTER

    @property
    def disjoint(self) -> bool:
        """No batch can match: only a stopped batch has an outcome, and `created_at` has
        no time within a window narrower than a millisecond (its bounds round alike)."""
        return ((self.outcome is not None and self.state not in (None, "stop"))
                or (self.created_after is not None and self.created_before is not None
                    and self.created_after >= self.created_before))

    def digest(self) -> str:
        """What a token records of its filter ('' for none: unfiltered tokens stay as they were)."""
        if not self.active:
            return ""
        text = "\n".join(v or "" for v in (self.state, self.outcome, self.created_after,
                                           self.created_before))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def matches(self, fields: Mapping[str, str]) -> bool:
        """The batch's hash is in the filter (created_at is fixed width: text order is time's)."""
        return ((self.state is None or fields.get("state") == self.state)
                and (self.outcome is None or fields.get("outcome") == self.outcome)
                and (self.created_after is None or fields.get("created_at", "") >= self.created_after)
                and (self.created_before is None or fields.get("created_at", "") < self.created_before))


NO_FILTER: Final = ListFilter()
