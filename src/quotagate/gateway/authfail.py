"""Failed authentications per client address: a client that keeps sending well-formed but unknown keys
(the checksum is public, so anyone can make them) is stopped from costing a store lookup each.

Counted in fixed one-minute windows per address. Past ``per_minute`` failures, the address's requests
with a key that is not already in the cache get 429 without a lookup until its window ends; keys the
cache knows keep working from that address (a shared NAT or proxy is not shut out for everyone).
At most ``max_addresses`` are tracked; past that the oldest windows are forgotten first.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from quotagate.gateway.errors import ApiError

WINDOW = 60.0


class FailedAuthThrottle:
    def __init__(self, per_minute: int, *, max_addresses: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = per_minute
        self._max = max_addresses
        self._clock = clock
        self._windows: dict[str | None, list[float]] = {}  # address -> [window start, failures]

    def check(self, address: str | None) -> None:
        """Raise a 429 if ``address`` has used up its failures for this minute (call before a lookup)."""
        if not self._limit:
            return
        window = self._windows.get(address)
        if window is None or window[1] < self._limit:
            return
        left = window[0] + WINDOW - self._clock()
        if left > 0:
            raise ApiError(429, "too_many_failed_authentications", "Too many requests with unknown API keys "
                           "from this address; try again later with a valid key.", retry_after=left,
                           should_retry=False)

    def failed(self, address: str | None) -> None:
        """Count one failed authentication (a well-formed key that is not one) from ``address``."""
        if not self._limit:
            return
        now = self._clock()
        window = self._windows.get(address)
        if window is None or window[0] + WINDOW <= now:
            self._windows.pop(address, None)  # re-inserted last: the dict stays in order of window start
            if len(self._windows) >= self._max:
                for old in [a for a, w in self._windows.items() if w[0] + WINDOW <= now] or [next(iter(self._windows))]:
                    del self._windows[old]
            self._windows[address] = [now, 1.0]
        else:
            window[1] += 1
