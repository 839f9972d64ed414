"""Records of inference keys: the API's key object and the gateway's frozen key record."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from quotagate.ids import isoformat

Period = Literal["minute", "hour", "day", "week", "month"]
PERIODS: tuple[Period, ...] = ("minute", "hour", "day", "week", "month")
Status = Literal["active", "revoked", "expired"]


@dataclass(frozen=True, slots=True)
class InferenceKey:
    """A key as the console API shows it (never with its secret)."""

    id: str
    project_id: str
    name: str
    prefix: str
    rpm: int | None
    tpm: int | None
    token_limit: int | None
    token_limit_period: Period | None
    allowed_models: tuple[str, ...] | None
    expires_at: datetime | None
    revoked_at: datetime | None
    archived: bool
    created_at: datetime
    updated_at: datetime
    last_used_at: datetime | None
    rotated_from: str | None

    def status(self, now: datetime) -> Status:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def to_json(self, now: datetime) -> dict[str, Any]:
        return {
            "id": self.id, "object": "inference_key", "project_id": self.project_id, "name": self.name,
            "prefix": self.prefix, "rpm": self.rpm, "tpm": self.tpm, "token_limit": self.token_limit,
            "token_limit_period": self.token_limit_period,
            "allowed_models": list(self.allowed_models) if self.allowed_models is not None else None,
            "expires_at": isoformat(self.expires_at), "status": self.status(now), "archived": self.archived,
            "created_at": isoformat(self.created_at), "updated_at": isoformat(self.updated_at),
            "revoked_at": isoformat(self.revoked_at), "last_used_at": isoformat(self.last_used_at),
            "rotated_from": self.rotated_from,
        }


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What the gateway needs to admit a request, resolved once and cached; plain data, no ORM.

    ``models`` is the set of model ids the key may call (its ``allowed_models`` within its project's
    models), or None for every model in the catalog. Times are Unix seconds.
    """

    id: str
    project_id: str
    secret_hash: str
    rpm: int | None
    tpm: int | None
    token_limit: int | None
    token_limit_period: Period | None
    models: frozenset[str] | None
    expires_at: float | None
    revoked: bool
    version: int

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models
