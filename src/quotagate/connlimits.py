"""Caps on one listener's client connections: how many may be open at once, how many from one client
address, and how a listener says so (a warning at most every few seconds, and counts on /metrics).

Each open connection holds a file descriptor. Without a cap, 20,500 idle connections from one client took
every descriptor the process had: both listeners then reset every new connection, the store and the model
servers could not be reached, and nothing was logged (issue 13). A connection over a cap is answered 503
and closed at once, so its descriptor is back before the next one is accepted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
from collections.abc import Iterable, Sequence
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# While connections are being refused, a listener logs the first refusal at once, then a summary of the
# refusals every REPORT_SECONDS (one line, however many thousands a flood brings).
REPORT_SECONDS = 5.0
# Descriptors kept for everything but client connections: the SQLite files or PostgreSQL pool (counted
# apart, from its setting), Redis (its pool holds up to 128), the usage journal, the tokenizers, the event
# loop's own, and headroom.
BASE_RESERVE = 256
# A listener's cap, however low the open-file limit (such a host has too few descriptors for anything).
MIN_MAX_CONNECTIONS = 64

LISTENER_CAP = "listener_cap"
ADDRESS_CAP = "address_cap"


def open_file_limit() -> int:
    """The process's soft limit on open files (``quotagate serve`` raises it to the hard one first)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def default_max_connections(database_pool_size: int, limit: int | None = None) -> int:
    """A listener's cap when none is set: a quarter of the descriptors left after the reserve.

    Four shares, so that every listener can be full at once and still leave the reserve: the LLM listener's
    client connections, one upstream connection for each of them (a request in flight holds both), the
    console's connections and the metrics listener's."""
    limit = open_file_limit() if limit is None else limit
    reserve = BASE_RESERVE + 2 * database_pool_size  # the pool, and as many again on demand
    return max(MIN_MAX_CONNECTIONS, (limit - reserve) // 4)


def address_key(host: str | None) -> str | None:
    """The unit connections are counted by: the address, or its /64 for IPv6 (one host usually holds a whole
    /64). None for a peer without an address (a Unix socket): no per-address cap applies to it."""
    if not host:
        return None
    if ":" not in host:
        return host
    try:
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host[:64]
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


class ConnectionLimits:
    """One listener's connection counts and caps. ``max_open`` None: no cap on the listener;
    ``per_address`` 0: none per address."""

    def __init__(self, name: str, max_open: int | None, per_address: int) -> None:
        self.name = name
        self.max_open = max_open
        self.per_address = per_address
        self.open = 0
        self.by_address: dict[str, int] = {}
        self.refused = {LISTENER_CAP: 0, ADDRESS_CAP: 0}   # since start
        self.head_timeouts = 0                             # new connections closed for want of a request head
        self._unreported = {LISTENER_CAP: 0, ADDRESS_CAP: 0}
        self._last_address: str | None = None
        self._report: asyncio.TimerHandle | None = None

    def admit(self, key: str | None, loop: asyncio.AbstractEventLoop) -> bool:
        """Count a new connection from ``key`` in, or count it refused (and see that it is logged)."""
        if self.max_open is not None and self.open >= self.max_open:
            self._refuse(LISTENER_CAP, key, loop)
            return False
        if key is not None and self.per_address:
            held = self.by_address.get(key, 0)
            if held >= self.per_address:
                self._refuse(ADDRESS_CAP, key, loop)
                return False
            self.by_address[key] = held + 1
        self.open += 1
        return True

    def release(self, key: str | None) -> None:
        """An admitted connection from ``key`` has closed."""
        self.open -= 1
        if key is not None and self.per_address:
            held = self.by_address.get(key, 0) - 1
            if held > 0:
                self.by_address[key] = held
            else:
                self.by_address.pop(key, None)  # (so that many addresses, each seen once, leave nothing)

    def _refuse(self, reason: str, key: str | None, loop: asyncio.AbstractEventLoop) -> None:
        self.refused[reason] += 1
        if reason == ADDRESS_CAP:
            self._last_address = key
        if self._report is None:
            self._log(f"refusing new connections: {self._why(reason, key)}; {self._state()}")
            self._report = loop.call_later(REPORT_SECONDS, self._summary, loop)
        else:
            self._unreported[reason] += 1

    def _summary(self, loop: asyncio.AbstractEventLoop) -> None:
        over_listener, over_address = self._unreported[LISTENER_CAP], self._unreported[ADDRESS_CAP]
        self._unreported = {LISTENER_CAP: 0, ADDRESS_CAP: 0}
        if not over_listener and not over_address:
            self._report = None  # quiet again: the next refusal is logged at once
            return
        parts = []
        if over_listener:
            parts.append(f"{over_listener} over the listener's cap of {self.max_open}")
        if over_address:
            parts.append(f"{over_address} over the cap of {self.per_address} per client address "
                         f"(latest: {self._last_address})")
        self._log(f"refused {over_listener + over_address} more connections in {REPORT_SECONDS:g} s: "
                  f"{', '.join(parts)}; {self._state()}")
        self._report = loop.call_later(REPORT_SECONDS, self._summary, loop)

    def _why(self, reason: str, key: str | None) -> str:
        if reason == LISTENER_CAP:
            return f"the listener's cap of {self.max_open} open connections is reached"
        return f"{key} holds the cap of {self.per_address} connections per client address"

    def _state(self) -> str:
        return (f"{self.open} open from {len(self.by_address)} addresses; refused since start: "
                f"{self.refused[LISTENER_CAP]} (listener cap), {self.refused[ADDRESS_CAP]} (address cap)")

    def _log(self, message: str) -> None:
        log.warning("%s listener: %s", self.name, message)

    def close(self) -> None:
        if self._report is not None:
            self._report.cancel()
            self._report = None


class _HasLimits(Protocol):
    @property
    def limits(self) -> ConnectionLimits: ...


class ConnectionMetrics(Collector):
    """``quotagate_connections_*`` for the listeners of this process, labelled by listener."""

    def __init__(self, listeners: Sequence[_HasLimits]) -> None:
        self.listeners = listeners

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        open_ = GaugeMetricFamily("quotagate_connections_open", "Client connections open", labels=["listener"])
        refused = CounterMetricFamily("quotagate_connections_refused", "New client connections answered 503 "
                                      "and closed because a cap was reached", labels=["listener", "reason"])
        timeouts = CounterMetricFamily("quotagate_connections_head_timeouts", "New client connections closed "
                                       "because their first request head was not whole in time",
                                       labels=["listener"])
        for listener in self.listeners:
            limits = listener.limits
            open_.add_metric([limits.name], limits.open)
            for reason, count in limits.refused.items():
                refused.add_metric([limits.name, reason], count)
            timeouts.add_metric([limits.name], limits.head_timeouts)
        yield from (open_, refused, timeouts)
