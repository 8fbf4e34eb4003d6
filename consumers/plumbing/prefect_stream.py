"""Prefect's event subscriber, keeping the server's receipt time of each event.

The server sends every event with `received` (when it accepted it), but the subscriber
parses it into an `Event`, which drops that field. The bridge needs it: an event received
before the session subscribed can only have come from the server's database, so its receipt
time tells how far the event persister has got.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast
from uuid import UUID

import orjson
from prefect.events.clients import PrefectEventSubscriber
from websockets.asyncio.client import ClientConnection


class _Recording:
    """The subscriber's websocket, noting the id and receipt time of each event read."""

    def __init__(self, socket: ClientConnection, into: ReceiptSubscriber) -> None:
        self._socket = socket
        self._into = into

    async def recv(self, *args: Any, **kwargs: Any) -> Any:
        raw = await self._socket.recv(*args, **kwargs)
        try:
            message = orjson.loads(raw)
            event = message["event"]
            self._into.last = (UUID(event["id"]), datetime.fromisoformat(event["received"]))
        except Exception:  # not an event (auth, ...): the subscriber handles it
            self._into.last = None
        return raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)


class ReceiptSubscriber(PrefectEventSubscriber):
    last: tuple[UUID, datetime] | None = None

    async def _reconnect(self) -> None:
        await super()._reconnect()
        assert self._websocket is not None
        self._websocket = cast(ClientConnection, _Recording(self._websocket, self))

    def received(self, event_id: UUID) -> datetime | None:
        """When the server received the event just yielded (None when unknown)."""
        last = self.last
        return last[1] if last is not None and last[0] == event_id else None
