"""Shipping journal records to the store: exactly once, whatever is retried or where a crash falls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from quotagate.metering.interfaces import UsageEvent
from quotagate.metering.journal import Journal
from quotagate.metering.meter import JournalMeter
from quotagate.metering.shipper import Shipper, ShipperOptions
from quotagate.metering.store import DAY, HOUR, LEVELS, MINUTE, decode, encode, store_batch
from quotagate.store.tables import inference_keys, usage_buckets, usage_events
from tests.metering.conftest import Key, add_key, event


def totals(engine: Engine) -> tuple[int, int, int, int, int, int]:
    """(activity rows, then the buckets' requests, prompt, completion, errors, rate_limited), checking
    that the minute, hour and day levels agree."""
    b = usage_buckets.c
    with engine.connect() as conn:
        events = conn.execute(select(func.count()).select_from(usage_events)).scalar_one()
        levels = {width: tuple(int(x) for x in conn.execute(
            select(func.coalesce(func.sum(b.requests), 0), func.coalesce(func.sum(b.prompt_tokens), 0),
                   func.coalesce(func.sum(b.completion_tokens), 0), func.coalesce(func.sum(b.errors), 0),
                   func.coalesce(func.sum(b.rate_limited), 0)).where(b.width == width)).one())
            for width in LEVELS}
    assert levels[MINUTE] == levels[HOUR] == levels[DAY], levels
    return (events, *levels[MINUTE])  # type: ignore[return-value]


def test_codec_round_trip_and_forward_compatibility() -> None:
    e = event(None, ttft_ms=4.5, stream=True)
    assert decode(encode(e)) == e
    # A record written by a newer version with an extra trailing field still reads.
    assert decode(encode(e)[:-1] + b',"extra"]') == e


def test_the_same_batch_twice_counts_once(engine: Engine, key: Key) -> None:
    batch = [event(key, prompt_tokens=i, completion_tokens=2 * i) for i in range(50)]
    assert store_batch(engine, batch) == 50
    assert store_batch(engine, batch) == 0
    # A batch overlapping an earlier one adds only its new events.
    more = [event(key, prompt_tokens=1000, completion_tokens=0)]
    assert store_batch(engine, batch[:10] + more) == 1
    assert totals(engine) == (51, 51, sum(range(50)) + 1000, 2 * sum(range(50)), 0, 0)
    # A batch repeating an id within itself counts it once too.
    dup = event(key)
    assert store_batch(engine, [dup, dup]) == 1


def test_refusals_errors_and_keyless_requests(engine: Engine, key: Key) -> None:
    store_batch(engine, [
        event(key),
        event(key, status_code=429, error_code="rate_limit_exceeded", prompt_tokens=0, completion_tokens=0),
        event(key, status_code=403, error_code="model_not_allowed", prompt_tokens=0, completion_tokens=0),
        event(key, status_code=502, error_code="upstream_error", prompt_tokens=0, completion_tokens=0),
        event(None, status_code=401, error_code="invalid_api_key", prompt_tokens=0, completion_tokens=0,
              model=None),
    ])
    # Every request has its activity row; only the key's own count in its buckets.
    assert totals(engine) == (5, 4, 10, 20, 2, 1)


def test_last_used_at_moves_forward_only(engine: Engine, key: Key) -> None:
    now = time.time()
    store_batch(engine, [event(key, created_at=now - 10)])
    store_batch(engine, [event(key, created_at=now - 100)])
    store_batch(engine, [event(key, created_at=now + 5, status_code=401, error_code="key_revoked")])
    with engine.connect() as conn:
        last = conn.execute(select(inference_keys.c.last_used_at).where(inference_keys.c.id == key.id)).scalar()
    assert last is not None and abs(last.timestamp() - (now - 10)) < 0.01


def test_crash_between_store_commit_and_journal_trim(tmp_path: Path, engine: Engine, key: Key) -> None:
    """The store committed a batch, then the process died before trimming the journal: the next
    process ships the batch again and the store counts it once."""
    journal = Journal(tmp_path / "j")
    journal.open()
    batch = [event(key, completion_tokens=i) for i in range(20)]
    for e in batch:
        journal.append(encode(e))
    store_batch(engine, batch)      # the commit happened...
    journal.close()                 # ...and then the process was gone, journal untrimmed

    shipper = Shipper(tmp_path / "j", engine)
    shipper.ship_once()
    assert shipper.stats.adopted == 20
    assert shipper.stats.stored == 0
    assert totals(engine) == (20, 20, 200, sum(range(20)), 0, 0)
    assert not list((tmp_path / "j").glob("*.log"))


def test_a_store_failure_after_commit_is_retried_without_double_counting(tmp_path: Path, engine: Engine,
                                                                         key: Key) -> None:
    calls = {"n": 0}

    def flaky_store(eng: Engine, events: Sequence[UsageEvent]) -> int:
        stored = store_batch(eng, events)
        calls["n"] += 1
        if calls["n"] <= 2:
            raise ConnectionError("the connection dropped after COMMIT, before the answer")
        return stored

    journal = Journal(tmp_path / "j")
    journal.open()
    shipper = Shipper(tmp_path / "j", engine, ShipperOptions(batch_size=7), store=flaky_store)
    for i in range(30):
        journal.append(encode(event(key, completion_tokens=i)))
    failures = 0
    for _ in range(10):
        try:
            shipper.ship_once()
        except ConnectionError:
            failures += 1
    assert failures == 2
    assert shipper.progress_of(journal.writer) == (*journal.position(), 30)
    journal.close()
    shipper.ship_once()
    assert totals(engine) == (30, 30, 300, sum(range(30)), 0, 0)
    assert not list((tmp_path / "j").glob("*.log"))


def test_meter_records_ships_and_flushes(tmp_path: Path, engine: Engine, key: Key) -> None:
    other = add_key(engine, key.project_id)

    async def run() -> None:
        meter = JournalMeter(engine, tmp_path / "j")
        await meter.start()
        for i in range(200):
            meter.record(event(key if i % 2 else other, completion_tokens=i))
        assert await meter.flush()
        assert totals(engine)[:2] == (200, 200)
        for _ in range(5):
            meter.record(event(key))
        await meter.close()

    asyncio.run(run())
    assert totals(engine)[0] == 205
    left = sorted(p.name for p in (tmp_path / "j").iterdir())
    assert left == ["shipper.lock"], f"a clean stop leaves no journal behind: {left}"


@pytest.mark.parametrize("batches", [[1], [3, 3], [500, 10]])
def test_batches_of_any_size(engine: Engine, key: Key, batches: Sequence[int]) -> None:
    for size in batches:
        store_batch(engine, [event(key) for _ in range(size)])
    assert totals(engine)[0] == sum(batches)
