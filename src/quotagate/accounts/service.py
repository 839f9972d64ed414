"""Users, access tokens, projects and memberships.

Every method that reads or writes a project takes the acting user and checks their role first; a
project the actor does not belong to is reported as not found, never as forbidden, so that its
existence is not revealed. Instance admins act as owners of every project.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Engine, Row, and_, func, literal, or_, select, text, union_all, update
from sqlalchemy.exc import IntegrityError

from quotagate.accounts.models import (
    AccessToken,
    Actor,
    Invitation,
    Member,
    Project,
    Role,
    TokenKind,
    User,
    role_at_least,
)
from quotagate.accounts.passwords import MAX_LENGTH, MIN_LENGTH, Passwords
from quotagate.accounts.schemas import EMAIL_PATTERN, MemberAdd, MemberUpdate, ProjectCreate, ProjectUpdate
from quotagate.audit import record
from quotagate.errors import Conflict, Forbidden, InvalidRequest, NotFound, Unauthenticated
from quotagate.ids import new_id, utcnow
from quotagate.keys import secrets
from quotagate.keys.schemas import check_budget_pair
from quotagate.store.tables import access_tokens, memberships, pending_memberships, projects, users
from quotagate.validation import clean_name

NAME_MAX = 200
PROJECT_LIMITS = ("rpm", "tpm", "token_limit", "token_limit_period")

# last_used_at of an access token is written at most this often, so reads stay reads.
TOKEN_TOUCH_INTERVAL = timedelta(seconds=60)

API_TOKEN: TokenKind = "api"  # noqa: S105 - a kind, not a password
WEB_SESSION: TokenKind = "session"


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """How long a web session lasts on the server: ``max_age`` from sign-in whatever happens, and
    ``idle`` since it was last used."""

    max_age: timedelta = timedelta(days=14)
    idle: timedelta = timedelta(hours=24)

    @property
    def touch_interval(self) -> timedelta:
        # Often enough that an active session never looks idle.
        return min(TOKEN_TOUCH_INTERVAL, self.idle / 4)

    def expires_at(self, created_at: datetime, last_used_at: datetime | None) -> datetime:
        return min(created_at + self.max_age, (last_used_at or created_at) + self.idle)


def normalise_email(email: str) -> str:
    email = email.strip().lower()
    if len(email) > 320 or not re.fullmatch(EMAIL_PATTERN, email):
        raise InvalidRequest(f"email: {email!r} is not an email address", field="email")
    return email


def _lock_email(conn: Connection, email: str) -> None:
    """Hold a lock on ``email`` until the transaction ends (PostgreSQL; SQLite's writers take turns anyway),
    so that adding a member by that email and creating a user with it run one after the other: a pending
    membership is never written after the user it waits for was created, and every pending row of one
    email gets the same user id."""
    if conn.dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(b"quotagate-email:" + email.encode()).digest()[:8], "big", signed=True)
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def _user(row: Row[Any]) -> User:
    return User(id=row.id, email=row.email, is_admin=bool(row.is_admin), created_at=row.created_at)


def _project(row: Row[Any], role: Role) -> Project:
    return Project(id=row.id, name=row.name, models=tuple(row.models) if row.models is not None else None,
                   created_at=row.created_at, updated_at=row.updated_at, role=role, rpm=row.rpm, tpm=row.tpm,
                   token_limit=row.token_limit, token_limit_period=row.token_limit_period)


def _token(row: Row[Any], sessions: SessionPolicy) -> AccessToken:
    expires_at = sessions.expires_at(row.created_at, row.last_used_at) if row.kind == WEB_SESSION else None
    return AccessToken(id=row.id, name=row.name, prefix=row.prefix, created_at=row.created_at,
                       last_used_at=row.last_used_at, revoked_at=row.revoked_at, kind=row.kind,
                       expires_at=expires_at)


class AccountService:
    def __init__(self, engine: Engine, passwords: Passwords, model_ids: Callable[[], frozenset[str]],
                 on_project_models_changed: Callable[[Connection, str], Callable[[], None]], *,
                 sessions: SessionPolicy | None = None, max_projects_per_user: int = 100) -> None:
        """``on_project_models_changed(conn, project_id)`` runs inside the transaction of a change of a
        project's models or limits and returns a callback to run after commit (the key service uses it to
        invalidate the project's keys, whose records carry both)."""
        self.sessions = sessions or SessionPolicy()
        self.max_projects_per_user = max_projects_per_user
        self._engine = engine
        self._passwords = passwords
        self._model_ids = model_ids
        self._on_models_changed = on_project_models_changed

    # -- users -------------------------------------------------------------------------------
    def create_user(self, email: str, password: str | None = None, *, is_admin: bool = False) -> User:
        email = normalise_email(email)
        if password is not None and not MIN_LENGTH <= len(password) <= MAX_LENGTH:
            raise InvalidRequest(f"password: must be {MIN_LENGTH} to {MAX_LENGTH} characters", field="password")
        password_hash = self._passwords.hash(password) if password is not None else None
        try:
            with self._engine.begin() as conn:
                # Invitations waiting for this email (see add_member) stay invitations, for the new user to
                # accept or decline; the user gets the id the projects were shown when it was added.
                _lock_email(conn, email)
                reserved = conn.execute(select(func.min(pending_memberships.c.user_id))
                                        .where(pending_memberships.c.email == email)).scalar()
                user = User(id=reserved or new_id("usr"), email=email, is_admin=is_admin, created_at=utcnow())
                conn.execute(users.insert().values(id=user.id, email=email, is_admin=is_admin,
                                                   created_at=user.created_at, password_hash=password_hash))
        except IntegrityError:
            raise Conflict(f"a user with email {email!r} already exists", field="email") from None
        return user

    def get_user_by_email(self, email: str) -> User:
        with self._engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.email == email.strip().lower())).first()
        if row is None:
            raise NotFound(f"no user with email {email!r}")
        return _user(row)

    def authenticate_password(self, email: str, password: str) -> User:
        """The user with that email and password; Unauthenticated otherwise (same error for both, and for
        a disabled user: the password is checked all the same, so the time taken tells nothing)."""
        with self._engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.email == email.strip().lower())).first()
        if not self._passwords.verify(row.password_hash if row else None, password) or row is None \
                or row.disabled_at is not None:
            raise Unauthenticated("wrong email or password")
        return _user(row)

    def list_users(self) -> list[tuple[User, datetime | None]]:
        """Every user, oldest first, with when each was disabled (None: active)."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(users).order_by(users.c.created_at, users.c.id)).all()
        return [(_user(r), r.disabled_at) for r in rows]

    def set_password(self, email: str, password: str) -> User:
        """Give the user a new password; their web sessions end (API access tokens are left alone)."""
        if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
            raise InvalidRequest(f"password: must be {MIN_LENGTH} to {MAX_LENGTH} characters", field="password")
        password_hash = self._passwords.hash(password)
        user = self.get_user_by_email(email)
        with self._engine.begin() as conn:
            conn.execute(update(users).where(users.c.id == user.id).values(password_hash=password_hash))
            conn.execute(update(access_tokens).where(access_tokens.c.user_id == user.id,
                                                     access_tokens.c.kind == WEB_SESSION,
                                                     access_tokens.c.revoked_at.is_(None))
                         .values(revoked_at=utcnow()))
        return user

    def set_disabled(self, email: str, disabled: bool) -> User:
        """Disable a user (no sign-in; every access token and session of theirs stops working at once) or
        enable them again (their tokens stay revoked: new ones must be made). Repeating is harmless."""
        user = self.get_user_by_email(email)
        now = utcnow()
        with self._engine.begin() as conn:
            if disabled:
                conn.execute(update(users).where(users.c.id == user.id, users.c.disabled_at.is_(None))
                             .values(disabled_at=now))
                conn.execute(update(access_tokens).where(access_tokens.c.user_id == user.id,
                                                         access_tokens.c.revoked_at.is_(None))
                             .values(revoked_at=now))
            else:
                conn.execute(update(users).where(users.c.id == user.id).values(disabled_at=None))
        return user

    # -- access tokens -----------------------------------------------------------------------
    def create_token(self, user: User, name: str = "console", *,
                     kind: TokenKind = API_TOKEN) -> tuple[AccessToken, str]:
        """A new access token (or, with ``kind="session"``, a web session) for ``user``; the secret is
        returned here and never again."""
        try:
            name = clean_name(name)
        except ValueError as exc:
            raise InvalidRequest(f"name: {exc}", field="name") from None
        if len(name) > NAME_MAX:
            raise InvalidRequest(f"name: must be at most {NAME_MAX} characters", field="name")
        secret = secrets.generate(secrets.ACCESS_TOKEN_KIND)
        now = utcnow()
        token = AccessToken(id=new_id("tok"), name=name, prefix=secrets.masked_prefix(secret),
                            created_at=now, last_used_at=None, revoked_at=None, kind=kind,
                            expires_at=self.sessions.expires_at(now, None) if kind == WEB_SESSION else None)
        with self._engine.begin() as conn:
            conn.execute(access_tokens.insert().values(
                id=token.id, user_id=user.id, name=name, token_hash=secrets.hash_secret(secret),
                prefix=token.prefix, created_at=now, kind=kind))
        return token, secret

    def authenticate_token(self, secret: str) -> tuple[User, str]:
        """The user an access token belongs to, and the token's id; Unauthenticated otherwise (also for a
        web session's token: sessions are for the web console only)."""
        return self._authenticate(secret, API_TOKEN)

    def authenticate_session(self, secret: str) -> tuple[User, str]:
        """The user a web session belongs to, and its id; Unauthenticated when it is unknown, revoked,
        past its absolute lifetime or idle for too long, or an API access token."""
        return self._authenticate(secret, WEB_SESSION)

    def _authenticate(self, secret: str, kind: TokenKind) -> tuple[User, str]:
        if not secrets.is_well_formed(secret, secrets.ACCESS_TOKEN_KIND):
            raise Unauthenticated("the access token is malformed")
        with self._engine.connect() as conn:
            row = conn.execute(
                select(users, access_tokens.c.id.label("token_id"), access_tokens.c.revoked_at,
                       access_tokens.c.last_used_at, access_tokens.c.kind,
                       access_tokens.c.created_at.label("token_created_at"))
                .join(access_tokens, access_tokens.c.user_id == users.c.id)
                .where(access_tokens.c.token_hash == secrets.hash_secret(secret))).first()
        # A session's token and an API token look alike; which one it is lives only here, so a stolen
        # session cookie is no bearer token for the API (nor an API token a session).
        if row is None or row.revoked_at is not None or row.kind != kind:
            raise Unauthenticated("the access token is unknown or revoked")
        if row.disabled_at is not None:
            raise Unauthenticated("the account is disabled")
        now = utcnow()
        touch = TOKEN_TOUCH_INTERVAL
        if kind == WEB_SESSION:
            if now >= self.sessions.expires_at(row.token_created_at, row.last_used_at):
                raise Unauthenticated("the session has expired; sign in again")
            touch = self.sessions.touch_interval
        if row.last_used_at is None or now - row.last_used_at > touch:
            with self._engine.begin() as conn:
                conn.execute(update(access_tokens).where(access_tokens.c.id == row.token_id)
                             .values(last_used_at=now))
        return _user(row), row.token_id

    def list_tokens(self, user: User) -> list[AccessToken]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(access_tokens).where(access_tokens.c.user_id == user.id)
                                .order_by(access_tokens.c.created_at.desc(), access_tokens.c.id.desc())).all()
        return [_token(r, self.sessions) for r in rows]

    def revoke_token(self, user: User, token_id: str) -> AccessToken:
        """Revoke one of ``user``'s own tokens; repeating it is harmless."""
        with self._engine.begin() as conn:
            row = conn.execute(select(access_tokens).where(
                access_tokens.c.id == token_id, access_tokens.c.user_id == user.id)).first()
            if row is None:
                raise NotFound(f"no access token {token_id!r}")
            if row.revoked_at is None:
                conn.execute(update(access_tokens).where(access_tokens.c.id == token_id)
                             .values(revoked_at=utcnow()))
                row = conn.execute(select(access_tokens).where(access_tokens.c.id == token_id)).one()
        return _token(row, self.sessions)

    # -- projects ----------------------------------------------------------------------------
    def _check_models(self, models: Iterable[str] | None) -> tuple[str, ...] | None:
        if models is None:
            return None
        known = self._model_ids()
        unknown = sorted(set(models) - known)
        if unknown:
            raise InvalidRequest(f"models: unknown model id(s) {', '.join(map(repr, unknown))}; "
                                 f"known: {', '.join(sorted(known)) or 'none'}", field="models")
        return tuple(dict.fromkeys(models))

    def create_project(self, actor: Actor, body: ProjectCreate) -> Project:
        """A new project, owned by the actor; Conflict ``project_limit_reached`` when a user who is not an
        admin has created ``max_projects_per_user`` already."""
        models = self._check_models(body.models)
        now = utcnow()
        pid = new_id("proj")
        with self._engine.begin() as conn:
            if not actor.user.is_admin:
                self._check_project_quota(conn, actor.user)
            conn.execute(projects.insert().values(id=pid, name=body.name, models=list(models) if models else None,
                                                  created_at=now, updated_at=now, created_by=actor.user.id))
            conn.execute(memberships.insert().values(project_id=pid, user_id=actor.user.id, role="owner",
                                                     created_at=now))
            record(conn, actor, pid, "project.created", "project", pid, {"name": body.name})
        return Project(id=pid, name=body.name, models=models, created_at=now, updated_at=now, role="owner")

    def _check_project_quota(self, conn: Connection, user: User) -> None:
        # The user's row is locked (PostgreSQL; SQLite's writers take turns anyway), so that simultaneous
        # creations are counted one after the other and cannot all pass the check.
        conn.execute(select(users.c.id).where(users.c.id == user.id).with_for_update())
        made = conn.execute(select(func.count()).select_from(projects)
                            .where(projects.c.created_by == user.id)).scalar_one()
        if made >= self.max_projects_per_user:
            raise Conflict(f"you have created {made} projects, the most a user may create "
                           f"(max_projects_per_user = {self.max_projects_per_user}); ask an instance admin "
                           "to raise QUOTAGATE_MAX_PROJECTS_PER_USER", code="project_limit_reached")

    def role_in(self, conn: Connection, actor: Actor, project_id: str, *, lock: bool = False) -> Role:
        """The actor's role in the project; NotFound if it does not exist or they are not in it.

        ``lock`` holds the project's row until the transaction ends (PostgreSQL), so that membership
        changes run one at a time: two owners demoting each other at once cannot leave no owner."""
        query = select(projects.c.id).where(projects.c.id == project_id)
        exists = conn.execute(query.with_for_update() if lock else query).first()
        role = conn.execute(select(memberships.c.role).where(
            memberships.c.project_id == project_id, memberships.c.user_id == actor.user.id)).scalar()
        if exists is None or (role is None and not actor.user.is_admin):
            raise NotFound(f"no project {project_id!r}")
        return "owner" if actor.user.is_admin else cast(Role, role)

    def require(self, conn: Connection, actor: Actor, project_id: str, needed: Role, *, lock: bool = False) -> Role:
        """Like ``role_in``, and Forbidden if the role is below ``needed``."""
        role = self.role_in(conn, actor, project_id, lock=lock)
        if not role_at_least(role, needed):
            raise Forbidden(f"this needs the {needed!r} role in the project; you are {role!r}")
        return role

    def authorize(self, actor: Actor, project_id: str, needed: Role) -> None:
        """NotFound unless the actor can see the project, Forbidden unless their role is at least ``needed``.

        The console API calls this before it reads a request body (see ``KeyService.authorize``)."""
        with self._engine.connect() as conn:
            self.require(conn, actor, project_id, needed)

    def _project(self, conn: Connection, project_id: str, role: Role) -> Project:
        return _project(conn.execute(select(projects).where(projects.c.id == project_id)).one(), role)

    def list_projects(self, actor: Actor, *, limit: int | None = None, before: str | None = None) -> list[Project]:
        """The actor's projects (every project for an admin), newest first, in one query: at most ``limit``
        of them, those after project ``before`` (a cursor: the last id of the previous page)."""
        admin = actor.user.is_admin
        if admin:
            query = select(projects, literal("owner").label("role"))
        else:
            query = (select(projects, memberships.c.role)
                     .join(memberships, memberships.c.project_id == projects.c.id)
                     .where(memberships.c.user_id == actor.user.id))
        with self._engine.connect() as conn:
            if before is not None:
                cursor = conn.execute(query.with_only_columns(projects.c.created_at)
                                      .where(projects.c.id == before)).first()
                if cursor is None:
                    raise InvalidRequest(f"before: no project {before!r} of yours", field="before")
                query = query.where(or_(projects.c.created_at < cursor.created_at,
                                        and_(projects.c.created_at == cursor.created_at, projects.c.id < before)))
            query = query.order_by(projects.c.created_at.desc(), projects.c.id.desc())
            rows = conn.execute(query if limit is None else query.limit(limit)).all()
        return [_project(row, cast(Role, row.role)) for row in rows]

    def get_project(self, actor: Actor, project_id: str) -> Project:
        with self._engine.connect() as conn:
            return self._project(conn, project_id, self.role_in(conn, actor, project_id))

    def update_project(self, actor: Actor, project_id: str, body: ProjectUpdate) -> Project:
        """Change the fields present in ``body`` (owners only); ``None`` clears a limit, and clearing
        ``token_limit`` clears its period too. A change of models or limits reaches every key of the project
        (their cached records are reloaded, on every instance)."""
        fields = set(body.model_fields_set)
        if not fields:
            raise InvalidRequest("nothing to change: give at least one of name, models, " + ", ".join(PROJECT_LIMITS))
        if "name" in fields and body.name is None:
            raise InvalidRequest("name: must not be null", field="name")
        changes = body.model_dump(include=fields)
        after_commit: Callable[[], None] | None = None
        with self._engine.begin() as conn:
            role = self.require(conn, actor, project_id, "owner", lock=True)
            values: dict[str, Any] = {"updated_at": utcnow()}
            if "name" in fields:
                values["name"] = body.name
            if "models" in fields:
                models = self._check_models(body.models)
                values["models"] = list(models) if models is not None else None
            limits = {f: changes[f] for f in PROJECT_LIMITS if f in fields}
            before: dict[str, Any] = {}
            if limits:
                row = conn.execute(select(projects).where(projects.c.id == project_id)).one()
                if "token_limit" in limits and limits["token_limit"] is None and "token_limit_period" not in limits:
                    limits["token_limit_period"] = None  # clearing the budget clears its period too
                check_budget_pair(limits.get("token_limit", row.token_limit),
                                  limits.get("token_limit_period", row.token_limit_period))
                before = {f: getattr(row, f) for f in sorted(limits)}
                values.update(limits)
            conn.execute(update(projects).where(projects.c.id == project_id).values(**values))
            details: dict[str, Any] = {k: changes[k] for k in sorted(fields) if k not in PROJECT_LIMITS}
            if limits:
                details["limits"] = {"before": before, "after": {f: limits[f] for f in sorted(limits)}}
            record(conn, actor, project_id, "project.edited", "project", project_id, details)
            if "models" in fields or limits:
                after_commit = self._on_models_changed(conn, project_id)
            project = self._project(conn, project_id, role)
        if after_commit is not None:
            after_commit()
        return project

    # -- members -----------------------------------------------------------------------------
    # A member is added by email as an *invitation* (``pending_memberships``), whether or not the email
    # has an account: nothing is granted until the invited user accepts it (``accept_invitation``), and
    # the answer is the same either way (for an email without an account, the invitation is kept under
    # the user id that user will get). A project's member list shows invitations with status "invited";
    # their role can be changed and they can be removed (withdrawn) like members. Only members who
    # accepted count as the project's owners.

    @staticmethod
    def _all_members(project_id: str) -> Any:
        """Every member of the project, users' and pending: user_id, email, role, created_at, pending."""
        real = (select(memberships.c.user_id, users.c.email, memberships.c.role, memberships.c.created_at,
                       literal(False).label("pending"))
                .join(users, users.c.id == memberships.c.user_id)
                .where(memberships.c.project_id == project_id))
        waiting = (select(pending_memberships.c.user_id, pending_memberships.c.email, pending_memberships.c.role,
                          pending_memberships.c.created_at, literal(True).label("pending"))
                   .where(pending_memberships.c.project_id == project_id))
        return union_all(real, waiting).subquery("members")

    def list_members(self, actor: Actor, project_id: str) -> list[Member]:
        with self._engine.connect() as conn:
            self.role_in(conn, actor, project_id)
            every = self._all_members(project_id)
            rows = conn.execute(select(every).order_by(every.c.email)).all()
        return [Member(user_id=r.user_id, email=r.email, role=r.role, created_at=r.created_at,
                       status="invited" if r.pending else "active") for r in rows]

    def add_member(self, actor: Actor, project_id: str, body: MemberAdd) -> Member:
        """Invite the email's user (or the user that email will have) to the project with a role; they are a
        member once they accept. Both cases answer the same invited Member (the user id being the one the
        user has or will have), with the same queries in the same order."""
        email = normalise_email(body.email)
        with self._engine.begin() as conn:
            self.require(conn, actor, project_id, "owner", lock=True)
            _lock_email(conn, email)
            found = conn.execute(select(
                select(users.c.id).where(users.c.email == email).scalar_subquery().label("user_id"),
                select(func.min(pending_memberships.c.user_id)).where(pending_memberships.c.email == email)
                .scalar_subquery().label("reserved_id"))).one()
            user_id: str = found.user_id or found.reserved_id or new_id("usr")
            every = self._all_members(project_id)
            existing = conn.execute(select(every.c.role).where(
                or_(every.c.user_id == user_id, every.c.email == email))).scalar()
            if existing is not None:
                raise Conflict(f"{email} is already a member (role {existing!r}); "
                               "change the role with PATCH", field="email")
            now = utcnow()
            conn.execute(pending_memberships.insert().values(project_id=project_id, email=email,
                                                             user_id=user_id, role=body.role, created_at=now))
            record(conn, actor, project_id, "member.added", "user", user_id, {"email": email, "role": body.role})
        return Member(user_id=user_id, email=email, role=body.role, created_at=now, status="invited")

    def _owners(self, conn: Connection, project_id: str) -> int:
        # Only owners who accepted hold the project (an invitation may never be accepted).
        return int(conn.execute(select(func.count()).select_from(memberships).where(
            memberships.c.project_id == project_id, memberships.c.role == "owner")).scalar_one())

    # -- invitations, seen by the invited user ---------------------------------------------------
    def list_invitations(self, user: User) -> list[Invitation]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(pending_memberships, projects.c.name)
                                .join(projects, projects.c.id == pending_memberships.c.project_id)
                                .where(pending_memberships.c.email == user.email)
                                .order_by(pending_memberships.c.created_at)).all()
        return [Invitation(project_id=r.project_id, project_name=r.name, role=r.role, invited_at=r.created_at)
                for r in rows]

    def _invitation(self, conn: Connection, user: User, project_id: str) -> Any:
        row = conn.execute(select(pending_memberships).where(
            pending_memberships.c.project_id == project_id, pending_memberships.c.email == user.email)
            .with_for_update()).first()
        if row is None:
            raise NotFound(f"no invitation to project {project_id!r}")
        return row

    def accept_invitation(self, actor: Actor, project_id: str) -> Project:
        """Join the project with the role the invitation gives; the answer is the project as now seen."""
        with self._engine.begin() as conn:
            row = self._invitation(conn, actor.user, project_id)
            conn.execute(pending_memberships.delete().where(pending_memberships.c.project_id == project_id,
                                                            pending_memberships.c.email == actor.user.email))
            conn.execute(memberships.insert().values(project_id=project_id, user_id=actor.user.id, role=row.role,
                                                     created_at=utcnow()))
            record(conn, actor, project_id, "member.joined", "user", actor.user.id,
                   {"email": actor.user.email, "role": row.role})
            return self._project(conn, project_id, "owner" if actor.user.is_admin else row.role)

    def decline_invitation(self, actor: Actor, project_id: str) -> None:
        with self._engine.begin() as conn:
            row = self._invitation(conn, actor.user, project_id)
            conn.execute(pending_memberships.delete().where(pending_memberships.c.project_id == project_id,
                                                            pending_memberships.c.email == actor.user.email))
            record(conn, actor, project_id, "member.declined", "user", actor.user.id,
                   {"email": actor.user.email, "role": row.role})

    def _membership(self, conn: Connection, project_id: str, user_id: str) -> Any:
        every = self._all_members(project_id)
        row = conn.execute(select(every).where(every.c.user_id == user_id)).first()
        if row is None:
            raise NotFound(f"no member {user_id!r} in this project")
        return row

    @staticmethod
    def _table_of(row: Any, project_id: str, user_id: str) -> tuple[Any, Any]:
        """The table a member's row is in, and the condition that picks it."""
        if row.pending:
            return pending_memberships, and_(pending_memberships.c.project_id == project_id,
                                             pending_memberships.c.user_id == user_id)
        return memberships, and_(memberships.c.project_id == project_id, memberships.c.user_id == user_id)

    def change_member(self, actor: Actor, project_id: str, user_id: str, body: MemberUpdate) -> Member:
        with self._engine.begin() as conn:
            self.require(conn, actor, project_id, "owner", lock=True)
            row = self._membership(conn, project_id, user_id)
            if not row.pending and row.role == "owner" and body.role != "owner" and self._owners(conn, project_id) <= 1:
                raise Conflict("a project must keep at least one owner; make someone else owner first")
            table, where = self._table_of(row, project_id, user_id)
            conn.execute(update(table).where(where).values(role=body.role))
            record(conn, actor, project_id, "member.role_changed", "user", user_id,
                   {"email": row.email, "from": row.role, "to": body.role})
        return Member(user_id=user_id, email=row.email, role=body.role, created_at=row.created_at,
                      status="invited" if row.pending else "active")

    def remove_member(self, actor: Actor, project_id: str, user_id: str) -> None:
        with self._engine.begin() as conn:
            # Anyone may leave a project; removing others takes an owner.
            needed: Role = "viewer" if user_id == actor.user.id else "owner"
            self.require(conn, actor, project_id, needed, lock=True)
            row = self._membership(conn, project_id, user_id)
            if not row.pending and row.role == "owner" and self._owners(conn, project_id) <= 1:
                raise Conflict("a project must keep at least one owner; make someone else owner first")
            table, where = self._table_of(row, project_id, user_id)
            conn.execute(table.delete().where(where))
            record(conn, actor, project_id, "member.removed", "user", user_id,
                   {"email": row.email, "role": row.role})
