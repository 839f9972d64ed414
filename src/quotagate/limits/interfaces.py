"""The limiter's contract: one atomic "check and reserve" per request, one "settle" after it.

Definitions (CONTRACT §4), for one inference key:

- ``rpm``: in no rolling 60-second window are more than ``rpm`` requests admitted. A request counts at
  the moment it is admitted, and keeps counting for 60 s whatever happens to it afterwards.
- ``tpm``: in no rolling 60-second window do the tokens of admitted requests exceed ``tpm``. A request's
  tokens count at its admission time: first its reservation, then, once settled, its actual usage.
- ``token_limit`` per ``token_limit_period``: a hard budget over calendar periods in UTC (minute, hour,
  day, week starting Monday, month). ``used`` (settled) + ``reserved`` (in flight) never exceeds the limit.

The same limits may also be set on a key for one model, and on a project (shared by all of its keys):
each set is a *scope* (``keys.models.Scope``), and an admission checks and reserves in every scope that
applies to it (the key's, the key's for the request's model, the project's) at once: the tightest wins,
and the refusal names the scope that bound it (``Admission.scope``).

``admit`` is atomic over its scopes: two concurrent admissions can never both take the last slot or tokens.
It reserves ``prompt_tokens + granted`` tokens, where ``granted`` (the completion allowance) is
``max_completion`` lowered to what tpm and the budget still allow; if that is below ``min_completion``
the request is refused and nothing is reserved or counted. Refused requests are never charged.

``extend`` grows a reservation while its request runs (a stream reserves its completion block by block,
as it is generated, instead of its worst case up front); it takes only what tpm and the budget still
allow, so concurrent requests are not refused for tokens nobody will spend.

``settle`` replaces a reservation by the actual tokens (which may be 0 for a failed request); it is
idempotent per reservation. The Redis backend applies it asynchronously (queued, then sent with this
instance's next admission or a moment later), so the same instance always sees it, others within
milliseconds. Keys with no limits at all are admitted without any state being kept.
``admit`` and ``state`` raise ``limits.errors.LimiterUnavailable`` when the shared backend cannot be
reached and its failure policy refuses blind admissions (the LLM API answers 503).
Backends: ``memory`` (one process) and ``redis`` (shared by many instances, Redis's clock).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from quotagate.keys.models import KeyRecord, ScopeKind

# ``key_revoked``: the key was revoked (its record says so, or, with Redis, another instance marked it);
# the LLM API answers it with 401 ``key_revoked``, the other two with 429.
Refusal = Literal["rate_limit_exceeded", "token_limit_exceeded", "key_revoked"]


@dataclass(frozen=True, slots=True)
class Budget:
    """The state of a key's budget in the current period."""

    limit: int
    period: str
    used: int          # settled tokens in the period
    reserved: int      # tokens of requests still in flight
    resets_at: float   # Unix time the period ends

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used - self.reserved)


@dataclass(frozen=True, slots=True)
class Admission:
    """The outcome of ``admit``: admitted with a reservation, or refused with a reason."""

    admitted: bool
    reservation: str | None = None        # opaque id to settle with; None when refused or nothing to track
    reserved_tokens: int = 0              # prompt_tokens + granted
    granted: int | None = None            # completion allowance (None: no token limits, client's own max)
    refusal: Refusal | None = None
    retry_after: float = 0.0              # seconds until a retry could succeed (on refusal)
    # For the x-ratelimit-* headers (None where the key has no such limit):
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests: float | None = None   # seconds until a request slot frees up
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens: float | None = None     # seconds until tokens free up
    budget: Budget | None = None
    # The scope whose limit refused the request (of a refusal): "key", "model" (the key's limits for the
    # request's model) or "project" (the project's, shared by its keys).
    scope: ScopeKind | None = None


@dataclass(frozen=True, slots=True)
class LimitState:
    """A key's live limit state, for the usage API (nothing is reserved by reading it): its own limits'
    figures, and those of its project's limits and of its per-model limits where it has them."""

    rpm: int | None
    requests_in_window: int
    tpm: int | None
    tokens_in_window: int
    budget: Budget | None
    project: LimitState | None = None
    models: dict[str, LimitState] | None = None


class Limiter(Protocol):
    async def admit(self, key: KeyRecord, prompt_tokens: int, max_completion: int,
                    min_completion: int = 1, model: str | None = None) -> Admission:
        """Check every limit of ``key`` (``key.scopes(model)``: its own, its limits for ``model``, its
        project's) and, if all allow, count the request and reserve its tokens in each, atomically."""

    async def extend(self, key: KeyRecord, admission: Admission, tokens: int) -> int:
        """Add up to ``tokens`` to the admission's reservation, as far as ``key``'s tpm (if the admission is
        still in the window) and the budget of its period allow, checked and reserved atomically as ``admit``
        does; returns how many were added (0: none left, or the reservation is settled or unknown)."""

    async def settle(self, key: KeyRecord, admission: Admission, actual_tokens: int) -> None:
        """Replace the admission's reservation by ``actual_tokens``; a second call does nothing."""

    async def state(self, key: KeyRecord) -> LimitState:
        """The key's current windows and budget, without changing them."""

    async def close(self) -> None:
        """Release connections and background tasks."""
