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
from typing import Any, cast

from sqlalchemy import Connection, Engine, and_, func, select

from quotagate.keys.models import PERIODS, Period
from quotagate.limits.memory import MemoryLimiter
from quotagate.limits.periods import period_bounds
from quotagate.metering.store import DAY, HOUR, MINUTE
from quotagate.store.tables import inference_keys, projects, usage_buckets, usage_events

log = logging.getLogger(__name__)

# The bucket level that tiles each kind of period exactly (its start is a bucket start) and is kept at
# least as long as the period lasts (Retention: minute buckets 48 h, hour buckets 60 days, days for good).
_LEVEL = {"minute": MINUTE, "hour": HOUR, "day": DAY, "week": DAY, "month": DAY}
WINDOW = 60


@dataclass(frozen=True, slots=True)
class BudgetUse:
    key_id: str         # the limiter's scope: a key's id, a project's id, or "<key id> <model>"
    period: str
    start: int          # the period's bounds, Unix seconds
    end: int
    used: int           # tokens charged in it so far


@dataclass(frozen=True, slots=True)
class RecentRequest:
    key_id: str         # the limiter's scope, as in BudgetUse
    at: float           # Unix seconds
    tokens: int


def _model_limits(conn: Connection) -> dict[str, dict[str, dict[str, Any]]]:
    """Every key's per-model limits (keys that have some), by key id."""
    rows = conn.execute(select(inference_keys.c.id, inference_keys.c.model_limits)
                        .where(inference_keys.c.model_limits.is_not(None))).all()
    return {key_id: limits for key_id, limits in rows if limits}


def budgets_in_use(engine: Engine, now: float) -> list[BudgetUse]:
    """Tokens used in the current period by every key, project and key's model that has a budget (and used
    some of it)."""
    found: list[BudgetUse] = []
    used = func.sum(usage_buckets.c.prompt_tokens + usage_buckets.c.completion_tokens)
    with engine.connect() as conn:
        per_model = _model_limits(conn)
        for period in PERIODS:
            start, end = period_bounds(period, now)
            in_period = and_(usage_buckets.c.width == _LEVEL[period], usage_buckets.c.bucket_start >= start)
            rows = conn.execute(
                select(usage_buckets.c.key_id, used)
                .join(inference_keys, inference_keys.c.id == usage_buckets.c.key_id)
                .where(and_(inference_keys.c.token_limit.is_not(None),
                            inference_keys.c.token_limit_period == period, in_period))
                .group_by(usage_buckets.c.key_id))
            found += [BudgetUse(key_id, period, start, end, int(total)) for key_id, total in rows if total]
            rows = conn.execute(
                select(usage_buckets.c.project_id, used)
                .join(projects, projects.c.id == usage_buckets.c.project_id)
                .where(and_(projects.c.token_limit.is_not(None), projects.c.token_limit_period == period,
                            in_period))
                .group_by(usage_buckets.c.project_id))
            found += [BudgetUse(project_id, period, start, end, int(total)) for project_id, total in rows if total]
            wanted = [(key_id, model) for key_id, limits in per_model.items() for model, lim in limits.items()
                      if lim.get("token_limit") is not None and lim.get("token_limit_period") == period]
            for key_id, model in wanted:
                total = conn.execute(select(used).where(and_(usage_buckets.c.key_id == key_id,
                                                             usage_buckets.c.model == model, in_period))).scalar()
                if total:
                    found.append(BudgetUse(f"{key_id} {model}", period, start, end, int(total)))
    return found


def recent_requests(engine: Engine, now: float) -> list[RecentRequest]:
    """Answered requests (status 200) of the last minute, oldest first, for every key, project and key's
    model with an rpm or tpm.

    Refused and failed requests are left out: which of them were admitted (and so counted against rpm)
    the activity log does not say, so the windows rebuilt from it may hold fewer requests than they did."""
    since = datetime.fromtimestamp(now - WINDOW, UTC)
    found: list[RecentRequest] = []
    with engine.connect() as conn:
        per_model = {key_id: {m for m, lim in limits.items()
                              if lim.get("rpm") is not None or lim.get("tpm") is not None}
                     for key_id, limits in _model_limits(conn).items()}
        keyed = inference_keys.c.rpm.is_not(None) | inference_keys.c.tpm.is_not(None)
        projected = projects.c.rpm.is_not(None) | projects.c.tpm.is_not(None)
        rows = conn.execute(
            select(usage_events.c.key_id, usage_events.c.created_at,
                   usage_events.c.prompt_tokens + usage_events.c.completion_tokens,
                   usage_events.c.model, usage_events.c.project_id, keyed, projected)
            .join(inference_keys, inference_keys.c.id == usage_events.c.key_id)
            .join(projects, projects.c.id == inference_keys.c.project_id)
            .where(and_(usage_events.c.created_at > since, usage_events.c.status_code == 200,
                        keyed | projected | inference_keys.c.model_limits.is_not(None)))
            .order_by(usage_events.c.created_at))
        for key_id, created, tokens, model, project_id, by_key, by_project in rows:
            at = created.timestamp()
            if by_key:
                found.append(RecentRequest(key_id, at, int(tokens)))
            if by_project:
                found.append(RecentRequest(project_id, at, int(tokens)))
            if model in per_model.get(key_id, ()):
                found.append(RecentRequest(f"{key_id} {model}", at, int(tokens)))
    return found


async def restore_limits(limiter: MemoryLimiter, engine: Engine) -> None:
    """Give an in-memory limiter what keys used before this process started: their budgets' use in the
    current periods, and the last minute's answered requests (docs/limits.md, "Restarts")."""
    now = time.time()
    budgets = await asyncio.to_thread(budgets_in_use, engine, now)
    recent = await asyncio.to_thread(recent_requests, engine, now)
    limiter.restore([(b.key_id, cast(Period, b.period), b.start, b.end, b.used) for b in budgets],
                    [(r.key_id, r.at, r.tokens) for r in recent])
    log.info("limits: took up %d budgets (of keys, projects, keys' models) and %d window entries of the last "
             "minute from the store",
             len(budgets), len(recent))
