"""Requests the HTTP parser refuses (431 an oversize header, 414 an oversize request line)
are answered by service.edge.JsonErrorProtocol before any route, so the edge never counted
them: a client failing on every request (a JWT over 8 KB, a list URL grown past 8 KB)
showed no request at all in dhub_http_request_duration_seconds. They are counted under the
route `refused`."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from core.settings import Settings
from service.edge import REFUSED_METHOD, REFUSED_ROUTE
from tests.helpers import STATIC_TOKEN, api_settings, bearer
from tests.test_api_auth import hs_token
from tests.test_api_client_gone import edge_server
from tests.test_api_input import raw


async def test_requests_the_parser_refuses_are_counted(test_settings: Settings,
                                                       redis: Redis) -> None:
    async with edge_server(api_settings(test_settings)) as (port, _):
        big_token = "Bearer " + STATIC_TOKEN + "x" * 9000  # one header over 8190 bytes
        request = (f"GET /api/v1/batches/p/b HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   f"Authorization: {big_token}\r\nConnection: close\r\n\r\n").encode()
        assert (await raw(port, request))[0] == 431
        long_line = (f"GET /api/v1/batches/p/{'a' * 9000} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     "Connection: close\r\n\r\n").encode()
        assert (await raw(port, long_line))[0] == 414
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{port}/metrics",
                headers=bearer(hs_token("metrics:read"))) as response:
            text = await response.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    counted = {(s.labels["route"], s.labels["method"], s.labels["status"]): s.value
               for s in families["dhub_http_request_duration_seconds"].samples
               if s.name.endswith("_count") and s.labels["route"] == REFUSED_ROUTE}
    assert counted == {(REFUSED_ROUTE, REFUSED_METHOD, "431"): 1.0,
                       (REFUSED_ROUTE, REFUSED_METHOD, "414"): 1.0}
