"""`GET /metrics`: the API's Prometheus metrics (every name starts with `dhub_`).

Requests are counted on the hot path without prometheus-client: the edge (service.errors) adds one
observation to a plain dict of counters (`RequestStats.observe`), and a collector turns those
into metric families only when scraped. A prometheus-client Histogram per request costs a lock
and a label lookup, a measurable share of a cached GET. Cache, stream and held-request figures
are read from the objects that keep them, at scrape time too.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from service.appkeys import CACHE, METRICS_REGISTRY, WAITERS

BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                  2.5, 5.0, 10.0, 30.0, 60.0)


class RequestStats:
    """Requests by (route, method, status): count, total seconds, and per-bucket counts."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, int], list[float]] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        series = self._series.get((route, method, status))
        if series is None:
            # [count, sum, bucket 0 .. bucket n-1, +Inf]
            series = self._series[(route, method, status)] = [0.0] * (len(BUCKETS) + 3)
        series[0] += 1
        series[1] += seconds
        series[2 + bisect_left(BUCKETS, seconds)] += 1

    def families(self) -> Iterator[Metric]:
        histogram = HistogramMetricFamily(
            "dhub_http_request_duration_seconds",
            "API requests by route, method and status, with their latency",
            labels=["route", "method", "status"])
        for (route, method, status), series in sorted(self._series.items()):
            cumulative, buckets = 0.0, []
            for bound, count in zip((*BUCKETS, float("inf")), series[2:], strict=True):
                cumulative += count
                buckets.append((repr(bound) if bound != float("inf") else "+Inf", cumulative))
            histogram.add_metric([route, method, str(status)], buckets, series[1])
        yield histogram


class ApiCollector(Collector):
    """Reads the app's objects when scraped (whichever cache the app holds then)."""

    def __init__(self, requests: RequestStats, app: web.Application) -> None:
        self._requests = requests
        self._app = app

    def collect(self) -> Iterator[Metric]:
        yield from self._requests.families()
        cache = self._app[CACHE]
        # Every read of a batch through the cache counts: a GET, a batch long-poll's read, a
        # batch stream's read of the version it sends. Not the reads that go to Redis on
        # purpose: a stream's backstop read, a pipeline stream's, a list's and the latest
        # batch's reads (its long-polls too).
        yield CounterMetricFamily("dhub_cache_hits",
                                  "Batch reads through the cache (GETs by id and their "
                                  "long-polls, batch streams) it answered",
                                  value=cache.hits)
        yield CounterMetricFamily("dhub_cache_misses",
                                  "Batch reads through the cache (GETs by id and their "
                                  "long-polls, batch streams) it could not answer (off, or "
                                  "not held): read from Redis",
                                  value=cache.misses)
        yield CounterMetricFamily("dhub_cache_outages",
                                  "Times the cache turned off (its change feed lost or silent)",
                                  value=cache.outages)
        yield GaugeMetricFamily("dhub_cache_entries", "Batches held by the cache",
                                value=len(cache))
        yield GaugeMetricFamily("dhub_cache_live", "1 while the cache serves (its feed is live)",
                                value=1 if cache.live else 0)
        waiting = GaugeMetricFamily("dhub_open_streams",
                                    "Open push streams and held long-poll GETs, by kind",
                                    labels=["kind"])
        for kind, count in self._app[WAITERS].counts().items():
            waiting.add_metric([kind], count)
        yield waiting


def registry_for(requests: RequestStats, app: web.Application) -> CollectorRegistry:
    """A registry of the app's own (not the process-global one: tests run several apps)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ApiCollector(requests, app))
    return registry


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS_REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
