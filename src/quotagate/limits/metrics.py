"""The limiter's Prometheus figures, read at scrape time from whichever backend runs."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from quotagate.limits.interfaces import Limiter
from quotagate.limits.memory import MemoryLimiter
from quotagate.limits.redis import RedisLimiter


class LimiterCollector(Collector):
    """``quotagate_limiter_*``: Redis outages met by admissions, settlements waiting, keys tracked."""

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        lim = self.limiter
        if isinstance(lim, RedisLimiter):
            yield CounterMetricFamily("quotagate_limiter_redis_unavailable",
                                      "Admissions that found Redis unreachable (handled by the failure policy)",
                                      value=lim.unavailable_total)
            yield GaugeMetricFamily("quotagate_limiter_pending_settlements",
                                    "Settlements queued in this process and not yet written to Redis",
                                    value=lim.pending_settlements())
        elif isinstance(lim, MemoryLimiter):
            yield GaugeMetricFamily("quotagate_limiter_tracked_keys", "Keys with limit state in this process",
                                    value=lim.tracked_keys())
