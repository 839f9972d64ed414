"""Budget periods against the standard library's calendar."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest

from quotagate.keys.models import PERIODS, Period
from quotagate.limits.periods import period_bounds


def expected(period: Period, t: float) -> tuple[int, int]:
    d = datetime.fromtimestamp(math.floor(t), UTC)
    if period == "minute":
        start = d.replace(second=0)
        return int(start.timestamp()), int((start + timedelta(minutes=1)).timestamp())
    if period == "hour":
        start = d.replace(minute=0, second=0)
        return int(start.timestamp()), int((start + timedelta(hours=1)).timestamp())
    day = d.replace(hour=0, minute=0, second=0)
    if period == "day":
        return int(day.timestamp()), int((day + timedelta(days=1)).timestamp())
    if period == "week":
        start = day - timedelta(days=d.weekday())
        return int(start.timestamp()), int((start + timedelta(days=7)).timestamp())
    start = day.replace(day=1)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return int(start.timestamp()), int(end.timestamp())


@pytest.mark.parametrize("period", PERIODS)
def test_period_bounds_match_the_calendar(period: Period) -> None:
    rng = random.Random(period)
    moments = [rng.uniform(0, 4_102_444_800) for _ in range(20_000)]  # 1970 .. 2100
    moments += [datetime(y, m, 1, tzinfo=UTC).timestamp() + dt
                for y in (1999, 2000, 2024, 2026, 2027, 2028, 2100) for m in range(1, 13) for dt in (-1, 0, 0.5)]
    for t in moments:
        assert period_bounds(period, t) == expected(period, t), t
