"""Limiter backends under test, each on a fake clock so window and period edges are exact."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from quotagate.keys.models import KeyRecord, Period
from quotagate.limits.interfaces import Limiter
from quotagate.limits.memory import MemoryLimiter

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
    has_state: Callable[[str], bool]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["memory"])
async def backend(request: pytest.FixtureRequest, clock: Clock) -> AsyncIterator[Backend]:
    if request.param == "memory":
        memory = MemoryLimiter(now=clock)
        yield Backend("memory", memory, clock, memory.tracks)
        await memory.close()


_serial = itertools.count()


def make_key(*, rpm: int | None = None, tpm: int | None = None, token_limit: int | None = None,
             period: Period | None = None, key_id: str | None = None) -> KeyRecord:
    """A key record with the given limits (``token_limit`` alone defaults to a daily budget)."""
    if token_limit is not None and period is None:
        period = "day"
    return KeyRecord(id=key_id or f"key_t{next(_serial)}{uuid.uuid4().hex[:12]}", project_id="proj_test",
                     secret_hash="0" * 64, rpm=rpm, tpm=tpm, token_limit=token_limit, token_limit_period=period,
                     models=None, expires_at=None, revoked=False, version=1)
