"""The console API's usage and activity routes (CONTRACT §5), and the Prometheus endpoint."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

from anyio import from_thread
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import Engine, select
from starlette.requests import Request
from starlette.responses import Response

from quotagate.accounts.service import AccountService
from quotagate.console.api import check_params, page_limit
from quotagate.console.http import Call, Handler, Result
from quotagate.errors import InvalidRequest
from quotagate.ids import isoformat
from quotagate.keys.models import InferenceKey
from quotagate.keys.schemas import metadata_filter
from quotagate.keys.service import KeyService
from quotagate.limits.interfaces import Limiter, LimitState
from quotagate.metering.export import ACTIVITY_COLUMNS, USAGE_COLUMNS, csv_response
from quotagate.metering.metrics import merged_exposition
from quotagate.metering.queries import UsageQueries, Window
from quotagate.metering.store import WIDTHS
from quotagate.store.tables import inference_keys

log = logging.getLogger(__name__)

MAX_POINTS = 1500          # per model: a minute series can span 25 h, an hour series 62 days
DEFAULT_RANGE = timedelta(hours=24)
USAGE_PARAMS = frozenset({"start", "end", "granularity", "format"})
PROJECT_USAGE_PARAMS = USAGE_PARAMS | {"metadata"}
ACTIVITY_PARAMS = frozenset({"limit", "before", "starting_after", "request_id"})
PROJECT_ACTIVITY_PARAMS = frozenset({"start", "end", "limit", "before", "starting_after", "format", "metadata"})
CSV_ROWS = 100_000  # activity rows one CSV export may hold (page with before= past them)



def parse_time(name: str, raw: str) -> datetime:
    """An ISO 8601 timestamp (a missing offset means UTC)."""
    try:
        value = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise InvalidRequest(f"{name}: not an ISO 8601 timestamp: {raw!r} (e.g. 2026-01-31T12:00:00Z)",
                             field=name) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def wants_csv(call: Call) -> bool:
    fmt = call.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise InvalidRequest(f"format: must be json or csv, not {fmt[:20]!r}", field="format")
    return fmt == "csv"


def parse_window(call: Call, now: datetime, allowed: frozenset[str] = USAGE_PARAMS) -> Window:
    """start, end and granularity from the query, validated and aligned to the granularity."""
    check_params(call, allowed)
    raw_end, raw_start = call.query.get("end"), call.query.get("start")
    end = parse_time("end", raw_end) if raw_end is not None else now
    start = parse_time("start", raw_start) if raw_start is not None else end - DEFAULT_RANGE
    if start >= end:
        raise InvalidRequest("end: must be later than start", field="end")
    span = (end - start).total_seconds()
    granularity = call.query.get("granularity")
    if granularity is None:
        granularity = "hour" if span / WIDTHS["hour"] <= MAX_POINTS else "day"
    if granularity not in WIDTHS:
        raise InvalidRequest(f"granularity: must be one of minute, hour, day, not {granularity!r}",
                             field="granularity")
    width = WIDTHS[granularity]
    first = math.floor(start.timestamp() / width) * width
    last = math.ceil(end.timestamp() / width) * width
    if (last - first) // width > MAX_POINTS:
        raise InvalidRequest(f"granularity: {granularity} over this range gives {(last - first) // width} points; "
                             f"at most {MAX_POINTS} are served: choose a coarser granularity or a shorter range",
                             field="granularity")
    return Window(start=first, end=last, width=width, granularity=granularity)


def limits_json(key: InferenceKey, state: LimitState | None) -> dict[str, Any]:
    """The key's limits and, when the limiter is available, their live state."""

    def window(limit: int | None, used: int | None) -> dict[str, Any] | None:
        if limit is None:
            return None
        return {"limit": limit, "used": used, "remaining": max(0, limit - used) if used is not None else None,
                "window_seconds": 60}

    if state is None:
        budget = None if key.token_limit is None else {
            "limit": key.token_limit, "period": key.token_limit_period, "used": None, "reserved": None,
            "remaining": None, "resets_at": None}
        return {"live": False, "rpm": window(key.rpm, None), "tpm": window(key.tpm, None), "budget": budget}
    b = state.budget
    return {
        "live": True,
        "rpm": window(state.rpm, state.requests_in_window),
        "tpm": window(state.tpm, state.tokens_in_window),
        "budget": None if b is None else {
            "limit": b.limit, "period": b.period, "used": b.used, "reserved": b.reserved, "remaining": b.remaining,
            "resets_at": isoformat(datetime.fromtimestamp(b.resets_at, UTC))},
    }


