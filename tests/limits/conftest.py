"""Limiter backends under test, each on a fake clock so window and period edges are exact."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from redis.asyncio import Redis

from quotagate.keys.events import KeyEvents
from quotagate.keys.models import KeyRecord, Limits, Period
from quotagate.limits.interfaces import Limiter
from quotagate.limits.memory import MemoryLimiter
from quotagate.limits.redis import RedisLimiter
from quotagate.workers.hub import Hub
from quotagate.workers.link import ParentLink, SharedLimiter
from tests.fakes.redis_server import RedisServer

# Redis for the shared backend: CI has one; set QUOTAGATE_TEST_REDIS_URL="" to skip it explicitly.
REDIS_URL = os.environ.get("QUOTAGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BACKENDS = ["memory", "workers",
            pytest.param("redis", marks=pytest.mark.skipif(not REDIS_URL, reason="QUOTAGATE_TEST_REDIS_URL=''"))]

# A Wednesday, at noon UTC.
T0 = datetime(2026, 3, 4, 12, 0, 0, tzinfo=UTC).timestamp()


class Clock:
    """A settable clock: Unix seconds."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def set(self, when: datetime | float) -> None:
        self.t = when.timestamp() if isinstance(when, datetime) else when


@dataclass
class Backend:
    name: str
    limiter: Limiter
    clock: Clock
    has_state: Callable[[str], Awaitable[bool]]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own (one it may restart, stop or kill)."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, clock: Clock) -> AsyncIterator[Backend]:
    if request.param == "memory":
        memory = MemoryLimiter(now=clock)

        async def tracked(key_id: str) -> bool:
            return memory.tracks(key_id)

        yield Backend("memory", memory, clock, tracked)
        await memory.close()
    elif request.param == "workers":
        # A worker's limiter (``serve --workers N``): the parent's MemoryLimiter over a real socketpair.
        served = MemoryLimiter(now=clock)
        hub = Hub(served, KeyEvents())
        parent_end, worker_end = socket.socketpair()
        await hub.attach(parent_end, 0, "worker 0")
        link = ParentLink()
        await asyncio.get_running_loop().create_unix_connection(lambda: link, sock=worker_end)
        remote = SharedLimiter(link)

        async def held(key_id: str) -> bool:
            await remote.state(make_key())  # a round trip: the parent has read every earlier settlement
            return served.tracks(key_id)

        yield Backend("workers", remote, clock, held)
        await remote.close()
        worker_end.close()
    else:
        async with redis_prefix() as prefix:
            shared = RedisLimiter.from_url(REDIS_URL, prefix=prefix, now=clock)

            async def stored(key_id: str) -> bool:
                await shared.flush()
                return bool([k async for k in shared.client.scan_iter(match=shared.key_prefix(key_id) + "*")])

            yield Backend("redis", shared, clock, stored)
            await shared.close()


@contextlib.asynccontextmanager
async def redis_prefix() -> AsyncIterator[str]:
    """A key prefix of one's own in the shared Redis, and every key under it deleted afterwards."""
    prefix = f"qgtest{uuid.uuid4().hex[:10]}"
    try:
        yield prefix
    finally:
        client = Redis.from_url(REDIS_URL, socket_timeout=10, socket_connect_timeout=5)
        try:
            keys = [k async for k in client.scan_iter(match=prefix + ":*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


_serial = itertools.count()


def make_key(*, rpm: int | None = None, tpm: int | None = None, token_limit: int | None = None,
             period: Period | None = None, key_id: str | None = None, project_id: str = "proj_test",
             project: Limits | None = None, models: dict[str, Limits] | None = None) -> KeyRecord:
    """A key record with the given limits (``token_limit`` alone defaults to a daily budget), its project's
    limits (``project``) and its per-model limits (``models``)."""
    if token_limit is not None and period is None:
        period = "day"
    return KeyRecord(id=key_id or f"key_t{next(_serial)}{uuid.uuid4().hex[:12]}", project_id=project_id,
                     secret_hash="0" * 64, rpm=rpm, tpm=tpm, token_limit=token_limit, token_limit_period=period,
                     models=None, expires_at=None, revoked=False, version=1, project_limits=project,
                     model_limits=models)


def new_project_id() -> str:
    return f"proj_t{next(_serial)}{uuid.uuid4().hex[:12]}"
