"""Records of inference keys: the API's key object and the gateway's frozen key record."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any, Literal

from quotagate.ids import isoformat

Period = Literal["minute", "hour", "day", "week", "month"]
PERIODS: tuple[Period, ...] = ("minute", "hour", "day", "week", "month")
Status = Literal["active", "revoked", "expired"]


ScopeKind = Literal["key", "model", "project"]


@dataclass(frozen=True, slots=True)
class Limits:
    """One set of limits: a key's own, a key's for one model, or a project's (shared by its keys)."""

    rpm: int | None = None
    tpm: int | None = None
    token_limit: int | None = None
    token_limit_period: Period | None = None

    def __bool__(self) -> bool:
        return not (self.rpm is None and self.tpm is None
                    and (self.token_limit is None or self.token_limit_period is None))

    def to_json(self) -> dict[str, Any]:
        return {"rpm": self.rpm, "tpm": self.tpm, "token_limit": self.token_limit,
                "token_limit_period": self.token_limit_period}


@dataclass(frozen=True, slots=True)
class Scope:
    """What one set of limits is counted against, as the limiter sees it.

    ``id`` names its counters (the key's id; the project's id; ``<key id> <model>`` for a key's limits on
    one model: model ids have no blanks); ``tag`` is the id whose Redis hash tag they share (the key's or
    the project's), ``model`` the model of a per-model scope. ``limit``/``period``: both or neither.
    """

    id: str
    kind: ScopeKind
    tag: str
    rpm: int | None
    tpm: int | None
    limit: int | None
    period: Period | None
    model: str | None = None


def _scope(kind: ScopeKind, scope_id: str, tag: str, limits: Limits, model: str | None = None) -> Scope:
    budgeted = limits.token_limit is not None and limits.token_limit_period is not None
    return Scope(scope_id, kind, tag, limits.rpm, limits.tpm, limits.token_limit if budgeted else None,
                 limits.token_limit_period if budgeted else None, model)


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
    model_limits: dict[str, Limits] | None = None

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
            "model_limits": ({m: lim.to_json() for m, lim in self.model_limits.items()}
                             if self.model_limits is not None else None),
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
    # The project's limits, shared by all of its keys (None: it has none); the key's limits per model.
    project_limits: Limits | None = None
    model_limits: dict[str, Limits] | None = field(default=None, hash=False)
    # What the limiter counts a request against, worked out once per record (see ``scopes``).
    _scopes: tuple[Scope, ...] = field(init=False, repr=False, compare=False)
    _model_scopes: dict[str, tuple[Scope, ...]] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        base: list[Scope] = []
        own = Limits(self.rpm, self.tpm, self.token_limit, self.token_limit_period)
        if own:
            base.append(_scope("key", self.id, self.id, own))
        project = [_scope("project", self.project_id, self.project_id, self.project_limits)] \
            if self.project_limits else []
        by_model = None
        if self.model_limits:
            by_model = {model: (*base, _scope("model", f"{self.id} {model}", self.id, lim, model), *project)
                        for model, lim in self.model_limits.items() if lim}
        object.__setattr__(self, "_scopes", (*base, *project))
        object.__setattr__(self, "_model_scopes", by_model or None)

    def scopes(self, model: str | None = None) -> tuple[Scope, ...]:
        """The limits a request for ``model`` is admitted against, in order: the key's own, the key's for
        that model, the project's. Empty for a key without any (it is admitted without any state kept)."""
        by_model = self._model_scopes
        if by_model is not None and model is not None:
            return by_model.get(model, self._scopes)
        return self._scopes

    def limits_tokens(self, model: str | None = None) -> bool:
        """Whether a request for ``model`` is bound by a tpm or a token budget (of any of its scopes)."""
        return any(s.tpm is not None or s.limit is not None for s in self.scopes(model))

    def limits_requests(self) -> bool:
        """Whether the key or its project has an rpm (what a request refused before admission counts against)."""
        return any(s.rpm is not None for s in self._scopes)

    def all_scopes(self) -> tuple[Scope, ...]:
        """Every scope of the key, whatever the model: its own, one per model it has limits for, the project's."""
        if self._model_scopes is None:
            return self._scopes
        models = [s for scopes in self._model_scopes.values() for s in scopes if s.kind == "model"]
        own = [s for s in self._scopes if s.kind == "key"]
        project = [s for s in self._scopes if s.kind == "project"]
        return (*own, *models, *project)

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
