"""Admission control: rpm, tpm and hard budgets per inference key, over a memory or Redis backend.

``build_limiter(settings)`` picks the backend: Redis when ``redis_url`` is set (shared by every
instance), else the process's memory.
"""

from __future__ import annotations

from quotagate.limits.errors import LimiterUnavailable
from quotagate.limits.interfaces import Admission, Budget, Limiter, LimitState, Refusal
from quotagate.limits.memory import MemoryLimiter
from quotagate.settings import Settings

__all__ = ["Admission", "Budget", "LimitState", "Limiter", "LimiterUnavailable", "MemoryLimiter", "Refusal",
           "build_limiter"]


def build_limiter(settings: Settings) -> Limiter:
    """The limiter the settings ask for: Redis if ``redis_url`` is set, else memory."""
    if settings.redis_url:
        from quotagate.limits.redis import RedisLimiter

        return RedisLimiter.from_url(settings.redis_url, failure_policy=settings.redis_failure_policy)
    return MemoryLimiter()
