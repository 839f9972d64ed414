"""Writing usage to the store: one transaction per shipped batch, idempotent by request id, that adds
each new event to its minute, hour and day buckets; and the upkeep that drops detail past its retention."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, Table, and_, delete, or_, text, update
from sqlalchemy.dialects import postgresql, sqlite

from quotagate.metering.interfaces import UsageEvent
from quotagate.store.tables import inference_keys, usage_buckets, usage_events

MINUTE, HOUR, DAY = 60, 3600, 86400
LEVELS = (MINUTE, HOUR, DAY)
WIDTHS = {"minute": MINUTE, "hour": HOUR, "day": DAY}
NO_MODEL = ""  # the bucket key of requests that named no model (a primary key column cannot be NULL)

_FIELDS = tuple(f.name for f in dataclasses.fields(UsageEvent))
_REQUIRED = sum(1 for f in dataclasses.fields(UsageEvent) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING)
_as_tuple = operator.attrgetter(*_FIELDS)
_COUNTS = ("requests", "prompt_tokens", "completion_tokens", "errors", "rate_limited", "latency_ms_sum")


# -- the journal's record format ------------------------------------------------------------------
def encode(event: UsageEvent) -> bytes:
    """The journal record of an event: a JSON array in field order (new optional fields go last)."""
    return orjson.dumps(_as_tuple(event))


def decode(payload: bytes) -> UsageEvent:
    values = orjson.loads(payload)
    if not isinstance(values, list) or len(values) < _REQUIRED:
        raise ValueError("not a usage event record")
    return UsageEvent(*values[: len(_FIELDS)])


# -- shipping -----------------------------------------------------------------------------------
def _insert(conn: Connection, table: Table) -> sqlite.Insert | postgresql.Insert:
    """INSERT with the dialect's ON CONFLICT clauses (the same on both stores)."""
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    return postgresql.insert(table)


def _cut(value: str | None, size: int) -> str | None:
    return value[:size] if value is not None and len(value) > size else value


def _event_row(e: UsageEvent) -> dict[str, Any]:
    return {
        "request_id": e.request_id[:64], "created_at": datetime.fromtimestamp(e.created_at, UTC),
        "key_id": e.key_id, "project_id": e.project_id, "model": _cut(e.model, 200),
        "endpoint": e.endpoint[:32], "status_code": e.status_code, "error_code": _cut(e.error_code, 64),
        "stream": bool(e.stream), "prompt_tokens": e.prompt_tokens, "completion_tokens": e.completion_tokens,
        "latency_ms": e.latency_ms, "ttft_ms": e.ttft_ms, "client_ip": _cut(e.client_ip, 64),
        "user_agent": _cut(e.user_agent, 512),
    }


def is_rate_limited(status_code: int) -> bool:
    return status_code == 429


def is_error(status_code: int, error_code: str | None = None) -> bool:
    """Errors are the requests that did not succeed, other than those rate limited (counted apart) and
    streams whose client hung up: refusals, failures, and streams that ended in an error after a 200."""
    if status_code >= 400:
        return status_code != 429
    return error_code is not None and error_code != "client_disconnected"


def buckets(events: Iterable[UsageEvent]) -> list[dict[str, Any]]:
    """Bucket rows at every level (minute, hour, day) adding up ``events`` that belong to a key,
    sorted by primary key."""
    acc: dict[tuple[str, int, int, str], list[Any]] = {}
    for e in events:
        if e.key_id is None or e.project_id is None:
            continue
        model = _cut(e.model, 200) or NO_MODEL
        ts = int(e.created_at)
        for width in LEVELS:
            pk = (e.key_id, width, ts - ts % width, model)
            row = acc.get(pk)
            if row is None:
                row = acc[pk] = [e.project_id, 0, 0, 0, 0, 0, 0.0]
            row[1] += 1
            row[2] += e.prompt_tokens
            row[3] += e.completion_tokens
            row[4] += is_error(e.status_code, e.error_code)
            row[5] += is_rate_limited(e.status_code)
            row[6] += e.latency_ms
    return [
        {"key_id": k, "width": w, "bucket_start": s, "model": m, "project_id": v[0],
         **dict(zip(_COUNTS, v[1:], strict=True))}
        for (k, w, s, m), v in sorted(acc.items())
    ]


