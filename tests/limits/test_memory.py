"""What only the memory backend promises: bounded state, dropped once nothing in it can matter."""

from __future__ import annotations

import pytest

from quotagate.limits.memory import MemoryLimiter
from tests.limits.conftest import Clock, make_key

pytestmark = pytest.mark.anyio


async def test_idle_keys_are_dropped(clock: Clock) -> None:
    lim = MemoryLimiter(now=clock)
    keys = [make_key(rpm=10, tpm=1000) for _ in range(100)]
    for key in keys:
        a = await lim.admit(key, 10, 10)
        await lim.settle(key, a, 15)
    assert lim.tracked_keys() == 100
    clock.advance(60)
    other = make_key(rpm=1)
    for _ in range(60):  # each admission examines a couple of the stalest keys
        await lim.admit(other, 1, 1)
    assert lim.tracked_keys() == 1 and lim.tracks(other.id)


async def test_unsettled_reservations_do_not_pin_state(clock: Clock) -> None:
    lim = MemoryLimiter(now=clock)
    key = make_key(tpm=1000)
    await lim.admit(key, 10, 10)  # never settled (a bug elsewhere must not leak memory forever)
    clock.advance(61)
    await lim.admit(make_key(rpm=1), 1, 1)
    assert not lim.tracks(key.id)


async def test_a_used_budget_is_kept_until_its_period_ends(clock: Clock) -> None:
    lim = MemoryLimiter(now=clock)
    key = make_key(token_limit=1000, period="hour")  # T0 is 12:00:00
    a = await lim.admit(key, 10, 10)
    await lim.settle(key, a, 20)
    other = make_key(rpm=1000)
    clock.advance(61)
    await lim.admit(other, 1, 1)
    assert lim.tracks(key.id)  # the hour's 20 tokens must not be forgotten
    state = await lim.state(key)
    assert state.budget is not None and state.budget.used == 20
    clock.advance(3600)
    await lim.admit(other, 1, 1)
    await lim.admit(other, 1, 1)
    assert not lim.tracks(key.id)


async def test_a_budget_settled_to_nothing_is_dropped(clock: Clock) -> None:
    lim = MemoryLimiter(now=clock)
    key = make_key(token_limit=1000, period="month")
    a = await lim.admit(key, 10, 10)
    await lim.settle(key, a, 0)
    clock.advance(61)
    await lim.admit(make_key(rpm=1), 1, 1)
    assert not lim.tracks(key.id)


async def test_leaked_reservations_of_a_busy_key_are_collected(clock: Clock) -> None:
    lim = MemoryLimiter(now=clock)
    key = make_key(tpm=10**9)
    for _ in range(1000):
        await lim.admit(key, 1, 1)  # never settled
        clock.advance(1)
    st = lim._keys[key.id]
    assert len(st.reservations) <= 2 * 64 + 60