class UsageAPI:
    """Handlers for the console API (synchronous: they run in the console's thread pool)."""

    def __init__(self, engine: Engine, accounts: AccountService, keys: KeyService,
                 limiter: Callable[[], Limiter | None],
                 flush: Callable[[], Coroutine[Any, Any, bool]] | None = None) -> None:
        self._engine = engine
        self._accounts = accounts
        self._keys = keys
        self._limiter = limiter
        self._flush = flush
        self.queries = UsageQueries(engine)

    def catch_up(self) -> None:
        """Let this process's unshipped records reach the store first, so a client reads its own usage."""
        if self._flush is not None:
            try:
                if not from_thread.run(self._flush):
                    log.warning("usage API: the local journal is not fully shipped; figures may lag")
            except Exception:
                log.exception("usage API: could not flush the local journal")

    def live_state(self, key: InferenceKey) -> LimitState | None:
        limiter = self._limiter()
        if limiter is None:
            return None
        with self._engine.connect() as conn:
            secret_hash = conn.execute(select(inference_keys.c.secret_hash)
                                       .where(inference_keys.c.id == key.id)).scalar_one()
        record = self._keys.resolve(secret_hash)
        if record is None:  # pragma: no cover - the key was read just before
            return None
        return from_thread.run(limiter.state, record)

    def key_usage(self, call: Call) -> Result:
        key = self._keys.get(call.actor, call.path["keyId"])  # 404 unless the caller may read it
        window = parse_window(call, datetime.now(UTC))
        self.catch_up()
        totals, data = self.queries.key_usage(key.id, window)
        return 200, {
            "object": "usage", "key_id": key.id, "project_id": key.project_id,
            "start": isoformat(datetime.fromtimestamp(window.start, UTC)),
            "end": isoformat(datetime.fromtimestamp(window.end, UTC)), "granularity": window.granularity,
            "totals": totals, "data": data, "limits": limits_json(key, self.live_state(key)),
        }

    def project_usage(self, call: Call) -> Result:
        project = self._accounts.get_project(call.actor, call.path["projectId"])  # 404 unless theirs
        window = parse_window(call, datetime.now(UTC), PROJECT_USAGE_PARAMS)
        csv = wants_csv(call)
        tags = metadata_filter(call.query.getlist("metadata"))
        self.catch_up()
        found = self.queries.project_usage(project.id, window, tags)
        if csv:
            return 200, csv_response(found["data"], USAGE_COLUMNS, f"usage-{project.id}.csv")
        return 200, {
            "object": "usage", "project_id": project.id,
            "start": isoformat(datetime.fromtimestamp(window.start, UTC)),
            "end": isoformat(datetime.fromtimestamp(window.end, UTC)), "granularity": window.granularity,
            "metadata": tags or None, **found,
        }

    def activity(self, call: Call) -> Result:
        key = self._keys.get(call.actor, call.path["keyId"])
        check_params(call, ACTIVITY_PARAMS)
        limit = page_limit(call, default=100, maximum=1000)
        before = call.query.get("before") or call.query.get("starting_after")
        self.catch_up()
        rows, more = self.queries.activity(key.id, limit=limit, before=before,
                                           request_id=call.query.get("request_id"))
        return 200, {"object": "list", "data": rows, "has_more": more,
                     "next_cursor": rows[-1]["request_id"] if more and rows else None}

    def project_activity(self, call: Call) -> Result:
        """Every key's requests in a range (default: the last 24 h), newest first; JSON pages or CSV."""
        project = self._accounts.get_project(call.actor, call.path["projectId"])
        check_params(call, PROJECT_ACTIVITY_PARAMS)
        csv = wants_csv(call)
        limit = page_limit(call, default=CSV_ROWS if csv else 100, maximum=CSV_ROWS if csv else 1000)
        now = datetime.now(UTC)
        raw_end, raw_start = call.query.get("end"), call.query.get("start")
        end = parse_time("end", raw_end) if raw_end is not None else now
        start = parse_time("start", raw_start) if raw_start is not None else end - DEFAULT_RANGE
        if start >= end:
            raise InvalidRequest("end: must be later than start", field="end")
        before = call.query.get("before") or call.query.get("starting_after")
        tags = metadata_filter(call.query.getlist("metadata"))
        self.catch_up()
        rows, more = self.queries.project_activity(project.id, start=start, end=end, limit=limit, before=before,
                                                   metadata=tags)
        if csv:
            return 200, csv_response(rows, ACTIVITY_COLUMNS, f"activity-{project.id}.csv")
        return 200, {"object": "list", "data": rows, "has_more": more,
                     "next_cursor": rows[-1]["request_id"] if more and rows else None}

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", "/v1/inference/keys/{keyId}/usage", self.key_usage),
            ("GET", "/v1/inference/keys/{keyId}/activity", self.activity),
            ("GET", "/v1/projects/{projectId}/usage", self.project_usage),
            ("GET", "/v1/projects/{projectId}/activity", self.project_activity),
        ]


WorkerScrape = Callable[[], Awaitable[dict[int, str]]]


def metrics_endpoint(registry: CollectorRegistry, workers: Callable[[], WorkerScrape | None] = lambda: None
                     ) -> Callable[[Request], Awaitable[Response]]:
    """``GET /metrics`` in Prometheus's text format; with ``serve --workers N``, ``workers()`` gives the
    scrape of the LLM API's worker processes, whose samples are added with a ``worker`` label."""

    async def metrics(_request: Request) -> Response:
        scrape = workers()
        if scrape is None:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
        return Response(merged_exposition(registry, await scrape()), media_type=CONTENT_TYPE_LATEST)

    return metrics
