"""Records of inference keys: the API's key object and the gateway's frozen key record."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address
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
    allowed_networks: tuple[str, ...] | None = None
    metadata: dict[str, str] | None = None

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
            "allowed_networks": list(self.allowed_networks) if self.allowed_networks is not None else None,
            "metadata": dict(self.metadata) if self.metadata is not None else None,
        }


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What the gateway needs to admit a request, resolved once and cached; plain data, no ORM.

    ``models`` is the set of model ids the key may call (its ``allowed_models`` within its project's
    models), or None for every model in the catalog. ``networks``: its ``allowed_networks``, parsed.
    Times are Unix seconds.
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
    networks: tuple[IPv4Network | IPv6Network, ...] | None = None  # where it may be used from (None: anywhere)

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def allows(self, address: str | None) -> bool:
        """Whether a request from ``address`` may use the key (its ``allowed_networks``)."""
        if self.networks is None:
            return True
        if address is None:
            return False
        try:
            ip = ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:10.1.2.3 on a dual-stack socket is 10.1.2.3
        return any(ip in net for net in self.networks)
