"""OpenAI's ``x-ratelimit-*`` headers, from an admission or from a key's limit state."""

from __future__ import annotations

import math
import time

from quotagate.limits.interfaces import Admission, Budget, LimitState

Headers = list[tuple[bytes, bytes]]

WINDOW = 60.0


def duration(seconds: float) -> bytes:
    """A reset duration the way OpenAI writes it (Go's format): ``20ms``, ``1s``, ``6m0s``, ``1h2m3.5s``."""
    if seconds <= 0:
        return b"0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms".encode()
    seconds = round(seconds, 3)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}".encode()
    if minutes:
        return f"{int(minutes)}m{text}".encode()
    return text.encode()


def from_admission(adm: Admission) -> Headers:
    out: Headers = []
    if adm.limit_requests is not None:
        out.append((b"x-ratelimit-limit-requests", b"%d" % adm.limit_requests))
        out.append((b"x-ratelimit-remaining-requests", b"%d" % max(0, adm.remaining_requests or 0)))
        out.append((b"x-ratelimit-reset-requests", duration(adm.reset_requests or 0.0)))
    if adm.limit_tokens is not None:
        out.append((b"x-ratelimit-limit-tokens", b"%d" % adm.limit_tokens))
        out.append((b"x-ratelimit-remaining-tokens", b"%d" % max(0, adm.remaining_tokens or 0)))
        out.append((b"x-ratelimit-reset-tokens", duration(adm.reset_tokens or 0.0)))
    if adm.budget is not None:
        _budget(out, adm.budget)
    return out


def _budget(out: Headers, budget: Budget) -> None:
    """The budget's own headers (``x-ratelimit-*-tokens`` are the tpm's on a key that has one, as OpenAI's
    mean per minute; a key with a budget only gets the budget in both)."""
    out.append((b"x-ratelimit-limit-budget", b"%d" % budget.limit))
    out.append((b"x-ratelimit-remaining-budget", b"%d" % budget.remaining))
    out.append((b"x-ratelimit-reset-budget", duration(max(0.0, budget.resets_at - time.time()))))


def from_state(state: LimitState, model: str | None = None) -> Headers:
    """Headers for an authenticated response that was not admitted (400/403/404, /v1/models).

    The state has no per-entry times, so a reset is given as the longest it can be: a full window
    while anything is in it, the period's end for an exhausted budget. Of the key's own limits, its
    project's and its limits for ``model``, each header shows the one with the least left (as admissions do).
    """
    scopes = [state]
    if state.project is not None:
        scopes.append(state.project)
    if model is not None and state.models is not None and model in state.models:
        scopes.append(state.models[model])
    now = time.time()
    requests: tuple[int, int, float] | None = None   # limit, remaining, reset
    tokens: tuple[int, int, float] | None = None
    budget: Budget | None = None
    for s in scopes:
        if s.rpm is not None:
            used = s.requests_in_window
            if requests is None or s.rpm - used < requests[1]:
                requests = (s.rpm, max(0, s.rpm - used), WINDOW if used else 0.0)
        # Mirror the limiter's admissions: tpm where there is one, else the budget.
        if s.tpm is not None:
            used = s.tokens_in_window
            if tokens is None or s.tpm - used < tokens[1]:
                tokens = (s.tpm, max(0, s.tpm - used), WINDOW if used else 0.0)
        elif s.budget is not None and (tokens is None or s.budget.remaining < tokens[1]):
            tokens = (s.budget.limit, s.budget.remaining, max(0.0, s.budget.resets_at - now))
        if s.budget is not None and (budget is None or s.budget.remaining < budget.remaining):
            budget = s.budget
    out: Headers = []
    if requests is not None:
        out.append((b"x-ratelimit-limit-requests", b"%d" % requests[0]))
        out.append((b"x-ratelimit-remaining-requests", b"%d" % requests[1]))
        out.append((b"x-ratelimit-reset-requests", duration(requests[2])))
    if tokens is not None:
        out.append((b"x-ratelimit-limit-tokens", b"%d" % tokens[0]))
        out.append((b"x-ratelimit-remaining-tokens", b"%d" % tokens[1]))
        out.append((b"x-ratelimit-reset-tokens", duration(tokens[2])))
    if budget is not None:
        _budget(out, budget)
    return out


SSE: Headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


def processing_ms(t0: float) -> tuple[bytes, bytes]:
    """OpenAI's ``openai-processing-ms``: the time from the request's arrival (``perf_counter`` ``t0``) to
    its answer's head."""
    return b"openai-processing-ms", b"%d" % ((time.perf_counter() - t0) * 1000)


def retry_after(seconds: float) -> Headers:
    """``Retry-After`` in whole seconds (at least 1), and the SDKs' finer ``retry-after-ms``."""
    return [(b"retry-after", b"%d" % max(1, math.ceil(seconds))),
            (b"retry-after-ms", b"%d" % max(1, math.ceil(seconds * 1000)))]
