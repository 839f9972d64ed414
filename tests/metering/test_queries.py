"""Usage queries over buckets of every level, before and after rollups, and the activity log."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, func, select

from quotagate.metering.queries import UsageQueries, Window
from quotagate.metering.store import DAY, HOUR, MINUTE, Retention, maintain, store_batch
from quotagate.store.tables import usage_buckets, usage_events
from tests.metering.conftest import Key, add_key, event

NOW = 1_790_000_000 - 1_790_000_000 % DAY + 13 * HOUR + 17 * MINUTE + 5  # a fixed "now", 13:17:05 UTC


def window(granularity: str, start: int, end: int) -> Window:
    width = {"minute": MINUTE, "hour": HOUR, "day": DAY}[granularity]
    return Window(start - start % width, end + (-end % width), width, granularity)


def spread(key: Key, hours: int, per_hour: int = 6) -> list:  # type: ignore[type-arg]
    """Events every 10 minutes over the last ``hours`` hours, on two models, with varied figures."""
    out = []
    for i in range(hours * per_hour):
        ts = NOW - i * (HOUR // per_hour) - 1
        out.append(event(key, created_at=ts, model="qwen3.6-27b" if i % 3 else "bge-m3",
                         prompt_tokens=i % 11, completion_tokens=i % 5,
                         status_code=429 if i % 17 == 0 else 200))
    return out


def all_levels(engine: Engine, key: Key) -> dict[str, dict[str, int]]:
    q = UsageQueries(engine, clock=lambda: NOW)
    start, end = NOW - 90 * DAY, NOW + 1
    return {g: q.key_usage(key.id, window(g, start, end))[0] for g in ("minute", "hour", "day")
            if g != "minute" or end - start <= 1500 * MINUTE} | {
        "minute (last day)": q.key_usage(key.id, window("minute", NOW - DAY, end))[0]}


def expected_totals(events: list) -> dict[str, int]:  # type: ignore[type-arg]
    out = {"requests": len(events), "prompt_tokens": sum(e.prompt_tokens for e in events),
           "completion_tokens": sum(e.completion_tokens for e in events)}
    out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    out["rate_limited"] = sum(e.status_code == 429 for e in events)
    out["errors"] = sum(e.status_code >= 400 and e.status_code != 429 for e in events)
    return out


def test_totals_agree_across_granularities_and_upkeep(engine: Engine, key: Key) -> None:
    events = spread(key, hours=24 * 70)  # 70 days: minute, hour and day levels after upkeep
    store_batch(engine, events)
    before = all_levels(engine, key)
    assert before["hour"] == before["day"] == expected_totals(events)
    day_ago = NOW - DAY - (NOW - DAY) % MINUTE  # the window starts at a whole minute
    assert before["minute (last day)"] == expected_totals([e for e in events if e.created_at >= day_ago])

    done = maintain(engine, datetime.fromtimestamp(NOW, UTC), Retention())
    assert done["width_60_purged"] > 0 and done["width_3600_purged"] > 0
    assert all_levels(engine, key) == before
    with engine.connect() as conn:
        oldest = dict(conn.execute(select(usage_buckets.c.width, func.min(usage_buckets.c.bucket_start))
                                   .group_by(usage_buckets.c.width)).all())
    assert oldest[MINUTE] >= NOW - 48 * HOUR - HOUR
    assert oldest[HOUR] >= NOW - 60 * DAY - DAY
    # Later rounds (the clock moving on) keep every total exact.
    for later in (NOW + 10, NOW + HOUR + 7, NOW + DAY):
        maintain(engine, datetime.fromtimestamp(later, UTC), Retention())
        q = UsageQueries(engine, clock=lambda t=later: t)  # type: ignore[misc]
        for g in ("hour", "day"):
            assert q.key_usage(key.id, window(g, NOW - 90 * DAY, NOW + 1))[0] == before["day"]
        # A minute series over 25 h: recent points per minute, older ones per hour, same totals.
        start = later - 25 * HOUR
        got = q.key_usage(key.id, window("minute", start, NOW + 1))[0]
        assert got == expected_totals([e for e in events if e.created_at >= start - start % MINUTE])


def test_series_points_and_models(engine: Engine, key: Key) -> None:
    base = NOW - NOW % HOUR - 3 * HOUR  # three whole hours ago
    store_batch(engine, [
        event(key, created_at=base + 5, prompt_tokens=1, completion_tokens=1),
        event(key, created_at=base + 50, prompt_tokens=2, completion_tokens=2),
        event(key, created_at=base + 61, prompt_tokens=4, completion_tokens=4, model="bge-m3"),
        event(key, created_at=base + HOUR + 1, prompt_tokens=8, completion_tokens=0),
        event(key, created_at=base + HOUR + 2, status_code=404, error_code="model_not_found", model="nope",
              prompt_tokens=0, completion_tokens=0),
    ])
    q = UsageQueries(engine, clock=lambda: NOW)
    _totals, minutes = q.key_usage(key.id, window("minute", base, base + 2 * HOUR))
    assert [(p["start"][11:16], p["model"], p["requests"], p["total_tokens"]) for p in minutes] == [
        (f"{(base // HOUR) % 24:02d}:00", "qwen3.6-27b", 2, 6),
        (f"{(base // HOUR) % 24:02d}:01", "bge-m3", 1, 8),
        (f"{(base // HOUR + 1) % 24:02d}:00", "nope", 1, 0),
        (f"{(base // HOUR + 1) % 24:02d}:00", "qwen3.6-27b", 1, 8),
    ]
    totals, hours = q.key_usage(key.id, window("hour", base, base + 2 * HOUR))
    assert [(p["model"], p["requests"]) for p in hours] == [("bge-m3", 1), ("qwen3.6-27b", 2),
                                                           ("nope", 1), ("qwen3.6-27b", 1)]
    assert totals == {"requests": 5, "prompt_tokens": 15, "completion_tokens": 7, "total_tokens": 22,
                      "errors": 1, "rate_limited": 0}
    # The range is half-open: an hour starting at the end is left out.
    assert q.key_usage(key.id, window("hour", base, base + HOUR))[0]["requests"] == 3


def test_project_usage_breaks_down_by_key(engine: Engine, key: Key) -> None:
    other = add_key(engine, key.project_id)
    stranger = add_key(engine)
    now = time.time()
    store_batch(engine, [event(key, created_at=now - 5), event(key, created_at=now - 4),
                         event(other, created_at=now - 3, completion_tokens=100),
                         event(stranger, created_at=now - 2)])
    found = UsageQueries(engine).project_usage(key.project_id, window("hour", int(now) - DAY, int(now)))
    assert found["totals"]["requests"] == 3
    assert [(k["key_id"], k["requests"]) for k in found["keys"]] == [(other.id, 1), (key.id, 2)]


def test_activity_newest_first_with_a_cursor(engine: Engine, key: Key) -> None:
    now = time.time()
    events = [event(key, created_at=now - 100 + i, completion_tokens=i) for i in range(25)]
    events.append(event(add_key(engine), created_at=now))  # another key's: never shown
    store_batch(engine, events)
    q = UsageQueries(engine)
    seen, before = [], None
    while True:
        rows, more = q.activity(key.id, limit=10, before=before)
        seen += rows
        if not more:
            break
        before = rows[-1]["request_id"]
    assert [r["request_id"] for r in seen] == [e.request_id for e in reversed(events[:25])]
    wanted = events[7]
    [row], more = q.activity(key.id, limit=10, request_id=wanted.request_id)
    assert not more and row["completion_tokens"] == 7 and row["status_code"] == 200
    assert set(row) >= {"request_id", "created_at", "model", "status_code", "error_code", "stream",
                        "prompt_tokens", "completion_tokens", "latency_ms", "client_ip", "user_agent"}


def test_old_activity_is_purged_but_its_usage_stays(engine: Engine, key: Key) -> None:
    old = NOW - 40 * DAY
    store_batch(engine, [event(key, created_at=old), event(key, created_at=NOW - 10)])
    maintain(engine, datetime.fromtimestamp(NOW, UTC), Retention(activity=timedelta(days=30)))
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(usage_events)).scalar_one() == 1
    assert all_levels(engine, key)["day"]["requests"] == 2
