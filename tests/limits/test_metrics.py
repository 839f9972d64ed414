"""The limiter's figures appear in the runtime's Prometheus registry."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import generate_latest

from quotagate.app import Runtime
from quotagate.settings import Settings
from tests.limits.conftest import REDIS_URL, make_key

pytestmark = pytest.mark.anyio


async def test_memory_limiter_figures(tmp_path: Path) -> None:
    runtime = Runtime.build(Settings(data_dir=tmp_path))
    try:
        assert runtime.limiter is not None
        await runtime.limiter.admit(make_key(rpm=5), 1, 1)
        text = generate_latest(runtime.extras["metrics_registry"]).decode()
        assert "quotagate_limiter_tracked_keys 1.0" in text
    finally:
        await runtime.stop()
        runtime.close()


@pytest.mark.skipif(not REDIS_URL, reason="QUOTAGATE_TEST_REDIS_URL=''")
async def test_redis_limiter_figures(tmp_path: Path) -> None:
    runtime = Runtime.build(Settings(data_dir=tmp_path, redis_url=REDIS_URL))
    try:
        text = generate_latest(runtime.extras["metrics_registry"]).decode()
        assert "quotagate_limiter_redis_unavailable_total 0.0" in text
        assert "quotagate_limiter_pending_settlements 0.0" in text
    finally:
        await runtime.stop()
        runtime.close()
