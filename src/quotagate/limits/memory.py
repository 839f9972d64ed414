"""The in-memory limiter: exact sliding logs per scope (a key, a key's model, a project), for one process.

``admit`` never awaits between checking and reserving, so on one event loop it is atomic over all the
scopes of a request. State is kept only for scopes with limits, and a scope's state is dropped once
nothing in it can matter any more (empty windows, no budget in use in the current period, no reservation
outstanding). "Key" below is any scope: the state of each is the same.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import replace

from quotagate.keys.models import KeyRecord, Period, Scope
from quotagate.limits.interfaces import Admission, Budget, LimitState, Refusal
from quotagate.limits.periods import period_bounds

WINDOW = 60.0
# How many stale keys one admission may examine for dropping: amortised O(1), bounded memory.
_SWEEP_PER_CALL = 2
# A key's reservations are re-examined for leaks when they grow past twice this many since last time.
_RESERVATION_SLACK = 64


class _Entry:
    """One admission in the tokens window: its time and its tokens (reserved, then actual)."""

    __slots__ = ("at", "live", "tokens")

    def __init__(self, at: float, tokens: int) -> None:
        self.at = at
        self.tokens = tokens
        self.live = True  # still in the window (and in the window's running sum)


class _Counter:
    """A budget's counter for one period of one key."""

    __slots__ = ("end", "reserved", "used")

    def __init__(self, end: int) -> None:
        self.end = end
        self.used = 0
        self.reserved = 0


class _Reservation:
    __slots__ = ("counter", "entry", "tokens")

    def __init__(self, tokens: int, entry: _Entry | None, counter: _Counter | None) -> None:
        self.tokens = tokens
        self.entry = entry
        self.counter = counter


class _KeyState:
    __slots__ = ("budgets", "checked", "entries", "requests", "reservations", "reservations_mark", "tokens_sum")

    def __init__(self, now: float) -> None:
        self.requests: deque[float] = deque()
        self.entries: deque[_Entry] = deque()
        self.tokens_sum = 0
        self.budgets: dict[tuple[Period, int], _Counter] = {}
        self.reservations: dict[str, _Reservation] = {}
        self.reservations_mark = _RESERVATION_SLACK
        self.checked = now  # last access (or last sweep), for dropping idle keys

    def prune(self, now: float) -> None:
        """Forget window entries that left the window."""
        cutoff = now - WINDOW
        requests = self.requests
        while requests and requests[0] <= cutoff:
            requests.popleft()
        entries = self.entries
        while entries and entries[0].at <= cutoff:
            entry = entries.popleft()
            entry.live = False
            self.tokens_sum -= entry.tokens

    def counter(self, period: Period, now: float) -> tuple[_Counter, int]:
        """The budget counter of the period holding ``now`` (created empty), and that period's end."""
        start, end = period_bounds(period, now)
        counter = self.budgets.get((period, start))
        if counter is None:
            for slot in [slot for slot, c in self.budgets.items() if c.end <= now]:
                del self.budgets[slot]
            counter = self.budgets[(period, start)] = _Counter(end)
        return counter, end

    def collect(self, now: float) -> None:
        """Drop what can no longer matter: ended or empty budgets, reservations nothing refers to."""
        self.prune(now)
        for slot in [slot for slot, c in self.budgets.items() if c.end <= now or (c.used == 0 == c.reserved)]:
            del self.budgets[slot]
        dead = [rid for rid, r in self.reservations.items()
                if (r.entry is None or not r.entry.live) and (r.counter is None or r.counter.end <= now)]
        for rid in dead:
            del self.reservations[rid]
        self.reservations_mark = max(_RESERVATION_SLACK, 2 * len(self.reservations))

    def idle(self) -> bool:
        return not (self.requests or self.entries or self.budgets or self.reservations)

    def tokens_retry(self, tpm: int, need: int, now: float) -> float:
        """Seconds until ``need`` tokens fit in the tokens window (a full window if they never can)."""
        excess = self.tokens_sum + need - tpm
        if need > tpm:
            return WINDOW
        freed = 0
        for entry in self.entries:
            freed += entry.tokens
            if freed >= excess:
                return entry.at + WINDOW - now
        return WINDOW