def add_to_buckets(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Add ``rows`` to the buckets they name, creating the missing ones.

    Rows must come sorted by primary key: two shippers updating the same buckets then lock them in the
    same order and cannot deadlock each other."""
    if not rows:
        return
    stmt = _insert(conn, usage_buckets)
    excluded = stmt.excluded
    stmt = stmt.on_conflict_do_update(
        index_elements=["key_id", "width", "bucket_start", "model"],
        set_={c: usage_buckets.c[c] + excluded[c] for c in _COUNTS})
    conn.execute(stmt, list(rows))


_EVENT_COLUMNS = ("request_id", "created_at", "key_id", "project_id", "model", "endpoint", "status_code",
                  "error_code", "stream", "prompt_tokens", "completion_tokens", "latency_ms", "ttft_ms",
                  "client_ip", "user_agent")
_PG_TYPES = ("text", "timestamptz", "text", "text", "text", "text", "integer", "text", "boolean", "bigint",
             "bigint", "float8", "float8", "text", "text")
_COLUMN_LIST = ", ".join(_EVENT_COLUMNS)
# The whole batch travels as one parameter per column (PostgreSQL: arrays, unnested) or one JSON array
# (SQLite: json_each), so the statement text is the same for every batch: prepared once, and no driver
# re-parses a statement with thousands of placeholders (which cost ~200 µs per event).
# Built from the constant column names above, never from input (hence the S608 waivers).
_PG_ARGS = ", ".join(f"CAST(:{c} AS {t}[])" for c, t in zip(_EVENT_COLUMNS, _PG_TYPES, strict=True))
_PG_INSERT = text(f"INSERT INTO usage_events ({_COLUMN_LIST}) SELECT * FROM unnest({_PG_ARGS}) "  # noqa: S608
                  "ON CONFLICT (request_id) DO NOTHING RETURNING request_id")
_JSON_ARGS = ", ".join(f"json_extract(j.value, '$[{i}]')" for i in range(len(_EVENT_COLUMNS)))
_SQLITE_INSERT = text(f"INSERT INTO usage_events ({_COLUMN_LIST}) SELECT {_JSON_ARGS} "  # noqa: S608
                      "FROM json_each(:rows) AS j WHERE true ON CONFLICT (request_id) DO NOTHING RETURNING request_id")
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"  # how SQLAlchemy's DateTime stores naive UTC on SQLite


def _insert_events(conn: Connection, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Insert the event rows that are not stored yet; returns the request ids actually inserted."""
    if conn.dialect.name == "postgresql":
        params = {c: [r[c] for r in rows] for c in _EVENT_COLUMNS}
        return set(conn.execute(_PG_INSERT, params).scalars())
    payload = orjson.dumps([
        [r["created_at"].astimezone(UTC).strftime(_SQLITE_TIME) if c == "created_at" else r[c]
         for c in _EVENT_COLUMNS] for r in rows])
    return set(conn.execute(_SQLITE_INSERT, {"rows": payload.decode()}).scalars())


def store_batch(engine: Engine, events: Sequence[UsageEvent]) -> int:
    """Store a batch of events in one transaction; returns how many were new.

    Only events whose request id was not stored yet are added to the buckets, so shipping the same
    batch twice (a retry, or a crash between this commit and the journal's trim) counts it once."""
    unique = list({e.request_id[:64]: e for e in events}.values())
    if not unique:
        return 0
    with engine.begin() as conn:
        inserted = _insert_events(conn, [_event_row(e) for e in unique])
        new = [e for e in unique if e.request_id[:64] in inserted]
        add_to_buckets(conn, buckets(new))
        _touch_keys(conn, new)
    return len(new)


def _touch_keys(conn: Connection, events: Iterable[UsageEvent]) -> None:
    """Move each key's ``last_used_at`` forward to its newest request (a refused 401 is no use)."""
    latest: dict[str, float] = {}
    for e in events:
        if e.key_id is not None and e.status_code != 401:
            latest[e.key_id] = max(latest.get(e.key_id, 0.0), e.created_at)
    for key_id, ts in sorted(latest.items()):
        when = datetime.fromtimestamp(ts, UTC)
        conn.execute(update(inference_keys)
                     .where(inference_keys.c.id == key_id,
                            or_(inference_keys.c.last_used_at.is_(None), inference_keys.c.last_used_at < when))
                     .values(last_used_at=when))


# -- upkeep -------------------------------------------------------------------------------------
def purge_buckets(engine: Engine, width: int, before: int) -> int:
    """Drop buckets of ``width`` that start before ``before``: the next level up holds their sums."""
    with engine.begin() as conn:
        return conn.execute(delete(usage_buckets).where(
            and_(usage_buckets.c.width == width, usage_buckets.c.bucket_start < before))).rowcount


def purge_events(engine: Engine, older_than: datetime) -> int:
    """Delete activity rows created before ``older_than`` (their usage stays in the buckets)."""
    with engine.begin() as conn:
        return conn.execute(delete(usage_events).where(usage_events.c.created_at < older_than)).rowcount


@dataclasses.dataclass(frozen=True, slots=True)
class Retention:
    """How long each level of detail is kept."""

    minute_buckets: timedelta = timedelta(hours=48)
    hour_buckets: timedelta = timedelta(days=60)
    activity: timedelta = timedelta(days=30)

    def kept(self, width: int) -> timedelta | None:
        """How long buckets of ``width`` are kept (None: for good)."""
        return {MINUTE: self.minute_buckets, HOUR: self.hour_buckets}.get(width)

    def horizon(self, width: int, now: float) -> int | None:
        """The earliest bucket start of level ``width`` sure to be complete at ``now`` (None: all are).

        Upkeep drops rows before ``now - kept`` aligned down to the next level; a query reads this level
        only from one next-level bucket later, so that it never meets a level that was partly dropped."""
        kept = self.kept(width)
        if kept is None:
            return None
        coarser = LEVELS[LEVELS.index(width) + 1]
        cutoff = int(now - kept.total_seconds())
        return cutoff - cutoff % coarser + coarser


def maintain(engine: Engine, now: datetime, retention: Retention) -> dict[str, int]:
    """One round of upkeep: drop minute and hour buckets past their retention (the level above holds
    their sums) and activity rows past theirs."""
    done = {}
    ts = int(now.timestamp())
    for width in (MINUTE, HOUR):
        kept = retention.kept(width)
        assert kept is not None
        coarser = LEVELS[LEVELS.index(width) + 1]
        cutoff = ts - int(kept.total_seconds())
        done[f"width_{width}_purged"] = purge_buckets(engine, width, cutoff - cutoff % coarser)
    done["events_purged"] = purge_events(engine, now - retention.activity)
    return done
