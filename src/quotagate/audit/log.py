"""Writing audit events inside the caller's transaction, and reading them back per project."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, Engine, select

from quotagate.accounts.models import Actor
from quotagate.ids import isoformat, new_id, utcnow
from quotagate.store.tables import audit_log

_LAST_EVENT_AT = "quotagate.audit.last_event_at"


def record(conn: Connection, actor: Actor, project_id: str, action: str, target_type: str,
           target_id: str, details: dict[str, Any] | None = None) -> None:
    """Append one event in ``conn``'s transaction, so it commits or rolls back with the change itself.

    Events of one transaction get strictly increasing times (a microsecond apart if the clock has not
    moved), so that the log, read newest first, shows them in the order they happened."""
    _insert(conn, project_id, action, target_type, target_id, details, actor_id=actor.user.id,
            actor_email=actor.user.email, client_ip=actor.client_ip, user_agent=actor.user_agent)


def record_anonymous(conn: Connection, project_id: str, action: str, target_type: str, target_id: str,
                     details: dict[str, Any] | None, *, client_ip: str | None, user_agent: str | None,
                     reporter: str) -> None:
    """An event caused by no user (a leak report): no actor id, ``reporter`` in the actor's email column."""
    _insert(conn, project_id, action, target_type, target_id, details, actor_id=None, actor_email=reporter,
            client_ip=client_ip, user_agent=user_agent)


def _insert(conn: Connection, project_id: str, action: str, target_type: str, target_id: str,
            details: dict[str, Any] | None, *, actor_id: str | None, actor_email: str | None,
            client_ip: str | None, user_agent: str | None) -> None:
    now = utcnow()
    last = conn.info.get(_LAST_EVENT_AT)
    if last is not None and now <= last:
        now = last + timedelta(microseconds=1)
    conn.info[_LAST_EVENT_AT] = now
    conn.execute(audit_log.insert().values(
        id=new_id("evt"), project_id=project_id, actor_id=actor_id, actor_email=actor_email,
        action=action, target_type=target_type, target_id=target_id, details=details,
        client_ip=client_ip, user_agent=(user_agent or "")[:512] or None, created_at=now,
    ))


class AuditLog:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def list(self, project_id: str, *, limit: int = 100, before: str | None = None) -> list[dict[str, Any]]:
        """The project's events, newest first; ``before`` is an event id to page past."""
        query = select(audit_log).where(audit_log.c.project_id == project_id)
        with self._engine.connect() as conn:
            if before is not None:
                anchor = conn.execute(select(audit_log.c.created_at, audit_log.c.id).where(
                    audit_log.c.id == before, audit_log.c.project_id == project_id)).first()
                if anchor is not None:
                    query = query.where(
                        (audit_log.c.created_at < anchor.created_at)
                        | ((audit_log.c.created_at == anchor.created_at) & (audit_log.c.id < anchor.id)))
            rows = conn.execute(query.order_by(audit_log.c.created_at.desc(), audit_log.c.id.desc())
                                .limit(limit)).all()
        return [
            {"id": r.id, "object": "audit_event", "project_id": r.project_id, "action": r.action,
             "actor": {"id": r.actor_id, "email": r.actor_email}, "target_type": r.target_type,
             "target_id": r.target_id, "details": r.details, "client_ip": r.client_ip,
             "user_agent": r.user_agent, "created_at": isoformat(r.created_at)}
            for r in rows
        ]
