"""The console API's usage and activity routes (CONTRACT §5), and the Prometheus endpoint."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from anyio import from_thread
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import Engine, select
from starlette.requests import Request
from starlette.responses import Response

from quotagate.accounts.models import Project
from quotagate.accounts.service import AccountService
from quotagate.console.api import BEFORE, LIMIT, STARTING_AFTER, check_params, page_limit
from quotagate.console.http import Call, Handler, Result
from quotagate.errors import InvalidRequest
from quotagate.ids import isoformat
from quotagate.keys.models import InferenceKey, KeyRecord, Limits, Period
from quotagate.keys.schemas import metadata_filter
from quotagate.keys.service import KeyService
from quotagate.limits.errors import LimiterUnavailable
from quotagate.limits.interfaces import Limiter, LimitState
from quotagate.metering.export import ACTIVITY_COLUMNS, USAGE_COLUMNS, csv_response
from quotagate.metering.metrics import merged_exposition
from quotagate.metering.queries import UsageQueries, Window
from quotagate.metering.store import WIDTHS
from quotagate.openapi import answers as a
from quotagate.openapi.spec import Param, operation
from quotagate.store.tables import inference_keys, projects

log = logging.getLogger(__name__)

MAX_POINTS = 1500          # per model: a minute series can span 25 h, an hour series 62 days
DEFAULT_RANGE = timedelta(hours=24)
CSV_ROWS = 100_000  # activity rows one CSV export may hold (page with before= past them)

# The query parameters of each endpoint: ``check_params`` refuses any other, the OpenAPI document lists these.
TIME = {"type": "string", "format": "date-time"}
START = Param("start", TIME, "ISO 8601; without an offset it is UTC. Default: 24 hours before `end`")
END = Param("end", TIME, "ISO 8601; without an offset it is UTC. Default: now")
GRANULARITY = Param("granularity", {"type": "string", "enum": ["minute", "hour", "day"]},
                    f"The width of a data point (default: hour, or day past {MAX_POINTS} hours); at most "
                    f"{MAX_POINTS} points a model")
FORMAT = Param("format", {"type": "string", "enum": ["json", "csv"], "default": "json"},
               "csv: a CSV file (text/csv) instead of JSON")
REQUEST_ID = Param("request_id", {"type": "string"}, "Only the request with this id")
CSV_LIMIT = Param("limit", {"type": "integer", "minimum": 1, "maximum": CSV_ROWS},
                  f"How many to return (default and most: 100 and 1,000; with format=csv {CSV_ROWS:,} for both)")
KEY_USAGE_PARAMS = (START, END, GRANULARITY)
USAGE_PARAMS = (START, END, GRANULARITY, FORMAT)
METADATA = Param("metadata", {"type": "array", "maxItems": 16, "items": {
                     "type": "string", "maxLength": 64 + 1 + 256,
                     "pattern": "^[A-Za-z0-9_.:/-]{1,64}=[\\s\\S]{0,256}$"}},
                 "KEY=VALUE, repeatable: only the keys whose metadata has every entry given")
PROJECT_USAGE_PARAMS = (*USAGE_PARAMS, METADATA)
ACTIVITY_PARAMS = (LIMIT, BEFORE, STARTING_AFTER, REQUEST_ID)
PROJECT_ACTIVITY_PARAMS = (START, END, CSV_LIMIT, BEFORE, STARTING_AFTER, FORMAT, METADATA)
USAGE = "Usage and activity"
CSV = {"text/csv": {"schema": {"type": "string"}}}



# Times of a range are kept within these: no usage lies outside them, and at the ends of what datetime holds
# (years 1 and 9999) a range's default start (a day before its end) or its last point would not exist.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9998, 12, 31, tzinfo=UTC)


def parse_time(name: str, raw: str) -> datetime:
    """An ISO 8601 timestamp (a missing offset means UTC), within [EARLIEST, LATEST]."""
    try:
        value = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise InvalidRequest(f"{name}: not an ISO 8601 timestamp: {raw!r} (e.g. 2026-01-31T12:00:00Z)",
                             field=name) from None
    try:
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is before the first instant datetime holds in UTC
        return EARLIEST if value.year == 1 else LATEST
    return min(max(value, EARLIEST), LATEST)


def wants_csv(call: Call) -> bool:
    fmt = call.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise InvalidRequest(f"format: must be json or csv, not {fmt[:20]!r}", field="format")
    return fmt == "csv"


def parse_window(call: Call, now: datetime, params: tuple[Param, ...]) -> Window:
    """start, end and granularity from the query, validated and aligned to the granularity."""
    check_params(call, params)
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


def _window(limit: int | None, used: int | None) -> dict[str, Any] | None:
    if limit is None:
        return None
    return {"limit": limit, "used": used, "remaining": max(0, limit - used) if used is not None else None,
            "window_seconds": 60}


def _figures(limits: Limits, state: LimitState | None) -> dict[str, Any]:
    """One set of limits (a key's, a project's, a key's on one model) and, if known, its live state."""
    if state is None:
        budget = None if limits.token_limit is None else {
            "limit": limits.token_limit, "period": limits.token_limit_period, "used": None, "reserved": None,
            "remaining": None, "resets_at": None}
        return {"rpm": _window(limits.rpm, None), "tpm": _window(limits.tpm, None), "budget": budget}
    b = state.budget
    return {
        "rpm": _window(state.rpm, state.requests_in_window),
        "tpm": _window(state.tpm, state.tokens_in_window),
        "budget": None if b is None else {
            "limit": b.limit, "period": b.period, "used": b.used, "reserved": b.reserved, "remaining": b.remaining,
            "resets_at": isoformat(datetime.fromtimestamp(b.resets_at, UTC))},
    }


def limits_json(key: InferenceKey, state: LimitState | None, project: Limits | None = None) -> dict[str, Any]:
    """The key's limits and, when the limiter is available, their live state; with its project's limits
    (``project``: shared by all of its keys) and its per-model limits where it has them."""
    own = Limits(key.rpm, key.tpm, key.token_limit, key.token_limit_period)
    out: dict[str, Any] = {"live": state is not None, **_figures(own, state)}
    if project:
        out["project"] = _figures(project, state.project if state is not None else None)
    if key.model_limits:
        live = state.models if state is not None and state.models is not None else {}
        out["models"] = {model: _figures(lim, live.get(model) if state is not None else None)
                         for model, lim in key.model_limits.items()}
    return out


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

    def _project_limits_of(self, project_id: str) -> Limits | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(projects.c.rpm, projects.c.tpm, projects.c.token_limit,
                                      projects.c.token_limit_period).where(projects.c.id == project_id)).one()
        limits = Limits(row.rpm, row.tpm, row.token_limit, row.token_limit_period)
        return limits if limits else None

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

    def project_limits(self, project: Project) -> dict[str, Any] | None:
        """The project's limits (shared by all of its keys) and, when the limiter is available, their live
        state; None if it has none."""
        limits = Limits(project.rpm, project.tpm, project.token_limit, cast(Period | None, project.token_limit_period))
        if not limits:
            return None
        limiter = self._limiter()
        state: LimitState | None = None
        if limiter is not None:
            # A record of no key of the project's: the limiter reads the project's scope of it.
            probe = KeyRecord(id="", project_id=project.id, secret_hash="", rpm=None, tpm=None, token_limit=None,
                              token_limit_period=None, models=None, expires_at=None, revoked=False, version=0,
                              project_limits=limits)
            try:
                state = from_thread.run(limiter.state, probe).project
            except LimiterUnavailable:
                state = None
        return {"live": state is not None, **_figures(limits, state)}

    @operation("A key's usage", USAGE, answer=a.KeyUsage, role="viewer", params=KEY_USAGE_PARAMS,
               description="Totals and a series per model over a range (default: the last 24 hours), and the "
                           "key's limits with their live state.")
    def key_usage(self, call: Call) -> Result:
        key = self._keys.get(call.actor, call.path["keyId"])  # 404 unless the caller may read it
        window = parse_window(call, datetime.now(UTC), KEY_USAGE_PARAMS)
        self.catch_up()
        totals, data = self.queries.key_usage(key.id, window)
        return 200, {
            "object": "usage", "key_id": key.id, "project_id": key.project_id,
            "start": isoformat(datetime.fromtimestamp(window.start, UTC)),
            "end": isoformat(datetime.fromtimestamp(window.end, UTC)), "granularity": window.granularity,
            "totals": totals, "data": data,
            "limits": limits_json(key, self.live_state(key), self._project_limits_of(key.project_id)),
        }

    @operation("A project's usage", USAGE, answer=a.ProjectUsage, role="viewer", params=PROJECT_USAGE_PARAMS,
               extra_media=CSV, description="Summed over the project's keys: totals, a series per model, "
                                            "per key and per model; format=csv gives the series as CSV.")
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
            "metadata": tags or None, **found, "limits": self.project_limits(project),
        }

    @operation("A key's recent requests", USAGE, answer=a.Activity, role="viewer", params=ACTIVITY_PARAMS,
               description="Newest first, in pages.")
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

    @operation("A project's requests", USAGE, answer=a.Activity, role="viewer", params=PROJECT_ACTIVITY_PARAMS,
               extra_media=CSV, description="Every key's requests in a range (default: the last 24 hours), "
                                            "newest first; JSON pages or CSV.")
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
