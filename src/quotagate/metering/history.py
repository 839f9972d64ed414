"""What keys used before this process started, read from the store: for a limiter that keeps its state
in memory, so that a restart (or a ``kill -9``) does not hand every key a fresh budget.

Read once at start, after the shipper has moved the journals of processes now gone into the store
(``JournalMeter.start`` waits for that pass), so the store holds every completed request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from sqlalchemy import Engine, and_, func, select

from quotagate.keys.models import PERIODS, Period
from quotagate.limits.memory import MemoryLimiter
from quotagate.limits.periods import period_bounds
from quotagate.metering.store import DAY, HOUR, MINUTE
from quotagate.store.tables import inference_keys, usage_buckets, usage_events

log = logging.getLogger(__name__)

# The bucket level that tiles each kind of period exactly (its start is a bucket start) and is kept at
# least as long as the period lasts (Retention: minute buckets 48 h, hour buckets 60 days, days for good).
_LEVEL = {"minute": MINUTE, "hour": HOUR, "day": DAY, "week": DAY, "month": DAY}
WINDOW = 60


@dataclass(frozen=True, slots=True)
class BudgetUse:
    key_id: str
    period: str
    start: int          # the period's bounds, Unix seconds
    end: int
    used: int           # tokens charged in it so far


@dataclass(frozen=True, slots=True)
class RecentRequest:
    key_id: str
    at: float           # Unix seconds
    tokens: int


def budgets_in_use(engine: Engine, now: float) -> list[BudgetUse]:
    """Tokens used in the current period by every key that has a budget (and used some of it)."""
    found: list[BudgetUse] = []
    with engine.connect() as conn:
        for period in PERIODS:
            start, end = period_bounds(period, now)
            used = func.sum(usage_buckets.c.prompt_tokens + usage_buckets.c.completion_tokens)
            rows = conn.execute(
                select(usage_buckets.c.key_id, used)
                .join(inference_keys, inference_keys.c.id == usage_buckets.c.key_id)
                .where(and_(inference_keys.c.token_limit.is_not(None),
                            inference_keys.c.token_limit_period == period,
                            usage_buckets.c.width == _LEVEL[period],
                            usage_buckets.c.bucket_start >= start))
                .group_by(usage_buckets.c.key_id))
            found += [BudgetUse(key_id, period, start, end, int(total)) for key_id, total in rows if total]
    return found


def recent_requests(engine: Engine, now: float) -> list[RecentRequest]:
    """Answered requests (status 200) of keys with an rpm or tpm in the last minute, oldest first.

    Refused and failed requests are left out: which of them were admitted (and so counted against rpm)
    the activity log does not say, so the windows rebuilt from it may hold fewer requests than they did."""
    since = datetime.fromtimestamp(now - WINDOW, UTC)
    with engine.connect() as conn:
        rows = conn.execute(
            select(usage_events.c.key_id, usage_events.c.created_at,
                   usage_events.c.prompt_tokens + usage_events.c.completion_tokens)
            .join(inference_keys, inference_keys.c.id == usage_events.c.key_id)
            .where(and_(usage_events.c.created_at > since, usage_events.c.status_code == 200,
                        (inference_keys.c.rpm.is_not(None)) | (inference_keys.c.tpm.is_not(None))))
            .order_by(usage_events.c.created_at))
        return [RecentRequest(key_id, created.timestamp(), int(tokens)) for key_id, created, tokens in rows]


async def restore_limits(limiter: MemoryLimiter, engine: Engine) -> None:
    """Give an in-memory limiter what keys used before this process started: their budgets' use in the
    current periods, and the last minute's answered requests (docs/limits.md, "Restarts")."""
    now = time.time()
    budgets = await asyncio.to_thread(budgets_in_use, engine, now)
    recent = await asyncio.to_thread(recent_requests, engine, now)
    limiter.restore([(b.key_id, cast(Period, b.period), b.start, b.end, b.used) for b in budgets],
                    [(r.key_id, r.at, r.tokens) for r in recent])
    log.info("limits: took up the budgets of %d keys and %d requests of the last minute from the store",
             len(budgets), len(recent))
