"""The control channel between the parent and one worker: a Unix socketpair carrying one JSON array per
line (orjson never writes a raw newline), in both directions.

Worker to parent::

    [ADMIT,  key..., prompt_tokens, max_completion, min_completion]   -> a reply
    [EXTEND, key..., reservation, tokens]                             -> a reply
    [STATE,  key...]                                                  -> a reply
    [SETTLE, key_id, reservation, actual_tokens]                      (no reply)
    [EVENT,  key_id, secret_hash, project_id]                         a key change made in the worker
    [ACK,    seq]                                                     the parent's event ``seq`` is applied
    [READY]                                                           the worker is about to accept
    [METRICS, seq, text]                                              its /metrics, as the parent asked

Parent to worker::

    [REPLY, ...]                                  the answer to the oldest request still unanswered
    [EVENT, seq, key_id, secret_hash, project_id] a key change: apply it, then ACK
    [METRICS, seq]                                send your metrics (for the parent's /metrics)

``key...`` is the five fields the limiter reads (``KEY_FIELDS``). The parent answers requests in the order
they came (it runs them synchronously on one event loop), so replies need no ids, and a worker's settlement
is always applied before its next admission is read.
"""

from __future__ import annotations

from typing import Any

from quotagate.keys.models import KeyRecord
from quotagate.limits.interfaces import Admission, Budget, LimitState

REPLY, ADMIT, EXTEND, STATE, SETTLE, EVENT, ACK, READY, METRICS = range(9)


def key_fields(key: KeyRecord) -> list[Any]:
    """What the parent's limiter needs of a key: id, rpm, tpm, budget and its period, revoked."""
    return [key.id, key.rpm, key.tpm, key.token_limit, key.token_limit_period, key.revoked]


KEY_FIELDS = 6


def key_record(fields: list[Any]) -> KeyRecord:
    """A key record carrying only the fields the limiter reads (the rest are never looked at there)."""
    key_id, rpm, tpm, limit, period, revoked = fields
    return KeyRecord(id=key_id, project_id="", secret_hash="", rpm=rpm, tpm=tpm, token_limit=limit,
                     token_limit_period=period, models=None, expires_at=None, revoked=revoked, version=0)


def _budget(b: Budget | None) -> list[Any] | None:
    return None if b is None else [b.limit, b.period, b.used, b.reserved, b.resets_at]


def _unbudget(b: list[Any] | None) -> Budget | None:
    return None if b is None else Budget(*b)


def admission_fields(a: Admission) -> list[Any]:
    return [REPLY, a.admitted, a.reservation, a.reserved_tokens, a.granted, a.refusal, a.retry_after,
            a.limit_requests, a.remaining_requests, a.reset_requests, a.limit_tokens, a.remaining_tokens,
            a.reset_tokens, _budget(a.budget)]


def admission(m: list[Any]) -> Admission:
    return Admission(m[1], m[2], m[3], m[4], m[5], m[6], m[7], m[8], m[9], m[10], m[11], m[12], _unbudget(m[13]))


def state_fields(s: LimitState) -> list[Any]:
    return [REPLY, s.rpm, s.requests_in_window, s.tpm, s.tokens_in_window, _budget(s.budget)]


def limit_state(m: list[Any]) -> LimitState:
    return LimitState(m[1], m[2], m[3], m[4], _unbudget(m[5]))
