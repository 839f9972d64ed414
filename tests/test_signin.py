"""The sign-in throttle and the password-hash gate, on their own (issue 13): attempts are counted before
the password is checked, per (email, address) with growing delays, and password checks are bounded."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from quotagate.accounts.signin import GateFull, HashGate, SignInThrottle, ThrottlePolicy, address_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_free_attempts_then_delays_that_double_up_to_a_cap() -> None:
    clock = Clock()
    throttle = SignInThrottle(ThrottlePolicy(free_attempts=3, address_free_attempts=100, max_delay=8), clock)
    assert [throttle.admit("a@x", "192.0.2.1") for _ in range(3)] == [0, 0, 0]
    waits = []
    for _ in range(6):
        wait = throttle.admit("a@x", "192.0.2.1")
        assert wait > 0  # refused, and not recorded: asking again does not make it worse
        assert throttle.admit("a@x", "192.0.2.1") == wait
        waits.append(wait)
        clock.now += wait
        assert throttle.admit("a@x", "192.0.2.1") == 0
    assert waits == [1, 2, 4, 8, 8, 8]


def test_attempts_are_per_email_and_address_so_a_stranger_locks_nobody_out() -> None:
    clock = Clock()
    throttle = SignInThrottle(ThrottlePolicy(free_attempts=2, address_free_attempts=100), clock)
    for _ in range(2):
        throttle.admit("owner@x", "198.51.100.9")  # a stranger, guessing
    assert throttle.admit("owner@x", "198.51.100.9") > 0
    assert throttle.admit("owner@x", "192.0.2.1") == 0  # the owner, from elsewhere
    throttle.succeeded("owner@x", "192.0.2.1")
    assert throttle.admit("owner@x", "198.51.100.9") > 0  # still throttled where the guessing came from


def test_one_address_spraying_many_emails_is_throttled_too() -> None:
    throttle = SignInThrottle(ThrottlePolicy(free_attempts=5, address_free_attempts=4), Clock())
    assert [throttle.admit(f"u{i}@x", "203.0.113.5") for i in range(4)] == [0, 0, 0, 0]
    assert throttle.admit("u9@x", "203.0.113.5") > 0
    assert throttle.admit("u9@x", "203.0.113.6") == 0


def test_a_success_forgets_the_pair_and_a_refund_takes_an_attempt_back() -> None:
    throttle = SignInThrottle(ThrottlePolicy(free_attempts=2, address_free_attempts=100), Clock())
    throttle.admit("a@x", "192.0.2.1")
    throttle.succeeded("a@x", "192.0.2.1")
    throttle.admit("a@x", "192.0.2.1")
    throttle.refund("a@x", "192.0.2.1")
    assert [throttle.admit("a@x", "192.0.2.1") for _ in range(2)] == [0, 0]
    assert throttle.admit("a@x", "192.0.2.1") > 0


def test_quiet_for_an_hour_gives_the_free_attempts_back() -> None:
    clock = Clock()
    throttle = SignInThrottle(ThrottlePolicy(free_attempts=1), clock)
    throttle.admit("a@x", "192.0.2.1")
    assert throttle.admit("a@x", "192.0.2.1") > 0
    clock.now += 3601
    assert throttle.admit("a@x", "192.0.2.1") == 0


def test_ipv6_addresses_count_by_their_64() -> None:
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_key(None) == "unknown"


def test_the_hash_gate_bounds_running_and_waiting_checks_and_refuses_the_rest_at_once() -> None:
    release = threading.Event()
    running: list[str] = []

    def slow(name: str) -> str:
        running.append(name)
        release.wait(5)
        return name

    async def scenario() -> None:
        gate = HashGate(concurrency=1, queue=1)
        first = asyncio.create_task(gate.run(slow, "first"))
        second = asyncio.create_task(gate.run(slow, "second"))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(GateFull):
            await gate.run(slow, "third")
        assert time.monotonic() - started < 0.05
        # The event loop is free while the check runs on the gate's own thread.
        ticks = 0
        for _ in range(5):
            await asyncio.sleep(0.005)
            ticks += 1
        assert ticks == 5 and running == ["first"]
        release.set()
        assert await first == "first" and await second == "second"
        await asyncio.sleep(0.01)
        assert gate.pending == 0
        assert await gate.run(slow, "again") == "again"
        gate.close()

    asyncio.run(scenario())


def test_a_caller_that_stops_waiting_does_not_free_a_running_checks_place() -> None:
    release = threading.Event()

    async def scenario() -> None:
        gate = HashGate(concurrency=1, queue=0)
        task = asyncio.create_task(gate.run(release.wait, 5))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.01)
        with pytest.raises(GateFull):  # the check is still running on its thread
            await gate.run(release.wait, 5)
        release.set()
        await asyncio.sleep(0.05)
        assert gate.pending == 0
        gate.close()

    asyncio.run(scenario())
