"""`GET /metrics` of the consumers process: Prometheus text, every name starting `dhub_`.

The parts count in plain ints and dicts on their hot paths (the events loop adds to a few
ints per poll); the collector reads those only when scraped. Consumer lag per partition
(the partition's end offset minus the group's committed offset: the records not handled
yet, fetched or not) is read through each part's Kafka consumer right before the scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from consumers.plumbing.part import Part
from core.settings import Settings

log = logging.getLogger(__name__)
# Prefect calls: tens of milliseconds when healthy, up to prefect_timeout_s when hung.
BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0)
LAG_READ_S: Final = 2.0


class Latencies:
    """Durations by name: count, sum and per-bucket counts, turned into a histogram when
    scraped (no prometheus-client object, lock or label lookup per observation)."""

    def __init__(self) -> None:
        self.series: dict[str, list[float]] = {}

    def observe(self, name: str, seconds: float) -> None:
        series = self.series.get(name)
        if series is None:
            # [count, sum, bucket 0 .. bucket n-1, +Inf]
            series = self.series[name] = [0.0] * (len(BUCKETS) + 3)
        series[0] += 1
        series[1] += seconds
        series[2 + bisect_left(BUCKETS, seconds)] += 1


def _counter(name: str, doc: str, labels: list[str],
             rows: list[tuple[list[str], float]]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for values, value in rows:
        family.add_metric(values, value)
    return family


async def _handled_to(consumer: Any, tp: Any) -> int:
    """Where the group's work on `tp` stands: its committed offset; nothing committed yet,
    the partition's first record (where the group starts: auto_offset_reset=earliest)."""
    committed = await consumer.committed(tp)
    if committed is None:
        committed = (await consumer.beginning_offsets([tp]))[tp]
    return int(committed)


class ConsumersCollector(Collector):
    """Reads the parts' own counters when scraped. Each figure comes from the part that
    keeps it (`getattr`: a part without it has nothing to say on it)."""

    def __init__(self, parts: list[Part]) -> None:
        self.parts = parts
        self.lag: dict[tuple[str, str, int], int] = {}

    async def refresh(self) -> None:
        """Reads the lag of every partition assigned to a part's Kafka consumer: its end
        offset, asked of the broker (the client's high watermark comes only with fetches,
        and a partition paused behind a stuck lane is not fetched, so it would read 0 for
        as long as the lane is stuck), minus the group's committed offset (records fetched
        and held by a lane, not handled yet, are lag too). Bounded by LAG_READ_S a part."""
        lag: dict[tuple[str, str, int], int] = {}
        for part in self.parts:
            consumer: Any = getattr(part, "_consumer", None)
            if consumer is None or not (assignment := sorted(consumer.assignment())):
                continue
            try:
                async with asyncio.timeout(LAG_READ_S):
                    ends = await consumer.end_offsets(assignment)
                    done = await asyncio.gather(*(_handled_to(consumer, tp) for tp in assignment),
                                                return_exceptions=True)
            except Exception as exc:  # a scrape must not fail for it; the figure is skipped
                log.debug("lag of %s not read: %r", part.name, exc)
                continue
            for tp, handled in zip(assignment, done, strict=True):
                if isinstance(handled, int) and tp in ends:
                    lag[(part.name, tp.topic, tp.partition)] = max(ends[tp] - handled, 0)
        self.lag = lag

    def collect(self) -> Iterator[Metric]:
        parts = {p.name: p for p in self.parts}
        events = parts.get("events")
        if events is not None:
            for what, doc in (("applied", "Events applied to Redis (duplicates included)"),
                              ("changed", "Changes the applied events made to batches"),
                              ("scanned", "Events read by the C scanner of offsets records "
                                          "(core.offsets_scan) rather than decoded one by "
                                          "one"),
                              ("dropped", "Batches whose events were dropped (deleted or "
                                          "unknown batch)"),
                              ("rekeyed", "Events keyed other than by their batch id, sent "
                                          "again keyed by it")):
                yield CounterMetricFamily(f"dhub_events_{what}", doc,
                                          value=getattr(events, what))
        dead: list[tuple[list[str], float]] = [
            ([p.name, kind], n) for p in self.parts
            for kind, n in sorted(getattr(getattr(p, "dlq", None), "sent", {}).items())]
        yield _counter("dhub_dead_letters_sent",
                       "Records the broker acknowledged on the dead-letter topic, by reason kind",
                       ["part", "kind"], dead)
        yield _counter("dhub_snapshots_too_large",
                       "Batch snapshots not written: over one Kafka record even compressed",
                       ["part"], [([p.name], n) for p in self.parts if (n := getattr(
                                   getattr(p, "snapshots", None), "too_large", None)) is not None])
        commands = parts.get("commands")
        handled: dict[tuple[str, str], int] = getattr(commands, "handled", {})
        retried: dict[str, int] = getattr(commands, "retried", {})
        yield _counter("dhub_commands_handled",
                       "Commands handled to their effect or to the dead letters",
                       ["type", "outcome"], [(list(k), n) for k, n in sorted(handled.items())])
        yield _counter("dhub_commands_retried",
                       "Retries of commands (a dependency unavailable or a passing error)",
                       ["type"], [([k], n) for k, n in sorted(retried.items())])
        lag = GaugeMetricFamily("dhub_consumer_lag",
                                "Records not handled (committed) yet, per part and partition",
                                labels=["part", "topic", "partition"])
        for (name, topic, partition), value in sorted(self.lag.items()):
            lag.add_metric([name, topic, str(partition)], value)
        yield lag
        histogram = HistogramMetricFamily("dhub_prefect_call_duration_seconds",
                                          "Prefect API calls of the consumers, by part and call",
                                          labels=["part", "call"])
        for part in self.parts:
            latencies = getattr(getattr(part, "prefect", None), "latencies", None)
            if latencies is None:
                continue
            for call, series in sorted(latencies.series.items()):
                cumulative, buckets = 0.0, []
                for bound, count in zip((*BUCKETS, float("inf")), series[2:], strict=True):
                    cumulative += count
                    buckets.append((repr(bound) if bound != float("inf") else "+Inf",
                                    cumulative))
                histogram.add_metric([part.name, call], buckets, series[1])
        yield histogram


def registry_for(collector: ConsumersCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def app_for(parts: list[Part]) -> web.Application:
    collector = ConsumersCollector(parts)
    registry = registry_for(collector)

    async def metrics(request: web.Request) -> web.Response:
        await collector.refresh()
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


async def serve(scope: contextlib.AsyncExitStack, settings: Settings, parts: list[Part]) -> None:
    """Serves `/metrics` until `scope` closes. A port taken (another consumers process on
    this host) leaves the process without metrics, logged, rather than down: the metrics
    are not worth stopping the work for. Port 0: off."""
    if settings.consumers_metrics_port == 0:
        return
    runner = web.AppRunner(app_for(parts), access_log=None)
    await runner.setup()
    scope.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, settings.consumers_metrics_host, settings.consumers_metrics_port)
    try:
        await site.start()
    except OSError as exc:
        log.warning("metrics not served on %s:%d: %s", settings.consumers_metrics_host,
                  settings.consumers_metrics_port, exc)
        return
    log.info("metrics on http://%s:%d/metrics", settings.consumers_metrics_host,
             settings.consumers_metrics_port)
