"""The usage pages' common parts: the range a page shows (the last hour, day or 30 days, or whole UTC days
chosen by the user), its buckets, and the charts and table of a series, for a key's page and a project's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from quotagate.web import charts

# A preset range's buckets: the newest (still filling) and the ones before it, so "Last day" is 24 bars of
# an hour.
RANGES = {"hour": (60, "minute"), "day": (24, "hour"), "month": (30, "day")}
STEP = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1)}
# Chosen days: at most a year (a bar a day); up to two days are drawn by the hour.
MAX_DAYS = 366
HOURLY_UP_TO_DAYS = 2


def buckets(end: datetime, count: int, granularity: str) -> list[datetime]:
    """The starts of the ``count`` buckets up to the one ``end`` falls in."""
    step = STEP[granularity]
    epoch = datetime(1970, 1, 1, tzinfo=end.tzinfo)
    last = epoch + ((end - epoch) // step) * step
    return [last - step * (count - 1 - i) for i in range(count)]


def fill_series(points: list[dict[str, Any]], times: list[datetime]) -> list[dict[str, Any]]:
    """One point per bucket of ``times``, with zeros where there was no traffic, so bars line up with time."""
    by_start = {}
    for p in points:
        when = p["start"]
        if isinstance(when, str):
            when = datetime.fromisoformat(when.replace("Z", "+00:00"))
        by_start[when] = p
    empty = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return [by_start.get(when, empty) for when in times]


@dataclass(frozen=True)
class Span:
    """The range a usage page shows: its name (``hour``, ``day``, ``month`` or ``custom``), its bucket
    starts, and [start, end) for the queries and exports."""

    name: str
    times: list[datetime]
    granularity: str
    start: datetime
    end: datetime
    first_day: str = ""          # the chosen days as typed back into the form (custom ranges)
    last_day: str = ""
    errors: dict[str, str] = field(default_factory=dict)

    def query(self) -> dict[str, str]:
        """The page's own query parameters for this range (for links to the exports and filters)."""
        if self.name == "custom":
            return {"range": "custom", "from": self.first_day, "to": self.last_day}
        return {"range": self.name}


def _day(raw: str, name: str, errors: dict[str, str]) -> date | None:
    try:
        return date.fromisoformat(raw.strip())
    except ValueError:
        errors[name] = f"{raw.strip()[:40]!r} is not a date (YYYY-MM-DD)" if raw.strip() else "Give a day"
        return None


def parse_span(params: Mapping[str, str], now: datetime) -> Span:
    """The range of a page's query: ``range=hour|day|month`` (default ``day``), or ``range=custom`` with
    ``from`` and ``to`` (UTC days, both included). A custom range with mistakes comes back with
    ``errors`` (by field) and the last day in its place, so the page still shows something."""
    name = params.get("range", "day")
    if name == "custom":
        errors: dict[str, str] = {}
        first = _day(params.get("from", ""), "from", errors)
        last = _day(params.get("to", ""), "to", errors)
        if first and last and last < first:
            errors["to"] = "Must not be before the first day"
        elif first and last and (last - first).days + 1 > MAX_DAYS:
            errors["to"] = f"At most {MAX_DAYS} days at a time"
        if not errors and first and last:
            start = datetime(first.year, first.month, first.day, tzinfo=UTC)
            end = datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1)
            days = (end - start).days
            granularity = "hour" if days <= HOURLY_UP_TO_DAYS else "day"
            step = STEP[granularity]
            times = [start + step * i for i in range(int((end - start) / step))]
            return Span("custom", times, granularity, start, end, first.isoformat(), last.isoformat())
        fallback = parse_span({"range": "day"}, now)
        return Span("custom", fallback.times, fallback.granularity, fallback.start, fallback.end,
                    params.get("from", "")[:40], params.get("to", "")[:40], errors)
    if name not in RANGES:
        name = "day"
    count, granularity = RANGES[name]
    times = buckets(now, count, granularity)
    return Span(name, times, granularity, times[0], now)


def series_charts(span: Span, series: list[dict[str, Any]]) -> tuple[dict[str, str],
                                                                     list[tuple[str, dict[str, Any]]]]:
    """The requests chart, the tokens chart (prompt and completion stacked apart) and the table of the
    buckets with traffic, for a series summed over models."""
    times, granularity = span.times, span.granularity
    points = fill_series(series, times)
    drawn = {
        "requests": charts.bar_chart(
            times, [charts.Series("requests", "s-requests", [p["requests"] for p in points])],
            title="Requests per " + granularity, unit="requests", granularity=granularity),
        "tokens": charts.bar_chart(
            times, [charts.Series("prompt", "s-prompt", [p["prompt_tokens"] for p in points]),
                    charts.Series("completion", "s-completion", [p["completion_tokens"] for p in points])],
            title="Tokens per " + granularity + ", prompt and completion", unit="tokens", granularity=granularity),
    }
    table = [(charts.bucket_time(when, granularity), p) for when, p in zip(times, points, strict=True)
             if p["requests"] or p["total_tokens"]]
    return drawn, table


def summed_over_models(data: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The usage API's points (one per bucket and model) as one point per bucket."""
    series: dict[str, dict[str, Any]] = {}
    for p in data:
        s = series.setdefault(p["start"], {"start": p["start"], "requests": 0, "prompt_tokens": 0,
                                           "completion_tokens": 0, "total_tokens": 0})
        for name in ("requests", "prompt_tokens", "completion_tokens", "total_tokens"):
            s[name] += p[name]
    return list(series.values())


def link(path: str, params: Mapping[str, str], metadata: Mapping[str, str]) -> str:
    """``path`` with a range's parameters and a metadata filter (``metadata=KEY=VALUE``, repeated, as the
    usage API takes it) in its query."""
    pairs = list(params.items()) + [("metadata", f"{k}={v}") for k, v in metadata.items()]
    return f"{path}?{urlencode(pairs)}"
