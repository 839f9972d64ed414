"""The gateway's key cache: secret hash → frozen ``KeyRecord``, so that no request of a known key
touches the store.

- A miss loads once: concurrent misses for the same hash share one lookup, run in a worker thread
  (the store is synchronous SQLAlchemy).
- Unknown hashes are remembered for ``negative_ttl`` seconds (at most ``negative_max`` of them), so a
  flood of made-up (but well-formed) keys costs one lookup per hash, not one per request.
- ``invalidate`` is subscribed to the key events bus: a revoked or edited key is dropped before the
  console's answer leaves, so the very next request reloads it. It is called from the console's worker
  threads, hence the lock around "store unless invalidated meanwhile".
- Safety net for several processes without Redis (which would carry the events between them): an
  entry older than ``refresh_after`` seconds is reloaded in the background when it is next used
  (stale-while-revalidate); the request that notices it is not delayed. So another process's
  revocation takes effect here at most ``refresh_after`` seconds plus one request later.
- ``revoked`` is the other way a revocation arrives: the limiter refused the key as revoked (with Redis,
  another instance's revocation marker) before any event reached this cache. The entry is turned into a
  revoked copy at once (later requests are refused without a limiter call) and reloaded from the store.
- ``hits`` (answered from the cache, known or unknown) and ``misses`` (went to the store) are counted
  for the metrics (``quotagate_key_cache_*``).
- At most ``max_lookups`` lookups run at once (the rest wait their turn), so a flood of made-up keys
  cannot take every worker thread and store connection; ``get``'s ``before_lookup`` lets the caller
  refuse a lookup (a client address that sent too many unknown keys, ``authfail.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from quotagate.keys.events import KeyChanged
from quotagate.keys.models import KeyRecord

log = logging.getLogger(__name__)

Resolver = Callable[[str], KeyRecord | None]


class _Load:
    __slots__ = ("future", "stale")

    def __init__(self, future: asyncio.Future[KeyRecord | None]) -> None:
        self.future = future
        self.stale = False  # an invalidation arrived while loading: use the result once, do not cache it


class KeyCache:
    def __init__(self, resolve: Resolver, *, refresh_after: float = 5.0, negative_ttl: float = 2.0,
                 negative_max: int = 10_000, max_lookups: int = 8,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._resolve = resolve
        self._lookups = asyncio.Semaphore(max_lookups)
        self._refresh_after = refresh_after
        self._negative_ttl = negative_ttl
        self._negative_max = negative_max
        self._clock = clock
        self._entries: dict[str, tuple[KeyRecord, float]] = {}
        self._negative: dict[str, float] = {}
        self._pending: dict[str, _Load] = {}
        self._lock = threading.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, secret_hash: str, before_lookup: Callable[[], None] | None = None) -> KeyRecord | None:
        """The key with that secret hash, or None if there is none. Raises if the store fails on a miss,
        or whatever ``before_lookup`` raises when the key must be looked up in the store."""
        entry = self._entries.get(secret_hash)
        if entry is not None:
            self.hits += 1
            record, loaded = entry
            if self._clock() - loaded > self._refresh_after:
                self._refresh_soon(secret_hash)
            return record
        until = self._negative.get(secret_hash)
        if until is not None:
            if until > self._clock():
                self.hits += 1
                return None
            self._negative.pop(secret_hash, None)
        if before_lookup is not None:
            before_lookup()
        self.misses += 1
        return await self._load(secret_hash)

    def revoked(self, secret_hash: str) -> None:
        """The key was found revoked elsewhere (the limiter said so): refuse it from the cache from now
        on, and reload it from the store in the background (call on the event loop)."""
        with self._lock:
            entry = self._entries.get(secret_hash)
            if entry is not None and not entry[0].revoked:
                self._entries[secret_hash] = (dataclasses.replace(entry[0], revoked=True), entry[1])
        self._refresh_soon(secret_hash)

    def _refresh_soon(self, secret_hash: str) -> None:
        if secret_hash in self._pending:
            return
        task = asyncio.get_running_loop().create_task(self._refresh(secret_hash))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def invalidate(self, change: KeyChanged) -> None:
        """Drop the key's entry (key events listener; safe to call from any thread)."""
        with self._lock:
            self._entries.pop(change.secret_hash, None)
            self._negative.pop(change.secret_hash, None)
            load = self._pending.get(change.secret_hash)
            if load is not None:
                load.stale = True

    async def _load(self, secret_hash: str) -> KeyRecord | None:
        load = self._pending.get(secret_hash)
        if load is not None:
            return await asyncio.shield(load.future)
        load = _Load(asyncio.get_running_loop().create_future())
        self._pending[secret_hash] = load
        try:
            async with self._lookups:
                record = await asyncio.to_thread(self._resolve, secret_hash)
        except BaseException as exc:
            self._pending.pop(secret_hash, None)
            if not load.future.done():
                load.future.set_exception(exc)
                load.future.exception()  # mark retrieved: waiters (if any) get it through shield
            raise
        with self._lock:
            self._pending.pop(secret_hash, None)
            if not load.stale:
                self._store(secret_hash, record)
        load.future.set_result(record)
        return record

    def _store(self, secret_hash: str, record: KeyRecord | None) -> None:
        if record is not None:
            self._entries[secret_hash] = (record, self._clock())
            self._negative.pop(secret_hash, None)
            return
        self._entries.pop(secret_hash, None)
        if len(self._negative) >= self._negative_max:
            # Oldest first (dicts keep insertion order): expired ones go, and if none has, the oldest.
            now = self._clock()
            for h in [h for h, until in self._negative.items() if until <= now] or [next(iter(self._negative))]:
                self._negative.pop(h, None)
        self._negative[secret_hash] = self._clock() + self._negative_ttl

    async def _refresh(self, secret_hash: str) -> None:
        try:
            await self._load(secret_hash)
        except Exception:
            log.warning("could not refresh a cached key from the store; keeping the cached copy", exc_info=True)
            with self._lock:
                entry = self._entries.get(secret_hash)
                if entry is not None:  # try again after another refresh interval, not on every request
                    self._entries[secret_hash] = (entry[0], self._clock())

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
