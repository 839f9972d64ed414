"""Figures for the report (printed with ``pytest -s``; never asserted: timings depend on the machine).

- the cost of ``Meter.record`` per call on the hot path;
- a 30-day usage query on a key with a month of minute buckets (100 requests/s, every minute busy).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine

from quotagate.metering.meter import JournalMeter
from quotagate.metering.queries import UsageQueries, Window
from quotagate.metering.store import DAY, HOUR, MINUTE, Retention
from quotagate.store.tables import usage_buckets
from tests.metering.conftest import Key, add_key, event


def test_record_cost_per_call(tmp_path: Path, engine: Engine, key: Key) -> None:
    n = 20_000
    events = [event(key, completion_tokens=i % 100) for i in range(n)]

    async def run() -> tuple[float, float]:
        meter = JournalMeter(engine, tmp_path / "j")
        await meter.start()
        record = meter.record
        t0 = time.perf_counter()
        for e in events:
            record(e)
        total = time.perf_counter() - t0
        t1 = time.perf_counter()
        for e in events:
            meter.metrics.observe(e)
        metrics_only = time.perf_counter() - t1
        await meter.close()
        return total / n * 1e6, metrics_only / n * 1e6

    per_call, metrics_part = asyncio.run(run())
    print(f"\nMeter.record: {per_call:.1f} us per call (of which metrics {metrics_part:.1f} us), {n} calls")


def test_thirty_day_query(engine: Engine, key: Key) -> None:
    """A month of minute-level traffic at 100 requests/s on one key (and as much on a second key), stored
    as the shipper stores it: a bucket per minute, per hour and per day."""
    now = int(time.time())
    end = now - now % DAY + DAY
    start = end - 30 * DAY
    per_minute = 6000
    noise = add_key(engine, key.project_id)
    rows = []
    for k in (key, noise):
        for width in (MINUTE, HOUR, DAY):
            n = per_minute * width // MINUTE
            rows += [{"key_id": k.id, "width": width, "bucket_start": t, "model": "qwen3.6-27b",
                      "project_id": k.project_id, "requests": n, "prompt_tokens": 100 * n,
                      "completion_tokens": 200 * n, "errors": 0, "rate_limited": 0, "latency_ms_sum": 10.0 * n}
                     for t in range(start, end, width)]
    with engine.begin() as conn:
        for i in range(0, len(rows), 5000):
            conn.execute(usage_buckets.insert(), rows[i:i + 5000])
    # Upkeep has not run: every minute bucket of the month is still there (the worst case).
    q = UsageQueries(engine, retention=Retention(minute_buckets=timedelta(days=40),
                                                 hour_buckets=timedelta(days=400)))
    for granularity, width, first in (("hour", HOUR, start), ("day", DAY, start), ("minute", MINUTE, end - DAY)):
        window = Window(first, end, width, granularity)
        timings = []
        for _ in range(7):
            t0 = time.perf_counter()
            totals, data = q.key_usage(key.id, window)
            timings.append((time.perf_counter() - t0) * 1000)
        assert totals["requests"] == per_minute * (end - first) // MINUTE
        print(f"\nusage query over {(end - first) // DAY} days at granularity={granularity} ({len(data)} points), "
              f"{30 * 1440} minute buckets stored per key: median {statistics.median(timings):.1f} ms "
              f"(min {min(timings):.1f}, max {max(timings):.1f}) on {engine.dialect.name}")
