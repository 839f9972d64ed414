"""The key service: mint, list, edit, revoke, archive, rotate; and resolve a secret for the gateway.

Every write is one transaction that also appends an audit event, and tells the key events bus after
commit, so that every cache drops its copy before the caller hears back.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from ipaddress import ip_network
from typing import Any

from sqlalchemy import Connection, Engine, Row, select, update

from quotagate.accounts.models import Actor, Role
from quotagate.accounts.service import AccountService
from quotagate.audit import record, record_anonymous
from quotagate.errors import Conflict, InvalidRequest, NotFound
from quotagate.ids import new_id, utcnow
from quotagate.keys import secrets
from quotagate.keys.events import KeyChanged, KeyEvents
from quotagate.keys.models import InferenceKey, KeyRecord, Limits
from quotagate.keys.schemas import KeyCreate, KeyUpdate, RotateRequest, check_budget_pair, check_model_limits
from quotagate.store.tables import inference_keys, projects

LIMIT_FIELDS = ("rpm", "tpm", "token_limit", "token_limit_period", "allowed_models", "expires_at",
                "allowed_networks", "metadata", "model_limits")


def _limits(raw: dict[str, Any] | None) -> Limits | None:
    """Stored limits (a JSON object or a row's columns) as ``Limits``, None when none is set."""
    if raw is None:
        return None
    limits = Limits(raw.get("rpm"), raw.get("tpm"), raw.get("token_limit"), raw.get("token_limit_period"))
    return limits if limits else None


def _model_limits(raw: dict[str, Any] | None) -> dict[str, Limits] | None:
    if not raw:
        return None
    out = {model: lim for model, lim in ((m, _limits(v)) for m, v in raw.items()) if lim is not None}
    return out or None


def _key(row: Row[Any]) -> InferenceKey:
    return InferenceKey(
        id=row.id, project_id=row.project_id, name=row.name, prefix=row.prefix, rpm=row.rpm, tpm=row.tpm,
        token_limit=row.token_limit, token_limit_period=row.token_limit_period,
        allowed_models=tuple(row.allowed_models) if row.allowed_models is not None else None,
        expires_at=row.expires_at, revoked_at=row.revoked_at, archived=bool(row.archived),
        created_at=row.created_at, updated_at=row.updated_at, last_used_at=row.last_used_at,
        rotated_from=row.rotated_from,
        allowed_networks=tuple(row.allowed_networks) if row.allowed_networks is not None else None,
        metadata=dict(row.metadata) if row.metadata is not None else None,
        model_limits=_model_limits(row.model_limits),
    )


def _audit_view(values: dict[str, Any]) -> dict[str, Any]:
    """Values as they go into the audit log's JSON (timestamps as ISO text)."""
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in values.items()}


def project_keys_invalidator(events: KeyEvents) -> Callable[[Connection, str], Callable[[], None]]:
    """For the account service: after a project's models or limits change, every key of it must be reloaded.

    The returned function runs inside the changing transaction (so it sees the keys as committed with
    the change) and returns the notification to send after commit."""

    def collect(conn: Connection, project_id: str) -> Callable[[], None]:
        rows = conn.execute(select(inference_keys.c.id, inference_keys.c.secret_hash)
                            .where(inference_keys.c.project_id == project_id)).all()

        def notify() -> None:
            for r in rows:
                events.publish(KeyChanged(key_id=r.id, secret_hash=r.secret_hash, project_id=project_id))

        return notify

    return collect


