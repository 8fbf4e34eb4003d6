"""Sales records: the seeded generator of source partitions and the validation of a record.

Money is handled in integer cents (prices parsed with `Decimal`), so every total is exact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final

import orjson

from pipelines.sales.files import write_atomically

REGIONS: Final = ("apac", "emea", "latam", "north-america")
PRODUCTS: Final = ("laptop", "monitor", "keyboard", "mouse", "dock", "headset")
FIRST_DAY: Final = datetime(2024, 1, 1, tzinfo=UTC)
DAYS: Final = 28
MAX_QUANTITY: Final = 1000


@dataclass(frozen=True, slots=True)
class Sale:
    """A validated record, as staged by `extract`."""

    order_id: str
    day: str
    region: str
    product: str
    quantity: int
    price_cents: int

    @property
    def revenue_cents(self) -> int:
        return self.quantity * self.price_cents

    def to_json(self) -> bytes:
        return orjson.dumps({"order_id": self.order_id, "day": self.day, "region": self.region,
                             "product": self.product, "quantity": self.quantity,
                             "price_cents": self.price_cents})

    @classmethod
    def from_json(cls, line: bytes) -> Sale:
        data = orjson.loads(line)
        return cls(data["order_id"], data["day"], data["region"], data["product"],
                   data["quantity"], data["price_cents"])


class Invalid(ValueError):
    """A source record that fails validation; its text is the reject reason."""


def partition_sizes(rows: int, partitions: int) -> list[int]:
    """How many records each partition gets: as even as possible, the first ones larger."""
    base, extra = divmod(rows, partitions)
    return [base + (1 if i < extra else 0) for i in range(partitions)]


def _record(rng: random.Random, partition: int, n: int) -> dict[str, Any]:
    moment = FIRST_DAY + timedelta(seconds=rng.randrange(DAYS * 86_400))
    cents = rng.randrange(199, 250_000)
    return {
        "order_id": f"p{partition}-{n:08d}",
        "ts": moment.isoformat().replace("+00:00", "Z"),
        "region": rng.choice(REGIONS),
        "product": rng.choice(PRODUCTS),
        "quantity": rng.randint(1, 20),
        "unit_price": f"{cents // 100}.{cents % 100:02d}",
    }


def _corrupt(rng: random.Random, record: dict[str, Any]) -> dict[str, Any]:
    """One of the defects real feeds have."""
    kind = rng.randrange(4)
    if kind == 0:
        record["quantity"] = -record["quantity"]
    elif kind == 1:
        record["region"] = "atlantis"
    elif kind == 2:
        record["unit_price"] = "n/a"
    else:
        del record["ts"]
    return record


def generate_partition(path: Path, partition: int, count: int, *, seed: int,
                       invalid_rate: float = 0.0) -> None:
    """Writes `count` JSONL records; the same seed and partition give the same bytes."""
    # A string seed is hashed deterministically (unlike hash() of a str across processes).
    rng = random.Random(f"sales:{seed}:{partition}")
    lines = []
    for n in range(count):
        record = _record(rng, partition, n)
        if invalid_rate and rng.random() < invalid_rate:
            record = _corrupt(rng, record)
        lines.append(orjson.dumps(record))
    write_atomically(path, b"\n".join(lines) + (b"\n" if lines else b""))


def _price_cents(value: object) -> int:
    if not isinstance(value, str):
        raise Invalid("unit_price must be a decimal string")
    try:
        price = Decimal(value)
    except InvalidOperation:
        raise Invalid(f"unit_price {value!r} is not a number") from None
    cents = price * 100
    if not price.is_finite() or price < 0 or cents != cents.to_integral_value():
        raise Invalid(f"unit_price {value!r} is not an amount in cents")
    return int(cents)


def _day(value: object) -> str:
    if not isinstance(value, str):
        raise Invalid("ts must be an ISO-8601 string")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise Invalid(f"ts {value!r} is not ISO-8601") from None
    if moment.tzinfo is None:
        raise Invalid(f"ts {value!r} has no time zone")
    return moment.astimezone(UTC).date().isoformat()


def validate(line: bytes) -> Sale:
    """The staged form of one source line, or `Invalid` with the reason."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise Invalid("not JSON") from None
    if not isinstance(data, dict):
        raise Invalid("not a JSON object")
    order_id = data.get("order_id")
    if not isinstance(order_id, str) or not order_id:
        raise Invalid("order_id missing")
    region = data.get("region")
    if region not in REGIONS:
        raise Invalid(f"unknown region {region!r}")
    product = data.get("product")
    if not isinstance(product, str) or not product:
        raise Invalid("product missing")
    quantity = data.get("quantity")
    if isinstance(quantity, bool) or not isinstance(quantity, int) or \
            not 0 < quantity <= MAX_QUANTITY:
        raise Invalid(f"quantity {quantity!r} out of range")
    return Sale(order_id, _day(data.get("ts")), region, product, quantity,
                _price_cents(data.get("unit_price")))