class MemoryLimiter:
    """The ``Limiter`` of one process. ``now`` is the clock (Unix seconds), injectable for tests."""

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now
        self._keys: OrderedDict[str, _KeyState] = OrderedDict()
        self._ids = itertools.count(1)

    def tracked_keys(self) -> int:
        """How many keys have state (for tests and metrics)."""
        return len(self._keys)

    def tracks(self, key_id: str) -> bool:
        """Whether any state is kept for the key."""
        return key_id in self._keys

    async def admit(self, key: KeyRecord, prompt_tokens: int, max_completion: int,
                    min_completion: int = 1, model: str | None = None) -> Admission:
        return self.admit_sync(key, prompt_tokens, max_completion, min_completion, model)

    def admit_sync(self, key: KeyRecord, prompt_tokens: int, max_completion: int,
                   min_completion: int = 1, model: str | None = None) -> Admission:
        """``admit`` without the coroutine: check and reserve in one go, nothing awaited in between."""
        if key.revoked:
            return Admission(admitted=False, refusal="key_revoked")
        scopes = key.scopes(model)
        if not scopes:
            return Admission(admitted=True)
        if len(scopes) == 1 and scopes[0].kind == "key":
            return self._admit_key(key, prompt_tokens, max_completion, min_completion)
        now = self._now()
        max_completion = max(0, max_completion)
        min_completion = max(0, min(min_completion, max_completion))
        refusal: Refusal | None = None
        retry = 0.0
        bound: Scope | None = None
        granted = max_completion
        states: list[_KeyState] = []
        counters: list[tuple[_Counter | None, int]] = []
        for scope in scopes:
            st = self._touch(scope.id, now)
            st.prune(now)
            states.append(st)
            code: Refusal | None = None
            wait = 0.0
            requests = st.requests
            rpm, tpm, limit = scope.rpm, scope.tpm, scope.limit
            if rpm is not None and len(requests) >= rpm:
                code = "rate_limit_exceeded"
                wait = requests[len(requests) - rpm] + WINDOW - now
            if tpm is not None:
                room = tpm - st.tokens_sum - prompt_tokens
                if room < min_completion:
                    code = "rate_limit_exceeded"
                    wait = max(wait, st.tokens_retry(tpm, prompt_tokens + min_completion, now))
                granted = min(granted, room)
            counter: _Counter | None = None
            end = 0
            if limit is not None:
                assert scope.period is not None
                counter, end = st.counter(scope.period, now)
                room = limit - counter.used - counter.reserved - prompt_tokens
                if room < min_completion:
                    code = "token_limit_exceeded"
                    wait = max(wait, end - now)
                granted = min(granted, room)
            counters.append((counter, end))
            # The scope that holds the request longest is the one a retry has to wait for.
            if code is not None and (refusal is None or wait > retry):
                refusal, retry, bound = code, wait, scope
        if refusal is not None:
            return self._admission(scopes, states, counters, now, refusal=refusal, retry_after=retry, bound=bound)
        reserved = prompt_tokens + granted
        tracked: list[str] = []
        rid = str(next(self._ids))
        for scope, st, (counter, _) in zip(scopes, states, counters, strict=True):
            if scope.rpm is not None:
                st.requests.append(now)
            if scope.tpm is None and counter is None:
                continue
            entry: _Entry | None = None
            if scope.tpm is not None:
                entry = _Entry(now, reserved)
                st.entries.append(entry)
                st.tokens_sum += reserved
            if counter is not None:
                counter.reserved += reserved
            st.reservations[rid] = _Reservation(reserved, entry, counter)
            if len(st.reservations) > st.reservations_mark:
                st.collect(now)
            tracked.append(scope.id)
        if not tracked:
            return self._admission(scopes, states, counters, now)
        if tracked != [key.id]:
            # The reservation names the scopes it holds tokens in (settle and extend find them there).
            rid = _SEP.join((rid, *tracked))
        return self._admission(scopes, states, counters, now, reservation=rid, reserved=reserved, granted=granted)

    def _admit_key(self, key: KeyRecord, prompt_tokens: int, max_completion: int, min_completion: int) -> Admission:
        """The admission of a request bound by its key's own limits only (the common case, kept as lean as
        it was before there were other scopes)."""
        rpm, tpm, limit, period = key.rpm, key.tpm, key.token_limit, key.token_limit_period
        budgeted = limit is not None and period is not None
        now = self._now()
        st = self._touch(key.id, now)
        st.prune(now)
        max_completion = max(0, max_completion)
        min_completion = max(0, min(min_completion, max_completion))
        refusal: Refusal | None = None
        retry = 0.0
        requests = st.requests
        if rpm is not None and len(requests) >= rpm:
            refusal = "rate_limit_exceeded"
            retry = requests[len(requests) - rpm] + WINDOW - now
        granted = max_completion
        if tpm is not None:
            room = tpm - st.tokens_sum - prompt_tokens
            if room < min_completion:
                refusal = "rate_limit_exceeded"
                retry = max(retry, st.tokens_retry(tpm, prompt_tokens + min_completion, now))
            granted = min(granted, room)
        counter: _Counter | None = None
        end = 0
        if budgeted:
            assert limit is not None and period is not None
            counter, end = st.counter(period, now)
            room = limit - counter.used - counter.reserved - prompt_tokens
            if room < min_completion:
                refusal = "token_limit_exceeded"
                retry = max(retry, end - now)
            granted = min(granted, room)
        if refusal is not None:
            return self._key_admission(key, st, now, counter, end, refusal=refusal, retry_after=retry)
        if rpm is not None:
            requests.append(now)
        if tpm is None and counter is None:
            return self._key_admission(key, st, now, None, 0)
        reserved = prompt_tokens + granted
        entry: _Entry | None = None
        if tpm is not None:
            entry = _Entry(now, reserved)
            st.entries.append(entry)
            st.tokens_sum += reserved
        if counter is not None:
            counter.reserved += reserved
        rid = str(next(self._ids))
        st.reservations[rid] = _Reservation(reserved, entry, counter)
        if len(st.reservations) > st.reservations_mark:
            st.collect(now)
        return self._key_admission(key, st, now, counter, end, reservation=rid, reserved=reserved, granted=granted)

    async def extend(self, key: KeyRecord, admission: Admission, tokens: int) -> int:
        return self.extend_sync(key, admission.reservation, tokens)

    def extend_sync(self, key: KeyRecord, rid: str | None, tokens: int) -> int:
        """``extend`` without the coroutine, by reservation id."""
        if rid is None or tokens <= 0 or key.revoked:
            return 0
        if _SEP not in rid:
            return self._extend_key(key, rid, tokens)
        rid, *scope_ids = rid.split(_SEP)
        held: list[tuple[_KeyState, _Reservation, Scope | None]] = []
        limits = {s.id: s for s in key.all_scopes()}
        for scope_id in scope_ids:
            st = self._keys.get(scope_id)
            res = st.reservations.get(rid) if st is not None else None
            if st is None or res is None:
                return 0
            held.append((st, res, limits.get(scope_id)))
        now = self._now()
        room = tokens
        for st, res, scope in held:
            st.prune(now)
            entry, counter = res.entry, res.counter
            # Limits removed since the admission no longer bound it; ones added later did not count it.
            if scope is not None and scope.tpm is not None and entry is not None and entry.live:
                room = min(room, scope.tpm - st.tokens_sum)
            if scope is not None and counter is not None and scope.limit is not None:
                room = min(room, scope.limit - counter.used - counter.reserved)
        if room <= 0:
            return 0
        for st, res, _ in held:
            res.tokens += room
            entry, counter = res.entry, res.counter
            if entry is not None:
                entry.tokens += room
                if entry.live:
                    st.tokens_sum += room
            if counter is not None:
                counter.reserved += room
        return room

    def _extend_key(self, key: KeyRecord, rid: str | None, tokens: int) -> int:
        """``extend`` of a reservation in the key's own scope alone (the common case, as lean as before)."""
        st = self._keys.get(key.id) if rid is not None else None
        res = st.reservations.get(rid) if st is not None and rid is not None else None
        if st is None or res is None or tokens <= 0 or key.revoked:
            return 0
        now = self._now()
        st.prune(now)
        room = tokens
        entry = res.entry
        if key.tpm is not None and entry is not None and entry.live:
            room = min(room, key.tpm - st.tokens_sum)
        counter = res.counter
        if counter is not None and key.token_limit is not None:
            room = min(room, key.token_limit - counter.used - counter.reserved)
        if room <= 0:
            return 0
        res.tokens += room
        if entry is not None:
            entry.tokens += room
            if entry.live:
                st.tokens_sum += room
        if counter is not None:
            counter.reserved += room
        return room

    async def settle(self, key: KeyRecord, admission: Admission, actual_tokens: int) -> None:
        self.settle_sync(key.id, admission.reservation, actual_tokens)

    def settle_sync(self, key_id: str, rid: str | None, actual_tokens: int) -> None:
        """``settle`` without the coroutine, by key id and reservation id."""
        if rid is None:
            return
        if _SEP not in rid:
            self._settle_in(key_id, rid, actual_tokens)
            return
        rid, *scope_ids = rid.split(_SEP)
        for scope_id in scope_ids:
            self._settle_in(scope_id, rid, actual_tokens)

    def _settle_in(self, scope_id: str, rid: str, actual_tokens: int) -> None:
        st = self._keys.get(scope_id)
        if st is None:
            return
        res = st.reservations.pop(rid, None)
        if res is None:
            return
        actual = max(0, actual_tokens)
        entry = res.entry
        if entry is not None:
            if entry.live:
                st.tokens_sum += actual - entry.tokens
            entry.tokens = actual
        # A counter of an ended period may be updated here harmlessly: nothing reads it any more.
        if res.counter is not None:
            res.counter.reserved -= res.tokens
            res.counter.used += actual

    async def state(self, key: KeyRecord) -> LimitState:
        return self.state_sync(key)

    def state_sync(self, key: KeyRecord) -> LimitState:
        """``state`` without the coroutine."""
        now = self._now()
        own = self._scope_state(key.id, key.rpm, key.tpm, key.token_limit, key.token_limit_period, now)
        project = models = None
        for scope in key.all_scopes():
            if scope.kind == "project":
                project = self._scope_state(scope.id, scope.rpm, scope.tpm, scope.limit, scope.period, now)
            elif scope.kind == "model":
                assert scope.model is not None
                if models is None:
                    models = {}
                models[scope.model] = self._scope_state(scope.id, scope.rpm, scope.tpm, scope.limit, scope.period,
                                                        now)
        if project is None and models is None:
            return own
        return replace(own, project=project, models=models)

    def _scope_state(self, scope_id: str, rpm: int | None, tpm: int | None, limit: int | None,
                     period: Period | None, now: float) -> LimitState:
        st = self._keys.get(scope_id)
        if st is not None:
            st.prune(now)
        budget: Budget | None = None
        if limit is not None and period is not None:
            start, end = period_bounds(period, now)
            counter = st.budgets.get((period, start)) if st is not None else None
            budget = Budget(limit, period, counter.used if counter else 0, counter.reserved if counter else 0,
                            float(end))
        return LimitState(
            rpm=rpm, requests_in_window=len(st.requests) if st is not None and rpm is not None else 0,
            tpm=tpm, tokens_in_window=st.tokens_sum if st is not None and tpm is not None else 0, budget=budget)

    async def close(self) -> None:
        self._keys.clear()

    def restore(self, budgets: Iterable[tuple[str, Period, int, int, int]],
                requests: Iterable[tuple[str, float, int]]) -> None:
        """Take up what keys used before this process started (read from the store at start, before the
        first admission): ``budgets`` as (key id, period, period start, period end, tokens used), and
        ``requests`` of the last minute as (key id, Unix time, tokens), oldest first, into the windows."""
        now = self._now()
        for key_id, period, start, end, used in budgets:
            if end <= now or used <= 0:
                continue
            st = self._touch(key_id, now)
            counter = st.budgets.get((period, start))
            if counter is None:
                counter = st.budgets[(period, start)] = _Counter(end)
            counter.used += used
        for key_id, at, tokens in requests:
            if at <= now - WINDOW or at > now:
                continue
            st = self._touch(key_id, now)
            st.requests.append(at)
            st.entries.append(_Entry(at, tokens))
            st.tokens_sum += tokens

    def _touch(self, key_id: str, now: float) -> _KeyState:
        """The key's state (created if new), marked as just used; also drops a few idle keys."""
        keys = self._keys
        st = keys.get(key_id)
        if st is None:
            st = keys[key_id] = _KeyState(now)
        else:
            keys.move_to_end(key_id)
            st.checked = now
        # Keys are in order of last use: the first ones are the stalest. A key unused for a window has
        # empty windows; it is dropped unless a budget or a reservation still needs it.
        for _ in range(_SWEEP_PER_CALL):
            oldest_id, oldest = next(iter(keys.items()))
            if oldest.checked > now - WINDOW:
                break
            oldest.collect(now)
            if oldest.idle():
                del keys[oldest_id]
            else:
                oldest.checked = now
                keys.move_to_end(oldest_id)
        return st

    @staticmethod
    def _key_admission(key: KeyRecord, st: _KeyState, now: float, counter: _Counter | None, end: int, *,
                   refusal: Refusal | None = None, retry_after: float = 0.0, reservation: str | None = None,
                   reserved: int = 0, granted: int | None = None) -> Admission:
        budget: Budget | None = None
        if counter is not None:
            assert key.token_limit is not None and key.token_limit_period is not None
            budget = Budget(key.token_limit, key.token_limit_period, counter.used, counter.reserved, float(end))
        limit_requests = remaining_requests = None
        reset_requests: float | None = None
        if key.rpm is not None:
            limit_requests = key.rpm
            remaining_requests = max(0, key.rpm - len(st.requests))
            reset_requests = st.requests[0] + WINDOW - now if st.requests else 0.0
        limit_tokens = remaining_tokens = None
        reset_tokens: float | None = None
        if key.tpm is not None:
            limit_tokens = key.tpm
            remaining_tokens = max(0, key.tpm - st.tokens_sum)
            reset_tokens = st.entries[0].at + WINDOW - now if st.entries else 0.0
        elif budget is not None:
            limit_tokens = budget.limit
            remaining_tokens = budget.remaining
            reset_tokens = budget.resets_at - now
        return Admission(
            admitted=refusal is None, reservation=reservation, reserved_tokens=reserved, granted=granted,
            refusal=refusal, retry_after=retry_after, limit_requests=limit_requests,
            remaining_requests=remaining_requests, reset_requests=reset_requests, limit_tokens=limit_tokens,
            remaining_tokens=remaining_tokens, reset_tokens=reset_tokens, budget=budget,
            scope="key" if refusal is not None else None)

    @staticmethod
    def _admission(scopes: tuple[Scope, ...], states: list[_KeyState], counters: list[tuple[_Counter | None, int]],
                   now: float, *, refusal: Refusal | None = None, retry_after: float = 0.0,
                   bound: Scope | None = None, reservation: str | None = None, reserved: int = 0,
                   granted: int | None = None) -> Admission:
        """The admission's figures for the headers: of each kind, the scope with the least left (the one
        that binds); the budget of the scope that refused, else the tightest."""
        budget: Budget | None = None
        limit_requests = remaining_requests = None
        reset_requests: float | None = None
        limit_tokens = remaining_tokens = None
        reset_tokens: float | None = None
        for scope, st, (counter, end) in zip(scopes, states, counters, strict=True):
            b: Budget | None = None
            if counter is not None:
                assert scope.limit is not None and scope.period is not None
                b = Budget(scope.limit, scope.period, counter.used, counter.reserved, float(end))
                if refusal == "token_limit_exceeded" and bound is not None:
                    if scope is bound:
                        budget = b
                elif budget is None or b.remaining < budget.remaining:
                    budget = b
            if scope.rpm is not None:
                left = max(0, scope.rpm - len(st.requests))
                if remaining_requests is None or left < remaining_requests:
                    limit_requests, remaining_requests = scope.rpm, left
                    reset_requests = st.requests[0] + WINDOW - now if st.requests else 0.0
            if scope.tpm is not None:
                left = max(0, scope.tpm - st.tokens_sum)
                if remaining_tokens is None or left < remaining_tokens:
                    limit_tokens, remaining_tokens = scope.tpm, left
                    reset_tokens = st.entries[0].at + WINDOW - now if st.entries else 0.0
            elif b is not None and (remaining_tokens is None or b.remaining < remaining_tokens):
                limit_tokens, remaining_tokens, reset_tokens = b.limit, b.remaining, b.resets_at - now
        return Admission(
            admitted=refusal is None, reservation=reservation, reserved_tokens=reserved, granted=granted,
            refusal=refusal, retry_after=retry_after, limit_requests=limit_requests,
            remaining_requests=remaining_requests, reset_requests=reset_requests, limit_tokens=limit_tokens,
            remaining_tokens=remaining_tokens, reset_tokens=reset_tokens, budget=budget,
            scope=bound.kind if bound is not None else None)


# A reservation held in several scopes (or in one that is not the key's own) is written
# "<id>\x1e<scope id>\x1e<scope id>...": settling and extending need no other record of where it is.
_SEP = "\x1e"

