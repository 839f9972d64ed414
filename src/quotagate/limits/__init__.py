"""Admission control: rpm, tpm and hard budgets per inference key, over a memory or Redis backend.

``build_limiter(settings)`` picks the backend: Redis when ``redis_url`` is set (shared by every
instance), else the process's memory. ``build_broadcaster`` relays key changes between instances
when Redis is configured (see ``limits/broadcast.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quotagate.keys.events import KeyEvents
from quotagate.keys.models import KeyRecord
from quotagate.limits.errors import LimiterUnavailable
from quotagate.limits.interfaces import Admission, Budget, Limiter, LimitState, Refusal
from quotagate.limits.memory import MemoryLimiter
from quotagate.settings import Settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from quotagate.limits.broadcast import KeyBroadcaster

__all__ = ["Admission", "Budget", "LimitState", "Limiter", "LimiterUnavailable", "MemoryLimiter", "Refusal",
           "build_broadcaster", "build_limiter", "register_metrics"]


def build_limiter(settings: Settings) -> Limiter:
    """The limiter the settings ask for: Redis if ``redis_url`` is set, else memory."""
    if settings.redis_url:
        from quotagate.limits.redis import RedisLimiter

        return RedisLimiter.from_url(settings.redis_url, failure_policy=settings.redis_failure_policy)
    return MemoryLimiter()


def build_broadcaster(limiter: Limiter, events: KeyEvents, resolve: Callable[[str], KeyRecord | None]
                      ) -> KeyBroadcaster | None:
    """The cross-instance relay of key changes, if ``limiter`` is the Redis one (else None: one process)."""
    from quotagate.limits.redis import RedisLimiter

    if not isinstance(limiter, RedisLimiter):
        return None
    from quotagate.limits.broadcast import KeyBroadcaster

    return KeyBroadcaster(limiter.client, events, resolve, limiter, channel=f"{limiter.prefix}:key-changes")


def register_metrics(limiter: Limiter, registry: object) -> None:
    """Add the limiter's figures to a Prometheus registry (if one is given)."""
    from prometheus_client import CollectorRegistry

    from quotagate.limits.metrics import LimiterCollector

    if isinstance(registry, CollectorRegistry):
        registry.register(LimiterCollector(limiter))
