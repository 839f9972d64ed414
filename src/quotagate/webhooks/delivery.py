"""Delivering queued events: claim a few due rows, POST each once, record the outcome.

A row is claimed by setting its lease (``lease_until``) in a transaction that locks the rows it picks
(PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so instances claiming at once take different rows; SQLite: one
writer at a time anyway). While the lease runs, no other instance picks the row; the lease outlasts an
attempt's whole timeout, and the outcome is recorded only by the holder of that very lease. So at any
moment at most one instance is sending an event, and a row is sent again only after an attempt that saw
no 2xx: the receiver gets an event twice only if its 2xx answer was lost (or the instance died before
recording it), and then with the same ``quotagate-event-id`` (docs/webhooks.md, "Exactly once").
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import orjson
from sqlalchemy import Engine, or_, select, update

from quotagate.ids import isoformat, utcnow
from quotagate.store.tables import webhook_deliveries, webhooks
from quotagate.upstreams.errors import UpstreamError
from quotagate.upstreams.http import Pool
from quotagate.webhooks.signing import SigningKey, signature
from quotagate.webhooks.store import event_body

MAX_BACKOFF = 6 * 3600.0
LOG_ATTEMPTS = 10        # attempts kept in a delivery's attempt_log
USER_AGENT = "quotagate-webhooks/1"
MAX_ANSWER = 64 * 1024   # bytes of an answer's body read at most (and then ignored)
BODY_WAIT = 1.0          # seconds the body is waited for after the status


@dataclass(frozen=True, slots=True)
class Policy:
    timeout: float            # one attempt, connect to answer
    retry_base: float         # the wait after the first failure; doubled after each further one
    max_attempts: int

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.timeout + 30.0)

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failure: exponential, capped, with up to 10% jitter
        so that the retries of many events failing together spread out."""
        wait = min(self.retry_base * 2.0 ** (attempts - 1), MAX_BACKOFF)
        return float(wait * (1 + random.random() / 10))


@dataclass(frozen=True, slots=True)
class Claimed:
    row: Any
    url: str
    secret: str
    lease_until: datetime


@dataclass(frozen=True, slots=True)
class Outcome:
    response_code: int | None
    error: str | None
    duration_ms: float

    @property
    def ok(self) -> bool:
        return self.response_code is not None and 200 <= self.response_code < 300


def claim(engine: Engine, key: SigningKey, policy: Policy, limit: int) -> list[Claimed]:
    """Lease up to ``limit`` due deliveries of enabled webhooks whose secret this instance can make."""
    d, w = webhook_deliveries.c, webhooks.c
    now = utcnow()
    lease_until = now + policy.lease
    due = (select(d.id).where(d.status == "pending", d.next_attempt_at <= now,
                              or_(d.lease_until.is_(None), d.lease_until < now)).limit(1))
    with engine.connect() as conn:
        if conn.execute(due).first() is None:
            return []  # the usual case: no write transaction (on SQLite, no write lock) for nothing
    with engine.begin() as conn:
        rows = conn.execute(
            select(webhook_deliveries, w.url, w.secret_nonce)
            .join(webhooks, w.id == d.webhook_id)
            .where(d.status == "pending", d.next_attempt_at <= now,
                   or_(d.lease_until.is_(None), d.lease_until < now),
                   w.enabled.is_(True), w.key_fingerprint == key.fingerprint)
            .order_by(d.next_attempt_at).limit(limit)
            .with_for_update(skip_locked=True, of=webhook_deliveries)).all()
        if rows:
            conn.execute(update(webhook_deliveries).where(d.id.in_([r.id for r in rows]))
                         .values(lease_until=lease_until))
    return [Claimed(r, r.url, key.secret(r.webhook_id, r.secret_nonce), lease_until) for r in rows]


def record(engine: Engine, claimed: Claimed, outcome: Outcome, policy: Policy) -> bool:
    """Store the attempt's outcome, if the lease is still ours (whether it was)."""
    d = webhook_deliveries.c
    now = utcnow()
    row = claimed.row
    attempts = row.attempts + 1
    entry = {"at": isoformat(now), "response_code": outcome.response_code, "error": outcome.error,
             "duration_ms": round(outcome.duration_ms, 1)}
    values: dict[str, Any] = {"attempts": attempts, "lease_until": None, "response_code": outcome.response_code,
                              "last_error": outcome.error, "attempt_log": [*row.attempt_log, entry][-LOG_ATTEMPTS:]}
    if outcome.ok:
        values |= {"status": "delivered", "delivered_at": now}
    elif attempts >= policy.max_attempts:
        values |= {"status": "failed"}
    else:
        values |= {"next_attempt_at": now + timedelta(seconds=policy.backoff(attempts))}
    with engine.begin() as conn:
        result = conn.execute(update(webhook_deliveries)
                              .where(d.id == row.id, d.lease_until == claimed.lease_until).values(**values))
    return bool(result.rowcount)


def request_parts(url: str) -> tuple[str, str]:
    """(origin, path with query) of a webhook URL, for a ``Pool`` and its request line."""
    parts = urlsplit(url)
    path = parts.path or "/"
    return f"{parts.scheme}://{parts.netloc}", path + (f"?{parts.query}" if parts.query else "")


async def send(claimed: Claimed, limit: float) -> Outcome:
    """POST the event once, signed; only the answer's status counts."""
    body = orjson.dumps(event_body(claimed.row))
    stamp = int(time.time())
    origin, path = request_parts(claimed.url)
    started = time.monotonic()
    try:
        pool = Pool(origin, connect_timeout=limit, keepalive=1.0, headers={
            "Content-Type": "application/json", "User-Agent": USER_AGENT,
            "quotagate-event-id": claimed.row.id, "quotagate-signature": signature(claimed.secret, stamp, body)})
    except ValueError as exc:
        return Outcome(None, str(exc)[:500], 0.0)
    try:
        async with asyncio.timeout(limit):
            response = await pool.post(pool.request(path, body, None), limit, fresh=True)
        try:
            # The status is the answer. A short body is read to its end, so that closing the connection is
            # an orderly one (unread bytes would make it a reset the receiver logs); past MAX_ANSWER bytes,
            # or after BODY_WAIT seconds, it is dropped unread: a slow or endless body changes nothing.
            with contextlib.suppress(TimeoutError, UpstreamError):
                async with asyncio.timeout(BODY_WAIT):
                    seen = 0
                    while seen <= MAX_ANSWER and (chunk := await response.read_chunk()):
                        seen += len(chunk)
        finally:
            response.close()
        return Outcome(response.status, None if 200 <= response.status < 300 else f"HTTP {response.status}",
                       (time.monotonic() - started) * 1000)
    except TimeoutError:
        return Outcome(None, f"no answer within {limit:g} s", (time.monotonic() - started) * 1000)
    except UpstreamError as exc:
        return Outcome(None, str(exc)[:500], (time.monotonic() - started) * 1000)
    except OSError as exc:
        return Outcome(None, f"{type(exc).__name__}: {exc}"[:500], (time.monotonic() - started) * 1000)
    finally:
        pool.close()
