"""The one-time hand-over of a just-made secret from a form's POST to the page its redirect opens.

Every form answers with a redirect (Post/Redirect/Get), so reloading the page never posts again: F5
after **Create key** must not mint a second key. The new secret still has to be shown once, so the POST
leaves it here, in this process's memory, bound to the web session that made it and to the page it is
for; the GET of that page takes it out (and so shows it once). It is never in a URL, a cookie, a log or
the database, and it is dropped unshown after ``ttl`` seconds.

Several console instances behind one address need the redirect to reach the instance that took the POST
(session affinity), else the dialog does not show: the key then exists, but its secret is lost (rotate it).
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

# Long enough for a slow redirect, short enough that an unshown secret does not linger.
TTL_SECONDS = 120.0
# A bound on memory whatever sessions do; the oldest unshown secrets go first.
MAX_PENDING = 10_000


@dataclass(frozen=True, slots=True)
class Made:
    """What the dialog shows: the new thing's name, its masked prefix and (this once) its secret."""

    name: str
    prefix: str
    secret: str
    title: str

    def __repr__(self) -> str:  # never the secret, should this end up in a log or a traceback
        return f"Made(name={self.name!r}, prefix={self.prefix!r})"


class Handover:
    """Pending secrets by (session token id, page path). Used from the event loop only (the web
    console's handlers are coroutines), so it needs no lock."""

    def __init__(self, ttl: float = TTL_SECONDS, max_pending: int = MAX_PENDING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_pending = max_pending
        self.clock = clock
        # Oldest first; with one ttl for all, that is also soonest to expire.
        self._pending: OrderedDict[tuple[str, str, int], tuple[float, Made]] = OrderedDict()
        self._slots: dict[tuple[str, str], deque[int]] = {}
        self._serial = itertools.count()

    def put(self, session_id: str, path: str, made: Made) -> None:
        """Keep ``made`` for the next GET of ``path`` by the session ``session_id``."""
        self._expire()
        serial = next(self._serial)
        self._pending[(session_id, path, serial)] = (self.clock() + self.ttl, made)
        self._slots.setdefault((session_id, path), deque()).append(serial)
        while len(self._pending) > self.max_pending:
            self._drop_oldest()

    def take(self, session_id: str, path: str) -> Made | None:
        """The oldest secret left for this session and page, removed: it is shown once. (Two made at
        once, say in two tabs, are shown one after the other, none lost.)"""
        self._expire()
        serials = self._slots.get((session_id, path))
        if not serials:
            return None
        serial = serials.popleft()
        if not serials:
            del self._slots[(session_id, path)]
        return self._pending.pop((session_id, path, serial))[1]

    def _drop_oldest(self) -> None:
        (session_id, path, serial), _ = self._pending.popitem(last=False)
        serials = self._slots[(session_id, path)]
        serials.remove(serial)  # the oldest of its slot, so the first: cheap
        if not serials:
            del self._slots[(session_id, path)]

    def _expire(self) -> None:
        now = self.clock()
        while self._pending and next(iter(self._pending.values()))[0] <= now:
            self._drop_oldest()

    def __len__(self) -> int:
        return len(self._pending)
