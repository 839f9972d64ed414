"""The usage pages' ranges: presets, chosen UTC days and their mistakes, and the links that keep them."""

from __future__ import annotations

from datetime import UTC, datetime

from quotagate.metering.export import ACTIVITY_COLUMNS, csv_lines
from quotagate.web import usage

NOW = datetime(2026, 12, 7, 23, 35, 10, tzinfo=UTC)


def test_presets_end_now_in_buckets_of_their_size() -> None:
    hour = usage.parse_span({"range": "hour"}, NOW)
    assert len(hour.times) == 60 and hour.times[-1] == datetime(2026, 12, 7, 23, 35, tzinfo=UTC)
    assert (hour.start, hour.end, hour.granularity) == (hour.times[0], NOW, "minute")
    month = usage.parse_span({"range": "month"}, NOW)
    assert len(month.times) == 30 and month.granularity == "day"
    assert usage.parse_span({"range": "year"}, NOW).name == "day"  # unknown: the default
    assert usage.parse_span({}, NOW).query() == {"range": "day"}


def test_chosen_days_are_whole_utc_days() -> None:
    span = usage.parse_span({"range": "custom", "from": "2026-11-01", "to": "2026-11-30"}, NOW)
    assert not span.errors and span.granularity == "day" and len(span.times) == 30
    assert span.start == datetime(2026, 11, 1, tzinfo=UTC) and span.end == datetime(2026, 12, 1, tzinfo=UTC)
    assert span.query() == {"range": "custom", "from": "2026-11-01", "to": "2026-11-30"}
    two = usage.parse_span({"range": "custom", "from": "2026-11-01", "to": "2026-11-02"}, NOW)
    assert two.granularity == "hour" and len(two.times) == 48
    year = usage.parse_span({"range": "custom", "from": "2025-01-01", "to": "2025-12-31"}, NOW)
    assert not year.errors and len(year.times) == 365


def test_chosen_days_mistakes_name_their_field() -> None:
    cases = [({"from": "2026-11-02", "to": "2026-11-01"}, {"to": "Must not be before the first day"}),
             ({"from": "yesterday", "to": "2026-11-01"}, {"from": "'yesterday' is not a date (YYYY-MM-DD)"}),
             ({"from": "", "to": ""}, {"from": "Give a day", "to": "Give a day"}),
             ({"from": "2024-01-01", "to": "2025-12-31"}, {"to": "At most 366 days at a time"})]
    for given, errors in cases:
        span = usage.parse_span({"range": "custom", **given}, NOW)
        assert span.errors == errors, given
        assert span.name == "custom" and len(span.times) == 24  # the last day is shown meanwhile
        assert span.first_day == given["from"]


def test_links_keep_the_range_and_the_filter() -> None:
    span = usage.parse_span({"range": "custom", "from": "2026-11-01", "to": "2026-11-30"}, NOW)
    assert usage.link("/projects/p/usage.csv", span.query(), {"team": "search", "a:b/c": "x=y&z"}) == (
        "/projects/p/usage.csv?range=custom&from=2026-11-01&to=2026-11-30&metadata=team%3Dsearch"
        "&metadata=a%3Ab%2Fc%3Dx%3Dy%26z")


def test_csv_lines_stream_what_csv_response_writes() -> None:
    pages = [[{"request_id": "r1", "user_agent": "=cmd()", "stream": True}], [], [{"request_id": "r2"}]]
    text = "".join(csv_lines(iter(pages), ACTIVITY_COLUMNS))
    lines = text.split("\r\n")
    assert lines[0] == ",".join(ACTIVITY_COLUMNS)
    assert lines[1].startswith("r1,") and "'=cmd()" in lines[1] and ",true," in lines[1]
    assert lines[2].startswith("r2,") and lines[3] == ""
