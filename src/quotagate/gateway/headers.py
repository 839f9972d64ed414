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


def from_state(state: LimitState) -> Headers:
    """Headers for an authenticated response that was not admitted (400/403/404, /v1/models).

    The state has no per-entry times, so a reset is given as the longest it can be: a full window
    while anything is in it, the period's end for an exhausted budget.
    """
    out: Headers = []
    if state.rpm is not None:
        used = state.requests_in_window
        out.append((b"x-ratelimit-limit-requests", b"%d" % state.rpm))
        out.append((b"x-ratelimit-remaining-requests", b"%d" % max(0, state.rpm - used)))
        out.append((b"x-ratelimit-reset-requests", duration(WINDOW if used else 0.0)))
    # Mirror the limiter's admissions: tpm when the key has one, else the budget.
    if state.tpm is not None:
        used = state.tokens_in_window
        out.append((b"x-ratelimit-limit-tokens", b"%d" % state.tpm))
        out.append((b"x-ratelimit-remaining-tokens", b"%d" % max(0, state.tpm - used)))
        out.append((b"x-ratelimit-reset-tokens", duration(WINDOW if used else 0.0)))
    elif state.budget is not None:
        b = state.budget
        out.append((b"x-ratelimit-limit-tokens", b"%d" % b.limit))
        out.append((b"x-ratelimit-remaining-tokens", b"%d" % b.remaining))
        out.append((b"x-ratelimit-reset-tokens", duration(max(0.0, b.resets_at - time.time()))))
    if state.budget is not None:
        _budget(out, state.budget)
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
