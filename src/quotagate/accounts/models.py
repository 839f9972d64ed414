"""Plain records of the accounts domain: users, actors, projects, roles."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from quotagate.ids import isoformat, utcnow

MemberStatus = Literal["active", "invited"]
Role = Literal["owner", "member", "viewer"]
TokenKind = Literal["api", "session"]  # a console API access token, or a web console session
ROLES: tuple[Role, ...] = ("viewer", "member", "owner")  # in rising order of power


def role_at_least(role: Role, needed: Role) -> bool:
    return ROLES.index(role) >= ROLES.index(needed)


@dataclass(frozen=True, slots=True)
class User:
    id: str
    email: str
    is_admin: bool
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "user", "email": self.email, "is_admin": self.is_admin,
                "created_at": isoformat(self.created_at)}


@dataclass(frozen=True, slots=True)
class Actor:
    """Who is calling, and from where: every write is recorded against this."""

    user: User
    client_ip: str | None = None
    user_agent: str | None = None
    token_id: str | None = None


@dataclass(frozen=True, slots=True)
class Project:
    id: str
    name: str
    models: tuple[str, ...] | None
    created_at: datetime
    updated_at: datetime
    role: Role  # the caller's role in it (admins see "owner")
    # The project's own limits, shared by all of its keys (None: that limit is not set).
    rpm: int | None = None
    tpm: int | None = None
    token_limit: int | None = None
    token_limit_period: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "project", "name": self.name,
                "models": list(self.models) if self.models is not None else None,
                "rpm": self.rpm, "tpm": self.tpm, "token_limit": self.token_limit,
                "token_limit_period": self.token_limit_period,
                "role": self.role, "created_at": isoformat(self.created_at),
                "updated_at": isoformat(self.updated_at)}


@dataclass(frozen=True, slots=True)
class Member:
    user_id: str
    email: str
    role: Role
    created_at: datetime
    status: MemberStatus = "active"   # "invited": added, not yet accepted (no access until then)

    def to_json(self) -> dict[str, Any]:
        return {"object": "project_member", "user_id": self.user_id, "email": self.email,
                "role": self.role, "status": self.status, "created_at": isoformat(self.created_at)}


@dataclass(frozen=True, slots=True)
class Invitation:
    """A project's invitation to the user who reads it."""

    project_id: str
    project_name: str
    role: Role
    invited_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {"object": "invitation", "project_id": self.project_id, "project_name": self.project_name,
                "role": self.role, "invited_at": isoformat(self.invited_at)}


@dataclass(frozen=True, slots=True)
class AccessToken:
    id: str
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    kind: TokenKind = "api"
    expires_at: datetime | None = None  # sessions only: the earlier of the absolute and the idle expiry

    @property
    def status(self) -> str:
        if self.revoked_at:
            return "revoked"
        return "expired" if self.expires_at is not None and self.expires_at <= utcnow() else "active"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "access_token", "name": self.name, "prefix": self.prefix,
                "kind": self.kind, "status": self.status,
                "created_at": isoformat(self.created_at), "last_used_at": isoformat(self.last_used_at),
                "expires_at": isoformat(self.expires_at), "revoked_at": isoformat(self.revoked_at)}