class KeyService:
    def __init__(self, engine: Engine, accounts: AccountService, events: KeyEvents,
                 model_ids: Callable[[], frozenset[str]]) -> None:
        self._engine = engine
        self._accounts = accounts
        self._events = events
        self._model_ids = model_ids

    def model_ids(self) -> frozenset[str]:
        """Every model id of the catalog (what a project without a models list may use)."""
        return self._model_ids()

    # -- reads -------------------------------------------------------------------------------
    def _row(self, conn: Connection, key_id: str) -> Row[Any]:
        row = conn.execute(select(inference_keys).where(inference_keys.c.id == key_id)).first()
        if row is None:
            raise NotFound(f"no inference key {key_id!r}")
        return row

    def _authorized_row(self, conn: Connection, actor: Actor, key_id: str, needed: Role, *,
                        for_update: bool = False) -> Row[Any]:
        """The key's row if the actor may act on it with role ``needed``; NotFound if not theirs.

        ``for_update`` locks the row until the transaction ends (PostgreSQL; SQLite's writers are already
        serialised by BEGIN IMMEDIATE), so that two concurrent writes to one key, say two rotations,
        run one after the other and the second sees what the first did."""
        query = select(inference_keys).where(inference_keys.c.id == key_id)
        row = conn.execute(query.with_for_update() if for_update else query).first()
        if row is None:
            raise NotFound(f"no inference key {key_id!r}")
        try:
            self._accounts.require(conn, actor, row.project_id, needed)
        except NotFound:
            raise NotFound(f"no inference key {key_id!r}") from None
        return row

    def authorize(self, actor: Actor, key_id: str, needed: Role) -> None:
        """NotFound unless the actor can see the key, Forbidden unless their role is at least ``needed``.

        The console API calls this before it reads a request body, so that a stranger hears 404 and a
        viewer 403 whatever they send; every write checks again inside its own transaction."""
        with self._engine.connect() as conn:
            self._authorized_row(conn, actor, key_id, needed)

    def list_keys(self, actor: Actor, project_id: str, *, include_archived: bool = False,
                  limit: int | None = None, before: str | None = None) -> list[InferenceKey]:
        """The project's keys, newest first: at most ``limit`` of them, those after key ``before`` (a key
        of this project, else InvalidRequest) in that order."""
        keys = inference_keys.c
        with self._engine.connect() as conn:
            self._accounts.role_in(conn, actor, project_id)
            query = select(inference_keys).where(keys.project_id == project_id)
            if not include_archived:
                query = query.where(keys.archived.is_(False))
            if before is not None:
                anchor = conn.execute(select(keys.created_at, keys.id).where(
                    keys.id == before, keys.project_id == project_id)).first()
                if anchor is None:
                    raise InvalidRequest(f"before: no key {before!r} in this project", field="before")
                query = query.where((keys.created_at < anchor.created_at)
                                    | ((keys.created_at == anchor.created_at) & (keys.id < anchor.id)))
            query = query.order_by(keys.created_at.desc(), keys.id.desc())
            if limit is not None:
                query = query.limit(limit)
            rows = conn.execute(query).all()
        return [_key(r) for r in rows]

    def get(self, actor: Actor, key_id: str) -> InferenceKey:
        with self._engine.connect() as conn:
            return _key(self._authorized_row(conn, actor, key_id, "viewer"))

    def project_of(self, actor: Actor, key_id: str) -> str:
        """The project a key belongs to, if the actor may read it (usage and activity use this)."""
        return self.get(actor, key_id).project_id

    # -- validation ----------------------------------------------------------------------------
    def _check_models(self, conn: Connection, project_id: str, models: list[str] | None, *,
                      field: str = "allowed_models") -> None:
        if not models:
            return
        project_models = conn.execute(select(projects.c.models).where(projects.c.id == project_id)).scalar()
        usable = set(project_models) if project_models is not None else set(self._model_ids())
        unknown = [m for m in models if m not in self._model_ids()]
        if unknown:
            raise InvalidRequest(f"{field}: unknown model id(s) {', '.join(map(repr, unknown))}", field=field)
        outside = [m for m in models if m not in usable]
        if outside:
            raise InvalidRequest(f"{field}: {', '.join(map(repr, outside))} not available to this "
                                 "project", field=field)

    @staticmethod
    def _check_expiry(values: dict[str, Any]) -> None:
        expires = values.get("expires_at")
        if expires is not None and expires <= utcnow():
            raise InvalidRequest("expires_at: must be in the future", field="expires_at")

    # -- writes --------------------------------------------------------------------------------
    def _notify(self, row: Row[Any]) -> None:
        self._events.publish(KeyChanged(key_id=row.id, secret_hash=row.secret_hash, project_id=row.project_id))

    def _insert(self, conn: Connection, actor: Actor, project_id: str, values: dict[str, Any],
                rotated_from: str | None = None) -> tuple[InferenceKey, str]:
        secret = secrets.generate(secrets.INFERENCE_KEY_KIND)
        now = utcnow()
        key_id = new_id("key")
        conn.execute(inference_keys.insert().values(
            id=key_id, project_id=project_id, secret_hash=secrets.hash_secret(secret),
            prefix=secrets.masked_prefix(secret), archived=False, created_at=now, updated_at=now,
            created_by=actor.user.id, rotated_from=rotated_from, version=1, **values))
        return _key(self._row(conn, key_id)), secret

    def mint(self, actor: Actor, project_id: str, body: KeyCreate) -> tuple[InferenceKey, str]:
        """A new key; its secret is returned here and never again."""
        values = body.model_dump()
        body.check()
        values["model_limits"] = check_model_limits(body.model_limits)
        self._check_expiry(values)
        with self._engine.begin() as conn:
            self._accounts.require(conn, actor, project_id, "member")
            self._check_models(conn, project_id, body.allowed_models)
            self._check_models(conn, project_id, list(values["model_limits"] or ()), field="model_limits")
            key, secret = self._insert(conn, actor, project_id, values)
            record(conn, actor, project_id, "key.minted", "inference_key", key.id, _audit_view(values))
        return key, secret

    def update(self, actor: Actor, key_id: str, body: KeyUpdate) -> InferenceKey:
        """Change the fields present in ``body`` in place; ``None`` clears a limit or the expiry.

        Clearing ``token_limit`` clears its period too. Revoked and archived keys cannot be changed."""
        changes = {f: getattr(body, f) for f in body.model_fields_set}
        if "model_limits" in changes:
            changes["model_limits"] = check_model_limits(body.model_limits)
        if not changes:
            raise InvalidRequest("nothing to change: give at least one of name, " + ", ".join(LIMIT_FIELDS))
        if "name" in changes and changes["name"] is None:
            raise InvalidRequest("name: must not be null", field="name")
        self._check_expiry(changes)
        with self._engine.begin() as conn:
            row = self._authorized_row(conn, actor, key_id, "member", for_update=True)
            if row.revoked_at is not None:
                raise Conflict("the key is revoked; a revoked key cannot be changed (mint a new one)")
            if row.archived:
                raise Conflict("the key is archived; unarchive it before changing it")
            if "token_limit" in changes and changes["token_limit"] is None and "token_limit_period" not in changes:
                changes["token_limit_period"] = None  # clearing the budget clears its period too
            check_budget_pair(changes.get("token_limit", row.token_limit),
                              changes.get("token_limit_period", row.token_limit_period))
            self._check_models(conn, row.project_id, changes.get("allowed_models"))
            self._check_models(conn, row.project_id, list(changes.get("model_limits") or ()), field="model_limits")
            conn.execute(update(inference_keys).where(inference_keys.c.id == key_id)
                         .values(updated_at=utcnow(), version=inference_keys.c.version + 1, **changes))
            before = {f: getattr(row, f) for f in sorted(changes)}
            record(conn, actor, row.project_id, "key.edited", "inference_key", key_id,
                   {"before": _audit_view(before), "after": _audit_view({f: changes[f] for f in sorted(changes)})})
            fresh = self._row(conn, key_id)
        self._notify(fresh)
        return _key(fresh)

    def revoke(self, actor: Actor, key_id: str) -> InferenceKey:
        """Revoke at once and for good; repeating it changes nothing and is not an error."""
        with self._engine.begin() as conn:
            row = self._authorized_row(conn, actor, key_id, "member", for_update=True)
            if row.revoked_at is None:
                conn.execute(update(inference_keys).where(inference_keys.c.id == key_id).values(
                    revoked_at=utcnow(), updated_at=utcnow(), version=inference_keys.c.version + 1))
                record(conn, actor, row.project_id, "key.revoked", "inference_key", key_id)
            fresh = self._row(conn, key_id)
        self._notify(fresh)
        return _key(fresh)

    def set_archived(self, actor: Actor, key_id: str, archived: bool) -> InferenceKey:
        """Hide (or show again) a revoked or expired key; an active key is a Conflict. Repeating is harmless."""
        with self._engine.begin() as conn:
            row = self._authorized_row(conn, actor, key_id, "member", for_update=True)
            status = _key(row).status(utcnow())
            if status == "active" and (archived or not row.archived):
                raise Conflict("only a revoked or expired key can be archived or unarchived; this one is active "
                               "(revoke it first)")
            if bool(row.archived) != archived:
                conn.execute(update(inference_keys).where(inference_keys.c.id == key_id).values(
                    archived=archived, updated_at=utcnow(), version=inference_keys.c.version + 1))
                record(conn, actor, row.project_id, "key.archived" if archived else "key.unarchived",
                       "inference_key", key_id)
            fresh = self._row(conn, key_id)
        self._notify(fresh)
        return _key(fresh)

    def rotate(self, actor: Actor, key_id: str, body: RotateRequest) -> tuple[InferenceKey, str, InferenceKey]:
        """A new key with the old one's settings, and the old one set to expire after the grace period
        (revoked now when the grace is 0). Returns (new key, its secret, the old key as it now is)."""
        with self._engine.begin() as conn:
            old = self._authorized_row(conn, actor, key_id, "member", for_update=True)
            now = utcnow()
            if _key(old).status(now) != "active":
                raise Conflict(f"only an active key can be rotated; this one is {_key(old).status(now)}")
            values = {f: getattr(old, f) for f in LIMIT_FIELDS}
            values["name"] = body.name or old.name
            new, secret = self._insert(conn, actor, old.project_id, values, rotated_from=old.id)
            if body.grace_period_seconds == 0:
                old_changes: dict[str, Any] = {"revoked_at": now}
            else:
                ends = now + timedelta(seconds=body.grace_period_seconds)
                old_changes = {"expires_at": min(ends, old.expires_at) if old.expires_at else ends}
            conn.execute(update(inference_keys).where(inference_keys.c.id == key_id).values(
                updated_at=now, version=inference_keys.c.version + 1, **old_changes))
            record(conn, actor, old.project_id, "key.minted", "inference_key", new.id,
                   {**_audit_view(values), "rotated_from": old.id})
            record(conn, actor, old.project_id, "key.rotated", "inference_key", key_id,
                   {"new_key_id": new.id, "grace_period_seconds": body.grace_period_seconds,
                    **_audit_view(old_changes)})
            fresh_old = self._row(conn, key_id)
        self._notify(fresh_old)
        return new, secret, _key(fresh_old)

    def revoke_leaked(self, secret: str, details: dict[str, Any], client_ip: str | None,
                      user_agent: str | None) -> bool:
        """Revoke the key whose secret was found leaked (``details``: where), recording it in its project's
        audit log; whether it was a key of ours at all (one already revoked counts: it was)."""
        secret_hash = secrets.hash_secret(secret)
        with self._engine.begin() as conn:
            row = conn.execute(select(inference_keys).where(inference_keys.c.secret_hash == secret_hash)
                               .with_for_update()).first()
            if row is None:
                return False
            if row.revoked_at is None:
                now = utcnow()
                conn.execute(update(inference_keys).where(inference_keys.c.id == row.id).values(
                    revoked_at=now, updated_at=now, version=inference_keys.c.version + 1))
            record_anonymous(conn, row.project_id, "key.leaked", "inference_key", row.id,
                             {**details, "revoked": row.revoked_at is None}, client_ip=client_ip,
                             user_agent=user_agent, reporter="leak report")
            fresh = self._row(conn, row.id)
        self._notify(fresh)
        return True

    # -- the gateway's side ----------------------------------------------------------------------
    def lookup(self, secret: str) -> KeyRecord | None:
        """The record of the key whose secret this is, or None; a malformed secret (wrong prefix, length,
        alphabet or checksum) is refused without touching the store."""
        if not secrets.is_well_formed(secret, secrets.INFERENCE_KEY_KIND):
            return None
        return self.resolve(secrets.hash_secret(secret))

    def resolve(self, secret_hash: str) -> KeyRecord | None:
        """The frozen record of the key with that secret hash, or None if there is none.

        Called by the gateway's cache on a miss, never per request. Revoked keys resolve too (with
        ``revoked`` set), so that the gateway can say ``key_revoked`` rather than ``invalid_api_key``.
        """
        with self._engine.connect() as conn:
            row = conn.execute(
                select(inference_keys, projects.c.models.label("project_models"),
                       projects.c.rpm.label("project_rpm"), projects.c.tpm.label("project_tpm"),
                       projects.c.token_limit.label("project_token_limit"),
                       projects.c.token_limit_period.label("project_token_limit_period"))
                .join(projects, projects.c.id == inference_keys.c.project_id)
                .where(inference_keys.c.secret_hash == secret_hash)).first()
        if row is None:
            return None
        models: set[str] | None = None
        if row.allowed_models is not None:
            models = set(row.allowed_models)
        if row.project_models is not None:
            models = set(row.project_models) if models is None else models & set(row.project_models)
        return KeyRecord(
            id=row.id, project_id=row.project_id, secret_hash=row.secret_hash, rpm=row.rpm, tpm=row.tpm,
            token_limit=row.token_limit, token_limit_period=row.token_limit_period,
            models=frozenset(models) if models is not None else None,
            expires_at=row.expires_at.timestamp() if row.expires_at else None,
            revoked=row.revoked_at is not None, version=row.version,
            networks=tuple(ip_network(n) for n in row.allowed_networks) if row.allowed_networks is not None else None,
            project_limits=_limits({"rpm": row.project_rpm, "tpm": row.project_tpm,
                                    "token_limit": row.project_token_limit,
                                    "token_limit_period": row.project_token_limit_period}),
            model_limits=_model_limits(row.model_limits),
        )
