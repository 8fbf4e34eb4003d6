"""A finished batch's hash in its packed form (issue 12: a finished batch in at most 1 KB).

Placeholder: `unpacked` is the identity until the packed form exists. Every Python reader of
a batch hash passes what it read through `unpacked`, so the packed form stays this module's
business.
"""

from __future__ import annotations

from typing import Final

# The field holding the packed rest of a finished batch's hash.
PACKED: Final = "packed"


def unpacked(fields: dict[str, str]) -> dict[str, str]:
    """The hash as its readers know it, whether Redis holds it packed or not."""
    return fields
