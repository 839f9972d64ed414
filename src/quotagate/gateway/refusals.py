"""What a refused admission tells the client: which limit, whether and when a retry can succeed.

Three kinds of refusal, because clients (every OpenAI SDK) act on ``Retry-After`` and ``x-should-retry``:

- **Used up**: the budget's settled tokens leave no room for the request. ``Retry-After`` is the end of
  the period; ``x-should-retry: false`` unless that is within a minute.
- **Held in flight**: the settled tokens leave room, but requests still in flight have reserved it.
  They settle at their real usage, mostly lower, within moments: a short ``Retry-After``, retryable.
- **Never fits**: the request alone needs more than the key's whole tpm or budget (its prompt and one
  completion token). No wait helps: ``x-should-retry: false``, and the message says by how much.

rpm and tpm windows free up within a minute by definition: their ``Retry-After`` is the limiter's
(when enough of the window has left it), retryable.
"""

from __future__ import annotations

from datetime import UTC, datetime

from quotagate.gateway.errors import ApiError
from quotagate.keys.models import KeyRecord, Scope
from quotagate.limits.interfaces import Admission

# Requests in flight settle within a stream's or an answer's time; a second is a polite first wait, and the
# SDKs back off further by themselves if the next try is refused too.
IN_FLIGHT_RETRY = 1.0


def refusal_error(key: KeyRecord, adm: Admission, need: int, model: str | None) -> ApiError:
    """The 429 for a refused admission; ``need`` is the least the request could be admitted with, ``model``
    the request's model (whose per-model limits may be the ones that refused it).

    The message and ``param`` name the limits that bound it: the key's own (``param`` the limit's field),
    the key's for the model (``model_limits``) or the project's, shared by its keys (``project``)."""
    scope = _bound(key, adm, model)
    if scope is None:
        whose, of, target, rpm, tpm = "This key's", "", "this key", key.rpm, key.tpm
        params = ("rpm", "tpm", "token_limit")
    elif scope.kind == "model":
        whose, of, rpm, tpm = "This key's", f" for the model '{scope.model}'", scope.rpm, scope.tpm
        target, params = f"this key on the model '{scope.model}'", ("model_limits",) * 3
    else:
        whose, of, rpm, tpm = "This project's", " (shared by all of its keys)", scope.rpm, scope.tpm
        target, params = "this project (its limits are shared by all of its keys)", ("project",) * 3
    budget = adm.budget
    if adm.refusal == "token_limit_exceeded" and budget is not None:
        per = f"per {budget.period}"
        resets = datetime.fromtimestamp(budget.resets_at, UTC).isoformat().replace("+00:00", "Z")
        if need > budget.limit:
            return ApiError(429, "token_limit_exceeded",
                            f"This request needs at least {need} tokens (its prompt and one completion token), "
                            f"{need - budget.limit} more than {whose.lower()} whole token budget{of} of "
                            f"{budget.limit} {per}: it can never be admitted. Shorten the prompt, or raise the budget.",
                            param=params[2], retry_after=adm.retry_after, should_retry=False)
        if budget.limit - budget.used < need:
            return ApiError(429, "token_limit_exceeded",
                            f"{whose} token budget{of} for the current {budget.period} is used up: {budget.used} "
                            f"of {budget.limit} tokens used, and this request needs at least {need}. It resets "
                            f"at {resets}.", param=params[2], retry_after=adm.retry_after)
        wait = max(IN_FLIGHT_RETRY, _window_wait(rpm, tpm, adm, need))
        return ApiError(429, "token_limit_exceeded",
                        f"{whose} token budget{of} for the current {budget.period} is held by requests in flight "
                        f"({budget.reserved} tokens reserved, {budget.used} of {budget.limit} used); they settle "
                        "at their real usage shortly. Retry in a moment.",
                        param=params[2], retry_after=wait, should_retry=True)
    if tpm is not None and need > tpm:
        return ApiError(429, "rate_limit_exceeded",
                        f"This request needs at least {need} tokens (its prompt and one completion token), "
                        f"{need - tpm} more than {whose.lower()} limit{of} of {tpm} tokens per minute: it can "
                        "never be admitted. Shorten the prompt, or raise the limit.",
                        param=params[1], retry_after=60.0, should_retry=False)
    requests = _rpm_full(rpm, adm)
    which = "requests per minute" if requests else "tokens per minute"
    return ApiError(429, "rate_limit_exceeded", f"Rate limit reached for {target} ({which}).",
                    param=params[0] if requests else params[1], retry_after=adm.retry_after)


def _bound(key: KeyRecord, adm: Admission, model: str | None) -> Scope | None:
    """The scope that refused the admission (None for the key's own, or if unknown)."""
    if adm.scope is None or adm.scope == "key":
        return None
    return next((s for s in key.scopes(model) if s.kind == adm.scope), None)


def _rpm_full(rpm: int | None, adm: Admission) -> bool:
    return rpm is not None and adm.remaining_requests == 0


def _window_wait(rpm: int | None, tpm: int | None, adm: Admission, need: int) -> float:
    """Seconds until the rpm or tpm window could let the request in too (0 if neither holds it)."""
    wait = 0.0
    if _rpm_full(rpm, adm):
        wait = adm.reset_requests or 0.0
    if tpm is not None and adm.remaining_tokens is not None and adm.remaining_tokens < need:
        wait = max(wait, adm.reset_tokens or 0.0)
    return wait
