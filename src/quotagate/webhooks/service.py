"""The webhook service: a project's endpoints (create, list, edit, delete, test) and their delivery log.

Reading needs the ``member`` role, changing the ``owner`` role (a webhook sends the project's events to
an address of its choosing). Another project's webhook is not found. Every change is audited, without
the secret."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, Row, delete, func, select, update

from quotagate.accounts.models import Actor, Role
from quotagate.accounts.service import AccountService
from quotagate.audit import record
from quotagate.errors import Conflict, InvalidRequest, NotFound
from quotagate.ids import new_id, utcnow
from quotagate.store.tables import webhook_deliveries, webhooks
from quotagate.webhooks.schemas import TEST_EVENT, WebhookCreate, WebhookUpdate
from quotagate.webhooks.signing import SigningKey, new_nonce
from quotagate.webhooks.store import delivery_json, enqueue, webhook_json

MAX_PER_PROJECT = 20
STATUSES = ("pending", "delivered", "failed")


def audit_url(url: str) -> str:
    """A webhook URL as the audit log shows it: without its query, where receivers often put a token (the
    audit log is open to viewers, who do not see webhooks)."""
    base, sep, _query = url.partition("?")
    return f"{base}?…" if sep else base


def _audited(field: str, value: Any) -> Any:
    return audit_url(value) if field == "url" else value


class WebhookService:
    def __init__(self, engine: Engine, accounts: AccountService, key: SigningKey) -> None:
        self._engine = engine
        self._accounts = accounts
        self._key = key

    def _row(self, conn: Connection, actor: Actor, project_id: str, webhook_id: str, needed: Role) -> Row[Any]:
        self._accounts.require(conn, actor, project_id, needed)
        row = conn.execute(select(webhooks).where(webhooks.c.id == webhook_id,
                                                  webhooks.c.project_id == project_id)).first()
        if row is None:
            raise NotFound(f"no webhook {webhook_id!r} in this project")
        return row

    def _secret(self, webhook_id: str, nonce: str) -> tuple[str, dict[str, str]]:
        """The secret and the columns that make it (nonce, its prefix, the signing key's fingerprint)."""
        secret = self._key.secret(webhook_id, nonce)
        return secret, {"secret_nonce": nonce, "secret_prefix": secret[:10],
                        "key_fingerprint": self._key.fingerprint}

    # -- endpoints -----------------------------------------------------------------------------
    def create(self, actor: Actor, project_id: str, body: WebhookCreate) -> tuple[dict[str, Any], str]:
        """A new webhook and its secret (returned here and never again)."""
        now = utcnow()
        webhook_id = new_id("whk")
        secret, columns = self._secret(webhook_id, new_nonce())
        with self._engine.begin() as conn:
            self._accounts.require(conn, actor, project_id, "owner", lock=True)  # lock: the count below
            count = conn.execute(select(func.count()).select_from(webhooks)
                                 .where(webhooks.c.project_id == project_id)).scalar_one()
            if count >= MAX_PER_PROJECT:
                raise Conflict(f"a project has at most {MAX_PER_PROJECT} webhooks; delete one first")
            conn.execute(webhooks.insert().values(
                id=webhook_id, project_id=project_id, url=body.url, events=list(body.events),
                budget_thresholds=list(body.budget_thresholds), enabled=True, created_by=actor.user.id,
                created_at=now, updated_at=now, **columns))
            record(conn, actor, project_id, "webhook.created", "webhook", webhook_id,
                   {"url": audit_url(body.url), "events": list(body.events),
                    "budget_thresholds": list(body.budget_thresholds)})
            row = conn.execute(select(webhooks).where(webhooks.c.id == webhook_id)).one()
        return webhook_json(row), secret

    def list_webhooks(self, actor: Actor, project_id: str) -> list[dict[str, Any]]:
        with self._engine.connect() as conn:
            self._accounts.require(conn, actor, project_id, "member")
            rows = conn.execute(select(webhooks).where(webhooks.c.project_id == project_id)
                                .order_by(webhooks.c.created_at.desc(), webhooks.c.id.desc())).all()
        return [webhook_json(r) for r in rows]

    def get(self, actor: Actor, project_id: str, webhook_id: str) -> dict[str, Any]:
        with self._engine.connect() as conn:
            return webhook_json(self._row(conn, actor, project_id, webhook_id, "member"))

    def authorize(self, actor: Actor, project_id: str, webhook_id: str | None, needed: Role) -> None:
        """404 for a stranger (or another project's webhook), 403 below ``needed``: before a body is read."""
        with self._engine.connect() as conn:
            if webhook_id is None:
                self._accounts.require(conn, actor, project_id, needed)
            else:
                self._row(conn, actor, project_id, webhook_id, needed)

    def update(self, actor: Actor, project_id: str, webhook_id: str,
               body: WebhookUpdate) -> tuple[dict[str, Any], str | None]:
        """Change the fields given; ``rotate_secret`` makes a new secret, returned here only."""
        given = body.model_fields_set
        if not given:
            raise InvalidRequest("nothing to change: give at least one of url, events, budget_thresholds, "
                                 "enabled, rotate_secret")
        for name in given:
            if getattr(body, name) is None:
                raise InvalidRequest(f"{name}: must not be null", field=name)
        changes: dict[str, Any] = {f: getattr(body, f) for f in given if f != "rotate_secret"}
        secret: str | None = None
        with self._engine.begin() as conn:
            row = self._row(conn, actor, project_id, webhook_id, "owner")
            if body.rotate_secret:
                secret, columns = self._secret(webhook_id, new_nonce())
                changes |= columns
            conn.execute(update(webhooks).where(webhooks.c.id == webhook_id).values(updated_at=utcnow(), **changes))
            shown = sorted(f for f in changes if f not in ("secret_nonce", "secret_prefix", "key_fingerprint"))
            details: dict[str, Any] = {"before": {f: _audited(f, getattr(row, f)) for f in shown},
                                       "after": {f: _audited(f, changes[f]) for f in shown}}
            if secret is not None:
                details["secret_rotated"] = True
            record(conn, actor, project_id, "webhook.updated", "webhook", webhook_id, details)
            fresh = conn.execute(select(webhooks).where(webhooks.c.id == webhook_id)).one()
        return webhook_json(fresh), secret

    def delete(self, actor: Actor, project_id: str, webhook_id: str) -> None:
        """Delete the webhook and its delivery log (pending deliveries are not sent)."""
        with self._engine.begin() as conn:
            row = self._row(conn, actor, project_id, webhook_id, "owner")
            conn.execute(delete(webhook_deliveries).where(webhook_deliveries.c.webhook_id == webhook_id))
            conn.execute(delete(webhooks).where(webhooks.c.id == webhook_id))
            record(conn, actor, project_id, "webhook.deleted", "webhook", webhook_id, {"url": audit_url(row.url)})

    def send_test(self, actor: Actor, project_id: str, webhook_id: str) -> dict[str, Any]:
        """Queue a ``webhook.test`` event, delivered (and logged) like any other. A disabled webhook sends
        nothing, so testing one is a Conflict."""
        now = utcnow()
        with self._engine.begin() as conn:
            row = self._row(conn, actor, project_id, webhook_id, "owner")
            if not row.enabled:
                raise Conflict("the webhook is disabled; enable it before sending a test event")
            dedupe = new_id("test")
            enqueue(conn, webhook_id=webhook_id, project_id=project_id, event_type=TEST_EVENT, dedupe_key=dedupe,
                    data={"webhook_id": webhook_id, "project_id": project_id,
                          "message": "a test event sent from quotagate"}, now=now)
            record(conn, actor, project_id, "webhook.tested", "webhook", webhook_id)
            fresh = conn.execute(select(webhook_deliveries).where(webhook_deliveries.c.webhook_id == webhook_id,
                                                                  webhook_deliveries.c.dedupe_key == dedupe)).one()
        return delivery_json(fresh)

    # -- the delivery log -------------------------------------------------------------------------
    def deliveries(self, actor: Actor, project_id: str, webhook_id: str, *, limit: int, before: str | None,
                   status: str | None) -> list[dict[str, Any]]:
        """The webhook's deliveries, newest first; ``before`` is a delivery id to page past."""
        if status is not None and status not in STATUSES:
            raise InvalidRequest(f"status: must be one of {', '.join(STATUSES)}, not {status!r}", field="status")
        d = webhook_deliveries.c
        with self._engine.connect() as conn:
            self._row(conn, actor, project_id, webhook_id, "member")
            query = select(webhook_deliveries).where(d.webhook_id == webhook_id)
            if status is not None:
                query = query.where(d.status == status)
            if before is not None:
                anchor = conn.execute(select(d.created_at, d.id)
                                      .where(d.id == before, d.webhook_id == webhook_id)).first()
                if anchor is None:
                    raise InvalidRequest(f"before: no delivery {before!r} of this webhook", field="before")
                query = query.where((d.created_at < anchor.created_at)
                                    | ((d.created_at == anchor.created_at) & (d.id < anchor.id)))
            rows = conn.execute(query.order_by(d.created_at.desc(), d.id.desc()).limit(limit)).all()
        return [delivery_json(r) for r in rows]
