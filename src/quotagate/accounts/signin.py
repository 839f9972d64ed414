"""Sign-in defences of the password form: a throttle on guessing, and a bound on password hashing.

``SignInThrottle`` counts attempts per (email, client address) and per client address. An attempt is
recorded *before* the password is checked, in the same synchronous step as the check of the count, so
that simultaneous attempts cannot all slip through; a success forgets the pair's attempts. After the free
attempts, each further one has to wait twice as long as the one before (1 s, 2 s, 4 s, ... up to a cap).
Nothing is keyed on the email alone, so a stranger elsewhere cannot lock anyone out.

``HashGate`` runs password checks (argon2id: about 64 MiB of memory and tens of milliseconds of CPU each)
on a few threads of its own, off the event loop that also serves the LLM API, and refuses at once
when too many are already running or waiting, instead of letting a flood of bad sign-ins take the memory.

Both live in one process; several instances each keep their own counts (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# A cap on remembered (email, address) pairs and addresses, so that a spray of made-up emails from many
# addresses cannot grow memory without bound; the least recently tried are forgotten first.
MAX_ENTRIES = 100_000
# Attempts older than this are forgotten: after an hour of quiet the free attempts come back.
FORGET_AFTER = 3600.0
FIRST_DELAY = 1.0
# Niceness added to password-hashing threads (Linux schedules threads by their own nice value).
HASH_NICENESS = 10


def default_hash_concurrency() -> int:
    """One hash per core, at most 8: each argon2id hash holds 64 MiB while it runs."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


def address_key(address: str | None) -> str:
    """The unit an address is throttled by: the address itself, or its /64 for IPv6 (one host usually
    holds a whole /64, and could otherwise take a fresh address for every attempt)."""
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass(slots=True)
class _Count:
    attempts: int
    last: float


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    free_attempts: int = 5            # per (email, address) before the delays start
    address_free_attempts: int = 20   # per address, whatever the emails
    max_delay: float = 900.0          # the longest wait between two attempts


class SignInThrottle:
    def __init__(self, policy: ThrottlePolicy | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy or ThrottlePolicy()
        self._clock = clock
        self._counts: OrderedDict[str, _Count] = OrderedDict()

    def _delay(self, attempts: int, free: int) -> float:
        if attempts < free:
            return 0.0
        return min(self.policy.max_delay, FIRST_DELAY * 2.0 ** min(attempts - free, 30))

    def _keys(self, email: str, address: str | None) -> list[tuple[str, int]]:
        where = address_key(address)
        return [(f"p\0{email}\0{where}", self.policy.free_attempts),
                (f"a\0{where}", self.policy.address_free_attempts)]

    def _forget_old(self, now: float) -> None:
        while self._counts:
            oldest = next(iter(self._counts.values()))
            if now - oldest.last <= FORGET_AFTER and len(self._counts) <= MAX_ENTRIES:
                break
            self._counts.popitem(last=False)

    def admit(self, email: str, address: str | None) -> float:
        """Record an attempt and return 0, or return the seconds to wait (and record nothing)."""
        now = self._clock()
        self._forget_old(now)
        keys = self._keys(email, address)
        wait = 0.0
        for key, free in keys:
            count = self._counts.get(key)
            if count is not None:
                wait = max(wait, count.last + self._delay(count.attempts, free) - now)
        if wait > 0:
            return wait
        for key, _free in keys:
            count = self._counts.pop(key, None) or _Count(0, now)
            count.attempts += 1
            count.last = now
            self._counts[key] = count  # to the end: the most recently tried
        return 0.0

    def refund(self, email: str, address: str | None) -> None:
        """Take back an attempt that was recorded but never checked (the server was too busy)."""
        for key, _free in self._keys(email, address):
            count = self._counts.get(key)
            if count is not None:
                count.attempts = max(0, count.attempts - 1)

    def succeeded(self, email: str, address: str | None) -> None:
        """The pair's attempts are forgotten; the address keeps its other attempts but not this one."""
        pair, address_only = self._keys(email, address)
        self._counts.pop(pair[0], None)
        count = self._counts.get(address_only[0])
        if count is not None:
            count.attempts = max(0, count.attempts - 1)


def _lower_priority() -> None:
    """Run this (hashing) thread at a lower priority than the event loop's, which serves the LLM API: a flood
    of sign-ins then waits for the CPU, not the gateway. argon2's own lane threads inherit it (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_NICENESS)


class GateFull(Exception):
    """Too many password checks are running or waiting already; the caller should answer 503 at once."""


class HashGate:
    """At most ``concurrency`` password checks at once, on threads of their own, and at most ``queue``
    more waiting; beyond that ``run`` raises GateFull without waiting."""

    def __init__(self, concurrency: int | None = None, queue: int = 16) -> None:
        self.concurrency = concurrency or default_hash_concurrency()
        self.limit = self.concurrency + queue
        self.pending = 0
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="password-hash",
                                            initializer=_lower_priority)

    def _done(self) -> None:
        self.pending -= 1

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self.pending >= self.limit:
            raise GateFull
        self.pending += 1
        loop = asyncio.get_running_loop()
        job = self._executor.submit(fn, *args)

        def finished(_job: object) -> None:
            # Counted down when the work has really ended (also when the caller stopped waiting for it).
            with contextlib.suppress(RuntimeError):  # the loop is closed: the process is stopping
                loop.call_soon_threadsafe(self._done)

        job.add_done_callback(finished)
        return await asyncio.wrap_future(job)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
