"""Reading usage back: series and totals from the buckets, the activity log from the events.

Every event is in a minute, an hour and a day bucket; minute buckets are kept 48 h and hour buckets 60
days (``Retention``). A series at granularity ``g`` reads level ``g`` where it is still complete and the
next coarser level before that, so totals are always exact, a month at hour granularity reads about 720
rows per model, and a minute series reaching back past 48 h shows one point per hour for that stretch
(all the detail kept). A bucket belongs to the range its start falls in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, Engine, and_, func, or_, select

from quotagate.ids import isoformat
from quotagate.metering.store import LEVELS, NO_MODEL, Retention
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


class Sums(NamedTuple):
    requests: float
    prompt_tokens: float
    completion_tokens: float
    errors: float
    rate_limited: float
    latency_ms_sum: float


def _point(row: Sums) -> dict[str, Any]:
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


def tagged(project_id: str, metadata: dict[str, str]) -> Any:
    """The ids of the project's keys whose metadata has every one of these entries (their metadata as it is
    now, not as it was when they were used): a subquery, so the store filters without a list of ids."""
    k = inference_keys.c
    entries = [k["metadata"][name].as_string() == value for name, value in sorted(metadata.items())]
    return select(k.id).where(k.project_id == project_id, *entries)


def _iso(ts: int) -> str:
    value = isoformat(datetime.fromtimestamp(ts, UTC))
    assert value is not None
    return value


class UsageQueries:
    def __init__(self, engine: Engine, retention: Retention | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._retention = retention or Retention()
        self._clock = clock

    def _pieces(self, window: Window) -> list[tuple[int, int, int]]:
        """(level width, from, to) stretches of the window, each read from one level."""
        now = self._clock()
        pieces, upper = [], window.end
        for width in LEVELS[LEVELS.index(window.width):]:
            horizon = self._retention.horizon(width, now)
            lower = window.start if horizon is None else max(window.start, horizon)
            if lower < upper:
                pieces.append((width, lower, upper))
            upper = min(upper, lower)
            if upper <= window.start:
                break
        return pieces

    def _rows(self, where: ColumnElement[bool], window: Window, group: list[Any]) -> list[Any]:
        b = usage_buckets.c
        rows: list[Any] = []
        with self._engine.connect() as conn:
            for width, lower, upper in self._pieces(window):
                point = (b.bucket_start - b.bucket_start % window.width).label("point")
                query = (select(point, *group, *_sums())
                         .where(where, b.width == width, b.bucket_start >= lower, b.bucket_start < upper)
                         .group_by(point, *group))
                rows.extend(conn.execute(query).all())
        return rows

    def _series(self, where: ColumnElement[bool], window: Window) -> tuple[dict[str, int], list[dict[str, Any]]]:
        merged: dict[tuple[int, str], list[float]] = {}
        for r in self._rows(where, window, [usage_buckets.c.model]):
            acc = merged.setdefault((int(r.point), r.model), [0, 0, 0, 0, 0, 0.0])
            for i, v in enumerate((r.requests, r.prompt_tokens, r.completion_tokens, r.errors, r.rate_limited,
                                   r.latency_ms_sum)):
                acc[i] += v
        totals, data = _empty(), []
        for (start, model), v in sorted(merged.items()):
            point = {"start": _iso(start), "model": model if model != NO_MODEL else None, **_point(Sums(*v))}
            _add(totals, point)
            data.append(point)
        return totals, data

    def key_usage(self, key_id: str, window: Window) -> tuple[dict[str, int], list[dict[str, Any]]]:
        """(totals, data points per start and model) of one key."""
        return self._series(usage_buckets.c.key_id == key_id, window)

    def project_usage(self, project_id: str, window: Window,
                      metadata: dict[str, str] | None = None) -> dict[str, Any]:
        """Totals, the series and per-key and per-model breakdowns of a project; with ``metadata``, of
        those of its keys whose metadata has all of its entries."""
        where = usage_buckets.c.project_id == project_id
        if metadata:
            where = and_(where, usage_buckets.c.key_id.in_(tagged(project_id, metadata)))
        totals, data = self._series(where, window)
        per_key: dict[str, list[float]] = {}
        for r in self._rows(where, window, [usage_buckets.c.key_id]):
            acc = per_key.setdefault(r.key_id, [0, 0, 0, 0, 0, 0.0])
            for i, v in enumerate((r.requests, r.prompt_tokens, r.completion_tokens, r.errors, r.rate_limited,
                                   r.latency_ms_sum)):
                acc[i] += v
        with self._engine.connect() as conn:
            names = {r.id: r for r in conn.execute(
                select(inference_keys.c.id, inference_keys.c.name, inference_keys.c.prefix,
                       inference_keys.c["metadata"])
                .where(inference_keys.c.project_id == project_id)).all()}
        keys = []
        for key_id, v in per_key.items():
            meta = names.get(key_id)
            keys.append({"key_id": key_id, "name": meta.name if meta else None,
                         "prefix": meta.prefix if meta else None,
                         "metadata": meta.metadata if meta else None, **_point(Sums(*v))})
        keys.sort(key=lambda k: (-k["total_tokens"], k["key_id"]))
        models: dict[str | None, dict[str, int]] = {}
        for point in data:
            _add(models.setdefault(point["model"], _empty()), point)
        by_model = [{"model": m, **t} for m, t in sorted(models.items(),
                                                          key=lambda mt: (-mt[1]["total_tokens"], mt[0] or ""))]
        return {"totals": totals, "data": data, "keys": keys, "models": by_model}

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


    def project_activity(self, project_id: str, *, start: datetime, end: datetime, limit: int,
                         before: str | None = None, metadata: dict[str, str] | None = None
                         ) -> tuple[list[dict[str, Any]], bool]:
        """Every key's requests in [start, end), newest first: (up to ``limit`` rows, whether there are more).
        ``before`` is a request id of this project to page past; ``metadata`` as for ``project_usage``."""
        e = usage_events.c
        query = select(usage_events).where(e.project_id == project_id, e.created_at >= start, e.created_at < end)
        if metadata:
            query = query.where(e.key_id.in_(tagged(project_id, metadata)))
        with self._engine.connect() as conn:
            if before is not None:
                anchor = conn.execute(select(e.created_at, e.request_id)
                                      .where(e.project_id == project_id, e.request_id == before)).first()
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
