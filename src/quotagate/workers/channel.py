"""The control channel between the parent and one worker: a Unix socketpair carrying one JSON array per
line (orjson never writes a raw newline), in both directions.

Worker to parent::

    [ADMIT,  key..., prompt_tokens, max_completion, min_completion, model]   -> a reply
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

``key...`` is the fields the limiter reads (``KEY_FIELDS`` of them, see ``key_fields``). The parent
answers requests in the order they came (it runs them synchronously on one event loop), so replies need
no ids, and a worker's settlement is always applied before its next admission is read.
"""

from __future__ import annotations

from typing import Any

from quotagate.keys.models import KeyRecord, Limits
from quotagate.limits.interfaces import Admission, Budget, LimitState

REPLY, ADMIT, EXTEND, STATE, SETTLE, EVENT, ACK, READY, METRICS = range(9)


def key_fields(key: KeyRecord) -> list[Any]:
    """What the parent's limiter needs of a key: id, rpm, tpm, budget and its period, revoked, its project,
    the project's limits and the key's per-model limits (each None where there are none)."""
    project = key.project_limits
    models = key.model_limits
    return [key.id, key.rpm, key.tpm, key.token_limit, key.token_limit_period, key.revoked, key.project_id,
            None if not project else [project.rpm, project.tpm, project.token_limit, project.token_limit_period],
            None if not models else [[m, lim.rpm, lim.tpm, lim.token_limit, lim.token_limit_period]
                                     for m, lim in models.items()]]


KEY_FIELDS = 9


def record_fields(m: list[Any]) -> tuple[Any, ...]:
    """A message's key fields, hashable (the parent reuses records by them)."""
    project, models = m[8], m[9]
    return (m[1], m[2], m[3], m[4], m[5], m[6], m[7], None if project is None else tuple(project),
            None if models is None else tuple(tuple(x) for x in models))


def key_record(fields: tuple[Any, ...]) -> KeyRecord:
    """A key record carrying only the fields the limiter reads (the rest are never looked at there)."""
    key_id, rpm, tpm, limit, period, revoked, project_id, project, models = fields
    return KeyRecord(id=key_id, project_id=project_id, secret_hash="", rpm=rpm, tpm=tpm, token_limit=limit,
                     token_limit_period=period, models=None, expires_at=None, revoked=revoked, version=0,
                     project_limits=None if project is None else Limits(*project),
                     model_limits=None if models is None else {m[0]: Limits(*m[1:]) for m in models})


def _budget(b: Budget | None) -> list[Any] | None:
    return None if b is None else [b.limit, b.period, b.used, b.reserved, b.resets_at]


def _unbudget(b: list[Any] | None) -> Budget | None:
    return None if b is None else Budget(*b)


def admission_fields(a: Admission) -> list[Any]:
    return [REPLY, a.admitted, a.reservation, a.reserved_tokens, a.granted, a.refusal, a.retry_after,
            a.limit_requests, a.remaining_requests, a.reset_requests, a.limit_tokens, a.remaining_tokens,
            a.reset_tokens, _budget(a.budget), a.scope]


def admission(m: list[Any]) -> Admission:
    return Admission(m[1], m[2], m[3], m[4], m[5], m[6], m[7], m[8], m[9], m[10], m[11], m[12], _unbudget(m[13]),
                     m[14])


def _state(s: LimitState) -> list[Any]:
    return [s.rpm, s.requests_in_window, s.tpm, s.tokens_in_window, _budget(s.budget)]


def _unstate(m: list[Any]) -> LimitState:
    return LimitState(m[0], m[1], m[2], m[3], _unbudget(m[4]))


def state_fields(s: LimitState) -> list[Any]:
    return [REPLY, *_state(s), None if s.project is None else _state(s.project),
            None if s.models is None else {m: _state(x) for m, x in s.models.items()}]


def limit_state(m: list[Any]) -> LimitState:
    return LimitState(m[1], m[2], m[3], m[4], _unbudget(m[5]), None if m[6] is None else _unstate(m[6]),
                      None if m[7] is None else {k: _unstate(v) for k, v in m[7].items()})
