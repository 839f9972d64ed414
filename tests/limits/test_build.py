"""The factory picks the backend from the settings."""

from __future__ import annotations

import pytest

from quotagate.limits import build_limiter
from quotagate.limits.memory import MemoryLimiter
from quotagate.limits.redis import RedisLimiter
from quotagate.settings import Settings, SettingsError

pytestmark = pytest.mark.anyio


async def test_memory_without_redis() -> None:
    limiter = build_limiter(Settings.load(env={}))
    assert isinstance(limiter, MemoryLimiter)
    await limiter.close()


async def test_redis_with_its_url_and_failure_policy() -> None:
    settings = Settings.load(env={"QUOTAGATE_REDIS_URL": "redis://127.0.0.1:1/0",
                                  "QUOTAGATE_REDIS_FAILURE_POLICY": "open-rates"})
    limiter = build_limiter(settings)
    assert isinstance(limiter, RedisLimiter) and limiter._policy == "open-rates"
    await limiter.close()  # nothing queued: closes without touching Redis


def test_unknown_failure_policy_is_refused_by_name() -> None:
    with pytest.raises(SettingsError, match="QUOTAGATE_REDIS_FAILURE_POLICY"):
        Settings.load(env={"QUOTAGATE_REDIS_FAILURE_POLICY": "sometimes"})
