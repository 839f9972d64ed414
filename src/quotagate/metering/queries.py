"""Reading usage back: series and totals from the buckets, the activity log from the events.

A series at granularity ``width`` groups every bucket by ``bucket_start - bucket_start % width``, whatever
its own width: minute buckets add up into hours and days, and rolled-up buckets (hours, days) land in the
point their start falls in. So totals are always exact; a minute series over data older than the minute
retention shows one point per hour (or day) for it, as that is all the detail kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, func, or_, select

from quotagate.ids import isoformat
from quotagate.metering.store import NO_MODEL
from quotagate.store.tables import inference_keys, usage_buckets, usage_events

TOTALS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "errors", "rate_limited")


@dataclass(frozen=True, slots=True)
class Window:
    """A validated query range: [start, end) in Unix seconds, aligned to ``width``."""

    start: int
    end: int
    width: int
    granularity: str


def _empty() -> dict[str, int]:
    return dict.fromkeys(TOTALS, 0)


def _point(row: Any) -> dict[str, Any]:
    prompt, completion = int(row.prompt_tokens), int(row.completion_tokens)
    requests = int(row.requests)
    return {
        "requests": requests, "prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion, "errors": int(row.errors), "rate_limited": int(row.rate_limited),
        "avg_latency_ms": round(float(row.latency_ms_sum) / requests, 3) if requests else None,
    }


def _add(totals: dict[str, int], point: dict[str, Any]) -> None:
    for name in TOTALS:
        totals[name] += point[name]


def _sums() -> list[Any]:
    b = usage_buckets.c
    return [func.sum(b.requests).label("requests"), func.sum(b.prompt_tokens).label("prompt_tokens"),
            func.sum(b.completion_tokens).label("completion_tokens"), func.sum(b.errors).label("errors"),
            func.sum(b.rate_limited).label("rate_limited"), func.sum(b.latency_ms_sum).label("latency_ms_sum")]


def _iso(ts: int) -> str:
    value = isoformat(datetime.fromtimestamp(ts, UTC))
    assert value is not None
    return value


class UsageQueries:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def _series(self, where: ColumnElement[bool], window: Window) -> tuple[dict[str, int], list[dict[str, Any]]]:
        b = usage_buckets.c
        point_start = (b.bucket_start - b.bucket_start % window.width).label("point")
        query = (select(point_start, b.model, *_sums())
                 .where(where, b.bucket_start >= window.start, b.bucket_start < window.end)
                 .group_by(point_start, b.model).order_by(point_start, b.model))
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        totals, data = _empty(), []
        for r in rows:
            point = {"start": _iso(int(r.point)), "model": r.model if r.model != NO_MODEL else None, **_point(r)}
            _add(totals, point)
            data.append(point)
        return totals, data

    def key_usage(self, key_id: str, window: Window) -> tuple[dict[str, int], list[dict[str, Any]]]:
        """(totals, data points per start and model) of one key."""
        return self._series(usage_buckets.c.key_id == key_id, window)

    def project_usage(self, project_id: str, window: Window) -> dict[str, Any]:
        """Totals, the series and a per-key breakdown of a project."""
        b = usage_buckets.c
        where = usage_buckets.c.project_id == project_id
        totals, data = self._series(where, window)
        by_key = (select(b.key_id, inference_keys.c.name, inference_keys.c.prefix, *_sums())
                  .join(inference_keys, inference_keys.c.id == b.key_id, isouter=True)
                  .where(where, b.bucket_start >= window.start, b.bucket_start < window.end)
                  .group_by(b.key_id, inference_keys.c.name, inference_keys.c.prefix)
                  .order_by(func.sum(b.prompt_tokens + b.completion_tokens).desc(), b.key_id))
        with self._engine.connect() as conn:
            rows = conn.execute(by_key).all()
        keys = [{"key_id": r.key_id, "name": r.name, "prefix": r.prefix, **_point(r)} for r in rows]
        return {"totals": totals, "data": data, "keys": keys}

    def activity(self, key_id: str, *, limit: int, before: str | None = None,
                 request_id: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        """The key's requests, newest first: (up to ``limit`` rows, whether there are more).

        ``before`` is a request id of this key to page past (rows strictly older than it)."""
        e = usage_events.c
        query = select(usage_events).where(e.key_id == key_id)
        if request_id is not None:
            query = query.where(e.request_id == request_id)
        with self._engine.connect() as conn:
            if before is not None:
                anchor = conn.execute(select(e.created_at, e.request_id)
                                      .where(e.key_id == key_id, e.request_id == before)).first()
                if anchor is None:
                    return [], False
                query = query.where(or_(e.created_at < anchor.created_at,
                                        and_(e.created_at == anchor.created_at, e.request_id < anchor.request_id)))
            rows = conn.execute(query.order_by(e.created_at.desc(), e.request_id.desc()).limit(limit + 1)).all()
        return [activity_row(r) for r in rows[:limit]], len(rows) > limit


def activity_row(r: Any) -> dict[str, Any]:
    return {
        "object": "inference_request", "request_id": r.request_id, "created_at": isoformat(r.created_at),
        "key_id": r.key_id, "model": r.model, "endpoint": r.endpoint, "status_code": r.status_code,
        "error_code": r.error_code, "stream": bool(r.stream), "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens, "total_tokens": r.prompt_tokens + r.completion_tokens,
        "latency_ms": r.latency_ms, "ttft_ms": r.ttft_ms, "client_ip": r.client_ip, "user_agent": r.user_agent,
    }


def merge_totals(parts: Sequence[dict[str, int]]) -> dict[str, int]:
    totals = _empty()
    for p in parts:
        _add(totals, p)
    return totals
