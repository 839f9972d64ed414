"""Rows of webhooks and their deliveries: the JSON views, and putting an event in a webhook's queue."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, Table
from sqlalchemy.dialects import postgresql, sqlite

from quotagate.ids import isoformat, new_id
from quotagate.store.tables import webhook_deliveries

EVENT_ID_PREFIX = "whevt"


def _insert(conn: Connection, table: Table) -> sqlite.Insert | postgresql.Insert:
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    return postgresql.insert(table)


def enqueue(conn: Connection, *, webhook_id: str, project_id: str, event_type: str, dedupe_key: str,
            data: dict[str, Any], now: datetime) -> bool:
    """Queue an event for one webhook unless that webhook already has the event ``dedupe_key`` (its natural
    identity): the unique constraint, not a read before the write, is what makes it one row however many
    instances try at once. Whether this call added it."""
    stmt = _insert(conn, webhook_deliveries).values(
        id=new_id(EVENT_ID_PREFIX), webhook_id=webhook_id, project_id=project_id, event_type=event_type,
        dedupe_key=dedupe_key[:255], data=data, created_at=now, status="pending", attempts=0,
        next_attempt_at=now, attempt_log=[])
    result = conn.execute(stmt.on_conflict_do_nothing(index_elements=["webhook_id", "dedupe_key"]))
    return bool(result.rowcount)


def webhook_json(row: Row[Any]) -> dict[str, Any]:
    return {"id": row.id, "object": "webhook", "project_id": row.project_id, "url": row.url,
            "events": list(row.events), "budget_thresholds": list(row.budget_thresholds),
            "enabled": bool(row.enabled), "secret_prefix": row.secret_prefix,
            "created_at": isoformat(row.created_at), "updated_at": isoformat(row.updated_at)}


def delivery_json(row: Row[Any]) -> dict[str, Any]:
    return {"id": row.id, "object": "webhook_delivery", "webhook_id": row.webhook_id,
            "event_type": row.event_type, "status": row.status, "attempts": row.attempts,
            "response_code": row.response_code, "last_error": row.last_error,
            "created_at": isoformat(row.created_at), "delivered_at": isoformat(row.delivered_at),
            "next_attempt_at": isoformat(row.next_attempt_at) if row.status == "pending" else None,
            "attempt_log": list(row.attempt_log), "data": row.data}


def event_body(row: Row[Any]) -> dict[str, Any]:
    """What the receiver gets: the same on every attempt (only the signature's timestamp changes)."""
    return {"id": row.id, "type": row.event_type, "created_at": isoformat(row.created_at), "data": row.data}
