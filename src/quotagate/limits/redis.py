"""The Redis limiter: one Lua script per admission, shared by every instance, on Redis's clock.

``admit`` is exactly one round trip (``EVALSHA`` of ``scripts.ADMIT``, on a pipelined connection of
its own: ``resp.py``), which checks the revocation
marker and checks and reserves rpm, tpm and the budget atomically. ``settle`` only queues, per key: the
next admission of the same key carries that key's queued settlements inside its own script call (so an
instance always sees its own settlements, at no extra round trip), and a background task writes the
rest a few milliseconds later, all keys in one pipeline. A settlement is never on a response's path and
none is lost while the process lives: a failed write is retried (settling is idempotent) and ``close``
flushes what is left. An admission whose reply is lost is cancelled the same way (see
``scripts.SETTLE_LUA``), so a request refused with 503 holds no slot, tokens or budget.

When Redis cannot be reached, ``failure_policy`` decides (see docs/limits.md): ``closed`` refuses
every limited key with ``LimiterUnavailable``; ``open-rates`` admits keys whose only limits are rpm/tpm
but still refuses keys with a budget; ``open`` admits everything, unchecked and uncounted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal, get_args

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from quotagate.keys.models import KeyRecord, Scope
from quotagate.limits import scripts
from quotagate.limits.errors import LimiterUnavailable
from quotagate.limits.interfaces import Admission, Budget, LimitState, Refusal
from quotagate.limits.resp import RespConnection

log = logging.getLogger(__name__)

FailurePolicy = Literal["closed", "open-rates", "open"]
FAILURE_POLICIES: tuple[FailurePolicy, ...] = get_args(FailurePolicy)

# What "Redis is unavailable" means; any other error is a bug and propagates.
UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)

_REFUSALS: dict[int, Refusal] = {1: "rate_limit_exceeded", 2: "token_limit_exceeded", 3: "key_revoked"}
_CANCELLED = 4  # the admission's id was cancelled before the script ran (see scripts.SETTLE_LUA)
_CANCEL = -1  # "actual tokens" of a settlement that cancels its admission
_Settle = tuple[str, str, int]  # reservation id, budget period kind of the admission ('' none), actual tokens
_Pending = dict[str, list[_Settle]]  # by scope (its Redis prefix), in order
# A reservation in several scopes (or in one that is not the key's own) is written
# "<id>\x1e<prefix>\x1f<period>\x1e...", one part per scope; a key's own alone "<id>|<period>".
_SCOPES = "\x1e"
_PERIOD = "\x1f"


class RedisLimiter:
    """The ``Limiter`` shared through Redis.

    ``now`` is for tests only: a clock (Unix seconds) whose readings the scripts use instead of
    Redis's ``TIME``, so that window and period edges can be tested exactly.
    """

    def __init__(self, client: Redis, *, prefix: str = "qg", failure_policy: FailurePolicy = "closed",
                 now: Callable[[], float] | None = None, settle_delay: float = 0.005) -> None:
        if failure_policy not in FAILURE_POLICIES:
            raise ValueError(f"unknown Redis failure policy {failure_policy!r}")
        self._redis = client
        self._prefix = prefix
        self._policy = failure_policy
        self._now = now
        self._settle_delay = settle_delay
        # Admissions and settlements go over one pipelined connection of their own (see resp.py);
        # the rest (state, revocation markers, script loading) over redis-py's pool.
        self._fast = RespConnection(client)
        self._state_script = client.register_script(scripts.STATE)
        self._sources = {scripts.ADMIT_SHA: scripts.ADMIT, scripts.SETTLE_SHA: scripts.SETTLE,
                         scripts.EXTEND_SHA: scripts.EXTEND}
        # Admission ids: unique across instances without coordination.
        self._id_prefix = secrets.token_hex(6) + "."
        self._ids = itertools.count(1)
        self._pending: _Pending = {}
        self._inflight = 0  # batches taken from the queue and not yet acknowledged
        self._drained = asyncio.Event()
        self._drained.set()
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self._down_since: float | None = None
        self._back_up = asyncio.Event()  # set when Redis answers again: retry queued settlements now
        self.unavailable_total = 0  # admissions that met an unreachable Redis (a metric)

    @classmethod
    def from_url(cls, url: str, *, max_connections: int = 128, **options: Any) -> RedisLimiter:
        """A limiter with its own connection pool. Commands time out after 2 s; a dead pooled
        connection is retried once on a fresh one (so a restarted Redis costs no refusal)."""
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=2.0, socket_connect_timeout=1.0, socket_timeout=2.0,
            retry=Retry(NoBackoff(), 1), health_check_interval=30)
        return cls(Redis(connection_pool=pool), **options)

    @property
    def client(self) -> Redis:
        return self._redis

    @property
    def prefix(self) -> str:
        return self._prefix

    def key_prefix(self, key_id: str) -> str:
        """The prefix of every Redis key kept for ``key_id``: one hash tag per inference key (a project's
        limits are kept under ``key_prefix(project_id)``)."""
        return f"{self._prefix}:{{{key_id}}}:"

    def scope_prefix(self, scope: Scope) -> str:
        """The prefix of a scope's Redis keys: its tag's, and for a key's limits on one model, below it."""
        if scope.model is None:
            return f"{self._prefix}:{{{scope.tag}}}:"
        return f"{self._prefix}:{{{scope.tag}}}:m:{scope.model}:"

    # --- the Limiter contract ----------------------------------------------------------------

    async def admit(self, key: KeyRecord, prompt_tokens: int, max_completion: int,
                    min_completion: int = 1, model: str | None = None) -> Admission:
        if key.revoked:
            return Admission(admitted=False, refusal="key_revoked")
        scopes = key.scopes(model)
        max_completion = max(0, max_completion)
        min_completion = max(0, min(min_completion, max_completion))
        rid = f"{self._id_prefix}{next(self._ids)}"
        prefixes = [self.scope_prefix(scope) for scope in scopes]
        keys = [self.key_prefix(key.id) + "revoked"]
        args: list[str | int] = [prompt_tokens, max_completion, min_completion, rid, self._override(), len(scopes)]
        carried: _Pending = {}
        for scope, p in zip(scopes, prefixes, strict=True):
            period = scope.period or ""
            keys += [p + "rpm", p + "tpm", p + "tpmh", p + "pend", p + "b:" + (period or "-")]
            args += [scope.rpm or 0, scope.tpm or 0, scope.limit or 0, period]
            items = self._carry(p, period)
            args.append(len(items))
            for settled_id, _, actual in items:
                args += [settled_id, actual]
            if items:
                carried[p] = items
        if carried:
            self._inflight += 1
            self._drained.clear()
        ok = False
        try:
            reply = await self._eval(scripts.ADMIT_SHA, keys, args)
            ok = True
        except UNAVAILABLE as exc:
            # The script may have run with its reply lost: cancel the admission (idempotent, and a
            # no-op if it never ran), or it would hold its slot and tokens though the request is refused.
            for scope, p in zip(scopes, prefixes, strict=True):
                self._queue(p, (rid, scope.period or "", _CANCEL))
            return self._unavailable(scopes, exc)
        finally:
            if carried:
                self._done(carried, ok)
        self._up()
        admitted, code, bound, retry_us, granted, reserved, now_us = (int(x) for x in reply[:7])
        if code == 3:
            return Admission(admitted=False, refusal="key_revoked")
        if code == _CANCELLED:
            raise LimiterUnavailable()
        now = now_us / 1e6
        refusal = _REFUSALS.get(code)
        budget: Budget | None = None
        limit_requests = remaining_requests = limit_tokens = remaining_tokens = None
        reset_requests: float | None = None
        reset_tokens: float | None = None
        tracked: list[str] = []
        # Of each kind of figure, the scope with the least left binds (see memory.MemoryLimiter._admission).
        for i, scope in enumerate(scopes):
            nreq, rreset, tsum, treset, bused, bres, bend = (int(x) for x in reply[7 + 7 * i:14 + 7 * i])
            if scope.tpm is not None or scope.limit is not None:
                tracked.append(f"{prefixes[i]}{_PERIOD}{scope.period or ''}")
            b: Budget | None = None
            if scope.limit is not None and scope.period is not None:
                b = Budget(scope.limit, scope.period, bused, bres, float(bend))
                if refusal == "token_limit_exceeded" and bound:
                    if bound == i + 1:
                        budget = b
                elif budget is None or b.remaining < budget.remaining:
                    budget = b
            if scope.rpm is not None:
                left = max(0, scope.rpm - nreq)
                if remaining_requests is None or left < remaining_requests:
                    limit_requests, remaining_requests, reset_requests = scope.rpm, left, rreset / 1e6
            if scope.tpm is not None:
                left = max(0, scope.tpm - tsum)
                if remaining_tokens is None or left < remaining_tokens:
                    limit_tokens, remaining_tokens, reset_tokens = scope.tpm, left, treset / 1e6
            elif b is not None and (remaining_tokens is None or b.remaining < remaining_tokens):
                limit_tokens, remaining_tokens, reset_tokens = b.limit, b.remaining, b.resets_at - now
        reservation = None
        if admitted and tracked:
            if len(scopes) == 1 and scopes[0].id == key.id:
                reservation = f"{rid}|{scopes[0].period or ''}"
            else:
                reservation = _SCOPES.join((rid, *tracked))
        return Admission(
            admitted=bool(admitted), reservation=reservation,
            reserved_tokens=reserved, granted=granted if granted >= 0 else None,
            refusal=refusal, retry_after=retry_us / 1e6,
            limit_requests=limit_requests, remaining_requests=remaining_requests, reset_requests=reset_requests,
            limit_tokens=limit_tokens, remaining_tokens=remaining_tokens, reset_tokens=reset_tokens,
            budget=budget, scope=scopes[bound - 1].kind if bound else None)

    def _held(self, key: KeyRecord, reservation: str) -> tuple[str, list[tuple[str, str]]]:
        """A reservation's id, and the (prefix, budget period kind) of each scope it holds tokens in."""
        if _SCOPES not in reservation:
            rid, _, period = reservation.partition("|")
            return rid, [(self.key_prefix(key.id), period)]
        rid, *held = reservation.split(_SCOPES)
        return rid, [(p, period) for p, _, period in (h.partition(_PERIOD) for h in held)]

    async def extend(self, key: KeyRecord, admission: Admission, tokens: int) -> int:
        if admission.reservation is None or tokens <= 0 or key.revoked:
            return 0
        rid, held = self._held(key, admission.reservation)
        limits = {self.scope_prefix(scope): scope for scope in key.all_scopes()}
        keys: list[str] = []
        args: list[str | int] = [rid, tokens, self._override()]
        for p, period in held:
            # Limits removed since the admission no longer bind it; a budget of another period kind is not its.
            scope = limits.get(p)
            keys += [p + "tpm", p + "tpmh", p + "pend", p + "b:" + (period or "-")]
            limit = scope.limit if scope is not None and period and scope.period == period else None
            args += [(scope.tpm if scope is not None else None) or 0, limit or 0]
        try:
            added = await self._eval(scripts.EXTEND_SHA, keys, args)
        except UNAVAILABLE as exc:
            # Nothing more can be reserved: the request ends at what it has (its stream is cut there).
            self._note_down(exc)
            return 0
        self._up()
        return int(added)

    async def settle(self, key: KeyRecord, admission: Admission, actual_tokens: int) -> None:
        if admission.reservation is None:
            return
        rid, held = self._held(key, admission.reservation)
        for p, period in held:
            self._queue(p, (rid, period, max(0, actual_tokens)))

    def _queue(self, prefix: str, settlement: _Settle) -> None:
        self._pending.setdefault(prefix, []).append(settlement)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="limiter-settle")
        self._wake.set()

    async def state(self, key: KeyRecord) -> LimitState:
        own = Scope(key.id, "key", key.id, key.rpm, key.tpm, key.token_limit,
                    key.token_limit_period if key.token_limit is not None else None)
        scopes = [own, *(scope for scope in key.all_scopes() if scope.kind != "key")]
        keys: list[str] = []
        args: list[str | int] = [self._override()]
        for scope in scopes:
            p = self.scope_prefix(scope)
            keys += [p + "rpm", p + "tpm", p + "tpmh", p + "b:" + (scope.period or "-")]
            args.append(scope.period or "")
        try:
            if self._pending or self._inflight:
                await self.flush()  # read this instance's own settlements
            reply = await self._state_script(keys=keys, args=args)
        except UNAVAILABLE as exc:
            raise LimiterUnavailable() from exc
        states: list[LimitState] = []
        for i, scope in enumerate(scopes):
            nreq, tsum, bused, bres, bend = (int(x) for x in reply[5 * i:5 * i + 5])
            budget = None
            if scope.limit is not None and scope.period is not None:
                budget = Budget(scope.limit, scope.period, bused, bres, float(bend))
            states.append(LimitState(rpm=scope.rpm, requests_in_window=nreq if scope.rpm is not None else 0,
                                     tpm=scope.tpm, tokens_in_window=tsum if scope.tpm is not None else 0,
                                     budget=budget))
        project = next((st for scope, st in zip(scopes, states, strict=True) if scope.kind == "project"), None)
        models = {scope.model: st for scope, st in zip(scopes, states, strict=True)
                  if scope.kind == "model" and scope.model is not None}
        if project is None and not models:
            return states[0]
        return replace(states[0], project=project, models=models or None)

    async def close(self) -> None:
        """Flush queued settlements (trying for a few seconds if Redis is down), then disconnect.

        Every wait here is bounded: shutting down must not hang on an unresponsive Redis."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + 5.0
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            self._wake.set()  # it sees _closed and ends after the write in progress, if any
            await asyncio.wait({flusher}, timeout=1.0)
            if not flusher.done():
                flusher.cancel()
                await asyncio.wait({flusher}, timeout=1.0)
        while (self._pending or self._inflight) and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self.flush(), max(0.1, deadline - time.monotonic()))
            except (*UNAVAILABLE, TimeoutError):
                await asyncio.sleep(0.2)
        if self._pending:
            log.error("Redis unreachable: %d settlement(s) could not be written before shutdown",
                      self.pending_settlements())
        await self._fast.close()
        with contextlib.suppress(*UNAVAILABLE, TimeoutError):
            await asyncio.wait_for(self._redis.aclose(), 2.0)

    # --- beyond the contract -----------------------------------------------------------------

    async def mark_revoked(self, key_id: str) -> None:
        """Refuse ``key_id`` in every admission from now on, on every instance (idempotent).

        The marker has no expiry: a revocation is for good, and a TTL would let a revoked key back in
        through any instance whose cache missed the broadcast. It costs one small string per revoked key.
        """
        await self._redis.set(self.key_prefix(key_id) + "revoked", b"1")

    async def flush(self) -> None:
        """Write every queued settlement and wait for those in flight (raises if Redis cannot be
        reached; nothing is dropped)."""
        while True:
            if self._pending:
                batch, self._pending = self._pending, {}
                self._inflight += 1
                self._drained.clear()
                ok = False
                try:
                    await self._write(batch)
                    ok = True
                finally:
                    self._done(batch, ok)
            elif self._inflight == 0:
                return
            else:
                await self._drained.wait()

    def pending_settlements(self) -> int:
        """Settlements queued and not yet sent."""
        return sum(len(v) for v in self._pending.values())

    # --- internals -----------------------------------------------------------------------------

    async def _eval(self, sha: str, keys: list[str], args: list[str | int]) -> Any:
        """EVALSHA on the fast connection, loading the script if Redis does not know it (first use,
        or Redis restarted), and sent once more if the connection broke before the reply (scripts
        are idempotent per id: a second run answers as the first did)."""
        loaded = resent = False
        while True:
            try:
                return await self._fast.call("EVALSHA", sha, len(keys), *keys, *args)
            except NoScriptError:
                if loaded:
                    raise
                loaded = True
                await self._fast.call("SCRIPT", "LOAD", self._sources[sha])
            except RedisConnectionError:
                if resent:
                    raise
                resent = True

    def _override(self) -> str | int:
        return "" if self._now is None else round(self._now() * 1e6)

    def _carry(self, prefix: str, period: str) -> list[_Settle]:
        """Take the scope's queued settlements that its admission script can apply (the caller sends them)."""
        queued = self._pending.pop(prefix, None)
        if not queued:
            return []
        # The script holds the budget key of the scope's current period kind only.
        carried = [s for s in queued if s[1] in ("", period)]
        rest = [s for s in queued if s[1] not in ("", period)]
        if rest:
            self._pending[prefix] = rest
        return carried

    def _done(self, batch: _Pending, ok: bool) -> None:
        if not ok:  # put them back ahead of newer ones; re-sending an applied one is harmless
            for key_id, items in batch.items():
                self._pending[key_id] = items + self._pending.get(key_id, [])
        self._inflight -= 1
        if self._inflight == 0:
            self._drained.set()

    async def _write(self, batch: _Pending) -> None:
        """Settle a batch: one pipeline, one script call per settlement."""
        calls: list[tuple[list[str], list[str | int]]] = []
        for k, items in batch.items():
            for rid, period, actual in items:
                keys = [k + "rpm", k + "pend", k + "tpm", k + "tpmh", k + "b:" + (period or "-")]
                calls.append((keys, [rid, actual]))
        for attempt in (0, 1):
            sha = scripts.SETTLE_SHA
            results = await self._fast.pipeline([("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls])
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                # Redis restarted or its script cache was flushed: load and send again (idempotent).
                await self._fast.call("SCRIPT", "LOAD", scripts.SETTLE)
                continue
            for result in results:
                if isinstance(result, UNAVAILABLE):
                    raise result
                if isinstance(result, Exception):
                    log.error("settlement failed: %s", result)
            return

    async def _flush_loop(self) -> None:
        backoff = 0.05
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            # Give the keys' own admissions a moment to carry their settlements for free.
            await asyncio.sleep(self._settle_delay)
            while self._pending and not self._closed:
                try:
                    await self.flush()
                    backoff = 0.05
                except UNAVAILABLE as exc:
                    self._note_down(exc)
                    self._back_up.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._back_up.wait(), backoff)
                    backoff = min(backoff * 2, 2.0)
                except Exception:
                    log.exception("settlement flush failed; retrying")
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)

    def _unavailable(self, scopes: tuple[Scope, ...], exc: BaseException) -> Admission:
        self.unavailable_total += 1
        self._note_down(exc)
        budgeted = any(scope.limit is not None for scope in scopes)
        if self._policy == "open" or (self._policy == "open-rates" and not budgeted):
            return Admission(admitted=True)
        raise LimiterUnavailable() from exc

    def _note_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.error("Redis limiter unavailable (%s: %s); failure policy %r", type(exc).__name__, exc, self._policy)

    def _up(self) -> None:
        if self._down_since is not None:
            log.warning("Redis limiter reachable again after %.1f s", time.monotonic() - self._down_since)
            self._down_since = None
            self._back_up.set()

