"""The limiter contract (limits/interfaces.py), one suite over every backend, on a fake clock."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from quotagate.keys.models import Period
from quotagate.limits.interfaces import Admission
from tests.limits.conftest import T0, Backend, make_key

pytestmark = pytest.mark.anyio

approx = pytest.approx


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


# --- keys without limits ------------------------------------------------------------------------


async def test_key_without_limits_is_admitted_and_keeps_no_state(backend: Backend) -> None:
    key = make_key()
    for _ in range(50):
        a = await backend.limiter.admit(key, 1000, 1000)
        assert a.admitted and a.reservation is None and a.granted is None and a.refusal is None
        assert a.limit_requests is None and a.limit_tokens is None and a.budget is None
        await backend.limiter.settle(key, a, 5000)
    assert not await backend.has_state(key.id)
    state = await backend.limiter.state(key)
    assert (state.rpm, state.requests_in_window, state.tpm, state.tokens_in_window, state.budget) == (
        None, 0, None, 0, None)


async def test_a_revoked_record_is_refused(backend: Backend) -> None:
    for key in (make_key(), make_key(rpm=5, tpm=100, token_limit=100)):
        revoked = replace(key, revoked=True)
        refused = await backend.limiter.admit(revoked, 1, 1)
        assert not refused.admitted and refused.refusal == "key_revoked" and refused.reservation is None
        assert not await backend.has_state(key.id)


# --- rpm --------------------------------------------------------------------------------------


async def test_rpm_admits_exactly_n_per_rolling_window(backend: Backend) -> None:
    lim, clock = backend.limiter, backend.clock
    key = make_key(rpm=3)
    for _ in range(3):
        assert (await lim.admit(key, 10, 10)).admitted
        clock.advance(10)
    # t0+30: the window holds t0, t0+10, t0+20.
    refused = await lim.admit(key, 10, 10)
    assert not refused.admitted and refused.refusal == "rate_limit_exceeded"
    assert refused.retry_after == approx(30)
    assert refused.reservation is None and refused.reserved_tokens == 0
    clock.set(T0 + 59.999)
    assert not (await lim.admit(key, 10, 10)).admitted
    clock.set(T0 + 60)  # the first admission leaves the window at exactly t0+60
    again = await lim.admit(key, 10, 10)
    assert again.admitted
    assert again.remaining_requests == 0 and again.reset_requests == approx(10)
    refused = await lim.admit(key, 10, 10)
    assert refused.refusal == "rate_limit_exceeded" and refused.retry_after == approx(10)
    assert (await lim.state(key)).requests_in_window == 3


async def test_rpm_headers(backend: Backend) -> None:
    lim, clock = backend.limiter, backend.clock
    key = make_key(rpm=5)
    first = await lim.admit(key, 1, 1)
    assert (first.limit_requests, first.remaining_requests, first.reset_requests) == approx((5, 4, 60))
    clock.advance(15)
    second = await lim.admit(key, 1, 1)
    assert (second.limit_requests, second.remaining_requests, second.reset_requests) == approx((5, 3, 45))
    assert second.limit_tokens is None and second.remaining_tokens is None and second.reset_tokens is None
    assert second.granted is None and second.reservation is None  # rpm alone: nothing to settle


async def test_refused_requests_count_nothing(backend: Backend) -> None:
    lim, clock = backend.limiter, backend.clock
    key = make_key(rpm=2, tpm=1000, token_limit=10_000)
    assert (await lim.admit(key, 100, 100)).admitted
    assert (await lim.admit(key, 100, 100)).admitted
    before = await lim.state(key)
    for _ in range(20):
        assert not (await lim.admit(key, 100, 100)).admitted
    assert await lim.state(key) == before
    clock.advance(60)
    # Only the two admitted requests ever counted: two fresh slots, not none.
    assert (await lim.admit(key, 100, 100)).admitted
    assert (await lim.admit(key, 100, 100)).admitted
    budget = (await lim.state(key)).budget
    assert budget is not None and budget.reserved == 800 and budget.used == 0


async def test_rpm_edit_takes_effect_at_once(backend: Backend) -> None:
    lim = backend.limiter
    key = make_key(rpm=2)
    assert (await lim.admit(key, 1, 1)).admitted
    assert (await lim.admit(key, 1, 1)).admitted
    assert not (await lim.admit(key, 1, 1)).admitted
    raised = make_key(rpm=4, key_id=key.id)
    assert (await lim.admit(raised, 1, 1)).admitted
    a = await lim.admit(raised, 1, 1)
    assert a.admitted and a.limit_requests == 4 and a.remaining_requests == 0
    lowered = make_key(rpm=1, key_id=key.id)
    refused = await lim.admit(lowered, 1, 1)
    assert not refused.admitted and refused.limit_requests == 1 and refused.remaining_requests == 0
    # All four were admitted at t0 and three must leave for a limit of 1: at t0+60.
    assert refused.retry_after == approx(60)


# --- tpm ---------------------------------------------------------------------------------------


async def test_tpm_reserves_then_settles_down_and_up(backend: Backend) -> None:
    lim, clock = backend.limiter, backend.clock
    key = make_key(tpm=1000)
    a = await lim.admit(key, 100, 400)
    assert a.admitted and a.granted == 400 and a.reserved_tokens == 500 and a.reservation is not None
    assert (a.limit_tokens, a.remaining_tokens, a.reset_tokens) == approx((1000, 500, 60))
    assert (await lim.state(key)).tokens_in_window == 500
    await lim.settle(key, a, 150)  # down
    assert (await lim.state(key)).tokens_in_window == 150
    clock.advance(5)
    b = await lim.admit(key, 100, 400)
    assert b.admitted and b.reserved_tokens == 500 and b.remaining_tokens == 350
    await lim.settle(key, b, 700)  # up: the model server reported more than reserved
    assert (await lim.state(key)).tokens_in_window == 850
    c = await lim.admit(key, 100, 400)
    assert c.admitted and c.granted == 50 and c.reserved_tokens == 150 and c.remaining_tokens == 0
    refused = await lim.admit(key, 10, 10)
    assert refused.refusal == "rate_limit_exceeded" and refused.remaining_tokens == 0
    # The first entry (150 tokens, t0) must leave: at t0+60, 55 s from now.
    assert refused.retry_after == approx(55)
    clock.set(T0 + 60)
    assert (await lim.state(key)).tokens_in_window == 850
    d = await lim.admit(key, 10, 10)
    assert d.admitted and d.remaining_tokens == 130
    clock.set(T0 + 65)  # everything admitted at t0+5 leaves; only d (20) remains
    assert (await lim.state(key)).tokens_in_window == 20


async def test_tpm_retry_after_waits_for_enough_tokens_to_leave(backend: Backend) -> None:
    lim, clock = backend.limiter, backend.clock
    key = make_key(tpm=1000)
    for _ in range(3):
        a = await lim.admit(key, 100, 200)
        assert a.admitted and a.reserved_tokens == 300
        clock.advance(10)
    # t0+30, 900 in the window: 200 more need the first entry (t0) gone; 500 more need two (t0+10).
    small = await lim.admit(key, 100, 1000, min_completion=100)
    assert small.refusal == "rate_limit_exceeded" and small.retry_after == approx(30)
    big = await lim.admit(key, 400, 1000, min_completion=100)
    assert big.refusal == "rate_limit_exceeded" and big.retry_after == approx(40)


async def test_settling_to_zero_frees_the_tokens(backend: Backend) -> None:
    lim = backend.limiter
    key = make_key(tpm=100, token_limit=100)
    a = await lim.admit(key, 10, 90)
    assert a.admitted and a.reserved_tokens == 100
    assert not (await lim.admit(key, 1, 1)).admitted
    await lim.settle(key, a, 0)  # e.g. the model server failed
    b = await lim.admit(key, 10, 90)
    assert b.admitted and b.reserved_tokens == 100


# --- granted, min_completion -------------------------------------------------------------------


async def test_granted_is_lowered_to_the_tighter_of_tpm_and_budget(backend: Backend) -> None:
    lim = backend.limiter
    key = make_key(tpm=1000, token_limit=600)
    a = await lim.admit(key, 100, 2000)
    assert a.admitted and a.granted == 500 and a.reserved_tokens == 600  # the budget binds
    # tpm is reported in the tokens headers when the key has it, the budget in ``budget``
    assert (a.limit_tokens, a.remaining_tokens) == (1000, 400)
    assert a.budget is not None and (a.budget.limit, a.budget.reserved, a.budget.remaining) == (600, 600, 0)
    key2 = make_key(tpm=300, token_limit=10_000)
    b = await lim.admit(key2, 100, 2000)
    assert b.admitted and b.granted == 200  # tpm binds
    c = await lim.admit(make_key(tpm=10_000, token_limit=10_000), 100, 50)
    assert c.admitted and c.granted == 50 and c.reserved_tokens == 150  # the client's max binds


async def test_min_completion_refusal_reserves_nothing(backend: Backend) -> None:
    lim = backend.limiter
    key = make_key(rpm=10, tpm=1000)
    assert (await lim.admit(key, 100, 850)).admitted  # 950 in the window
    refused = await lim.admit(key, 20, 100, min_completion=40)  # 30 left for completion < 40
    assert not refused.admitted and refused.refusal == "rate_limit_exceeded" and refused.granted is None
    state = await lim.state(key)
    assert (state.requests_in_window, state.tokens_in_window) == (1, 950)
    ok = await lim.admit(key, 20, 100, min_completion=30)
    assert ok.admitted and ok.granted == 30
    budget_key = make_key(token_limit=100)
    assert (await lim.admit(budget_key, 50, 40)).admitted
    refused = await lim.admit(budget_key, 5, 100, min_completion=6)
    assert refused.refusal == "token_limit_exceeded"
    assert (await lim.admit(budget_key, 5, 100, min_completion=5)).granted == 5


async def test_embeddings_style_request_with_no_completion(backend: Backend) -> None:
    lim = backend.limiter
    key = make_key(tpm=100, token_limit=1000)
    a = await lim.admit(key, 60, 0, min_completion=0)
    assert a.admitted and a.granted == 0 and a.reserved_tokens == 60
    refused = await lim.admit(key, 60, 0, min_completion=0)
    assert refused.refusal == "rate_limit_exceeded"
    assert (await lim.admit(key, 40, 0, min_completion=0)).admitted


# --- budgets -----------------------------------------------------------------------------------


async def test_budget_is_hard_and_refuses_until_the_period_resets(backend: Backend) -> None:
    lim, clock = backend.limiter, backend.clock
    key = make_key(token_limit=1000, period="day")
    a = await lim.admit(key, 200, 300)
    assert a.admitted and a.budget is not None
    assert (a.budget.used, a.budget.reserved, a.budget.remaining) == (0, 500, 500)
    assert a.budget.resets_at == utc(2026, 3, 5) and a.budget.period == "day"
    # No tpm: the tokens headers show the budget.
    assert (a.limit_tokens, a.remaining_tokens, a.reset_tokens) == approx((1000, 500, 12 * 3600))
    await lim.settle(key, a, 450)
    b = await lim.admit(key, 200, 1000)
    assert b.admitted and b.granted == 350 and b.budget is not None and b.budget.remaining == 0
    await lim.settle(key, b, 550)
    refused = await lim.admit(key, 1, 1)
    assert not refused.admitted and refused.refusal == "token_limit_exceeded"
    assert refused.retry_after == approx(12 * 3600)
    assert refused.budget is not None and (refused.budget.used, refused.budget.reserved) == (1000, 0)
    state = await lim.state(key)
    assert state.budget is not None and state.budget.used == 1000 and state.budget.resets_at == utc(2026, 3, 5)
    clock.set(utc(2026, 3, 5))
    fresh = await lim.admit(key, 1, 1)
    assert fresh.admitted and fresh.budget is not None and fresh.budget.used == 0


ROLLOVERS: list[tuple[Period, float, float]] = [
    # (period, a moment, the next period's start)
    ("minute", utc(2026, 3, 4, 12, 7, 30), utc(2026, 3, 4, 12, 8)),
    ("hour", utc(2026, 3, 4, 12, 59, 59), utc(2026, 3, 4, 13)),
    ("day", utc(2026, 3, 4, 23, 0, 0), utc(2026, 3, 5)),
    ("week", utc(2026, 3, 8, 23, 59, 59), utc(2026, 3, 9)),       # Sunday -> Monday
    ("week", utc(2026, 3, 2, 0, 0, 0), utc(2026, 3, 9)),          # a Monday starts its own week
    ("week", utc(2026, 1, 1, 10), utc(2026, 1, 5)),               # a week across the new year
    ("month", utc(2026, 12, 31, 23, 59, 59), utc(2027, 1, 1)),    # Dec -> Jan
    ("month", utc(2028, 2, 28, 12), utc(2028, 3, 1)),             # leap year: Feb 29 still February
    ("month", utc(2027, 2, 28, 12), utc(2027, 3, 1)),
    ("month", utc(2100, 2, 28, 12), utc(2100, 3, 1)),             # 2100 is not a leap year
]


@pytest.mark.parametrize(("period", "moment", "next_start"), ROLLOVERS,
                         ids=[f"{p}-{datetime.fromtimestamp(m, UTC):%Y-%m-%dT%H:%M:%S}" for p, m, _ in ROLLOVERS])
async def test_budget_period_rollover(backend: Backend, period: Period, moment: float, next_start: float) -> None:
    lim, clock = backend.limiter, backend.clock
    clock.set(moment)
    key = make_key(token_limit=100, period=period)
    a = await lim.admit(key, 50, 50)
    assert a.admitted and a.budget is not None and a.budget.resets_at == next_start
    await lim.settle(key, a, 100)
    refused = await lim.admit(key, 1, 1)
    assert refused.refusal == "token_limit_exceeded" and refused.retry_after == approx(next_start - moment)
    clock.set(next_start - 0.001)
    assert not (await lim.admit(key, 1, 1)).admitted
    clock.set(next_start)
    b = await lim.admit(key, 50, 50)
    assert b.admitted and b.budget is not None and b.budget.reserved == 100 and b.budget.used == 0
    assert b.budget.resets_at > next_start
    # Settling the previous period's reservation again does not touch the new period.
    await lim.settle(key, a, 100)
    state = await lim.state(key)
    assert state.budget is not None and (state.budget.used, state.budget.reserved) == (0, 100)


async def test_settling_across_a_rollover_charges_the_old_period(backend: Backend) -> None:
    lim, clock = backend.limiter, backend.clock
    clock.set(utc(2026, 3, 4, 12, 59, 50))
    key = make_key(token_limit=100, period="hour")
    a = await lim.admit(key, 10, 90)
    assert a.admitted
    clock.set(utc(2026, 3, 4, 13, 0, 5))
    await lim.settle(key, a, 80)
    b = await lim.admit(key, 10, 90)
    assert b.admitted and b.budget is not None and (b.budget.used, b.budget.reserved) == (0, 100)


async def test_a_changed_period_counts_separately(backend: Backend) -> None:
    lim = backend.limiter
    daily = make_key(token_limit=1000, period="day")
    a = await lim.admit(daily, 100, 400)
    await lim.settle(daily, a, 500)
    hourly = make_key(token_limit=1000, period="hour", key_id=daily.id)
    b = await lim.admit(hourly, 100, 100)
    assert b.budget is not None and (b.budget.period, b.budget.used, b.budget.reserved) == ("hour", 0, 200)
    await lim.settle(hourly, b, 200)
    state = await lim.state(daily)
    assert state.budget is not None and state.budget.used == 500  # the day's counter is intact
    lowered = make_key(token_limit=400, period="day", key_id=daily.id)
    refused = await lim.admit(lowered, 1, 1)
    assert refused.refusal == "token_limit_exceeded" and refused.budget is not None
    assert refused.budget.remaining == 0


async def test_settle_is_idempotent(backend: Backend) -> None:
    lim = backend.limiter
    key = make_key(tpm=10_000, token_limit=10_000)
    a = await lim.admit(key, 100, 900)
    for _ in range(3):
        await lim.settle(key, a, 300)
    state = await lim.state(key)
    assert state.tokens_in_window == 300
    assert state.budget is not None and (state.budget.used, state.budget.reserved) == (300, 0)
    await lim.settle(key, a, 5000)  # a different amount later changes nothing either
    assert await lim.state(key) == state
    await lim.settle(key, Admission(admitted=False), 100)  # nothing to settle
    await lim.settle(key, Admission(admitted=True), 100)
    assert await lim.state(key) == state


# --- concurrency -------------------------------------------------------------------------------


async def _storm(backend: Backend, key_limits: dict[str, int], n: int = 500, seed: int = 7
                 ) -> tuple[list[Admission], int]:
    rng = random.Random(seed)
    key = make_key(**key_limits)  # type: ignore[arg-type]
    sizes = [(rng.randint(1, 200), rng.randint(1, 400)) for _ in range(n)]
    results = await asyncio.gather(*(backend.limiter.admit(key, p, m) for p, m in sizes))
    biggest = max(p + 1 for p, _ in sizes)  # the most a refused request could have needed
    return list(results), biggest


async def test_budget_never_exceeded_under_concurrent_admissions(backend: Backend) -> None:
    limit = 40_000
    results, biggest = await _storm(backend, {"token_limit": limit})
    reserved = sum(a.reserved_tokens for a in results if a.admitted)
    assert reserved <= limit
    assert reserved > limit - biggest  # and the budget was actually used up to the last request
    assert any(not a.admitted for a in results)
    assert all(a.refusal == "token_limit_exceeded" for a in results if not a.admitted)


async def test_tpm_never_exceeded_under_concurrent_admissions(backend: Backend) -> None:
    limit = 30_000
    results, biggest = await _storm(backend, {"tpm": limit, "token_limit": 1_000_000}, seed=11)
    reserved = sum(a.reserved_tokens for a in results if a.admitted)
    assert limit - biggest < reserved <= limit
    assert all(a.refusal == "rate_limit_exceeded" for a in results if not a.admitted)


async def test_rpm_exact_under_concurrent_admissions(backend: Backend) -> None:
    results, _ = await _storm(backend, {"rpm": 137})
    assert sum(a.admitted for a in results) == 137


async def test_concurrent_admissions_and_settlements(backend: Backend) -> None:
    lim = backend.limiter
    key = make_key(tpm=1_000_000, token_limit=20_000)
    rng = random.Random(3)

    async def one() -> int:
        a = await lim.admit(key, rng.randint(1, 50), rng.randint(1, 200))
        if not a.admitted:
            return 0
        await asyncio.sleep(0)
        actual = rng.randint(0, a.reserved_tokens)
        await lim.settle(key, a, actual)
        return actual

    charged = sum(await asyncio.gather(*(one() for _ in range(500))))
    state = await lim.state(key)
    assert state.budget is not None and state.budget.reserved == 0
    assert state.budget.used == charged <= 20_000
    assert state.tokens_in_window == charged


# --- extending a reservation (streams reserve their completion as it is generated) --------------


async def test_extend_grows_a_reservation_as_far_as_the_budget_allows(backend: Backend) -> None:
    lim = backend.limiter
    key = make_key(token_limit=1_000)
    a = await lim.admit(key, 100, 50)
    assert a.reserved_tokens == 150
    assert await lim.extend(key, a, 300) == 300
    b = await lim.admit(key, 100, 1_000)
    assert b.admitted and b.granted == 1_000 - 450 - 100  # the extension counts against the others
    assert await lim.extend(key, a, 10) == 0  # nothing left
    state = await lim.state(key)
    assert state.budget is not None and state.budget.reserved == 1_000
    await lim.settle(key, a, 220)  # the whole reservation, extensions included, is replaced
    state = await lim.state(key)
    assert state.budget is not None and (state.budget.used, state.budget.reserved) == (220, b.reserved_tokens)
    assert await lim.extend(key, a, 10) == 0  # settled: extends nothing any more


async def test_extend_is_bounded_by_tpm_while_in_the_window(backend: Backend) -> None:
    lim, clock = backend.limiter, backend.clock
    key = make_key(tpm=500)
    a = await lim.admit(key, 100, 100)
    assert await lim.extend(key, a, 1_000) == 300
    assert (await lim.state(key)).tokens_in_window == 500
    assert not (await lim.admit(key, 1, 1)).admitted
    clock.advance(61)  # its tokens counted at its admission: once it has left the window, tpm is no bound
    assert await lim.extend(key, a, 1_000) == 1_000
    assert (await lim.state(key)).tokens_in_window == 0


async def test_extend_of_unknown_or_untracked_admissions_adds_nothing(backend: Backend) -> None:
    lim = backend.limiter
    key = make_key(token_limit=1_000)
    assert await lim.extend(key, Admission(admitted=True), 10) == 0
    a = await lim.admit(key, 10, 10)
    assert await lim.extend(key, a, 0) == 0
    assert await lim.extend(replace(key, revoked=True), a, 10) == 0


async def test_concurrent_extensions_never_exceed_the_budget(backend: Backend) -> None:
    lim = backend.limiter
    limit = 20_000
    key = make_key(token_limit=limit, tpm=1_000_000)
    rng = random.Random(5)

    async def stream() -> int:
        a = await lim.admit(key, rng.randint(5, 50), 16)
        if not a.admitted:
            return 0
        held = a.reserved_tokens
        for _ in range(rng.randint(0, 20)):
            await asyncio.sleep(0)
            got = await lim.extend(key, a, 32)
            held += got
            if not got:
                break
        used = rng.randint(held // 2, held)
        await lim.settle(key, a, used)
        return used

    charged = sum(await asyncio.gather(*(stream() for _ in range(300))))
    state = await lim.state(key)
    assert state.budget is not None and state.budget.reserved == 0
    assert state.budget.used == charged <= limit
