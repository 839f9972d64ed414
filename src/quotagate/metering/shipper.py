"""The shipper: a background task that moves journal records to the store and trims the journal.

Order of work, which is what makes it safe: read a batch, store it in one transaction (idempotent by
request id), only then advance past it and delete fully shipped segments. A crash anywhere in between
re-ships records that the store already holds, and the store counts them no second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine

from quotagate.metering.interfaces import UsageEvent
from quotagate.metering.journal import Journal, list_segments, read_segment, try_lock
from quotagate.metering.store import Retention, decode, maintain, store_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ShipperOptions:
    batch_size: int = 1000
    interval: float = 0.1            # seconds between looks at the journal when nothing wakes the shipper
    seal_after: float = 10.0         # start a new segment once the active one is shipped and this old
    sync_interval: float = 1.0       # fsync the active segment this often (bounds a power cut's loss)
    orphan_interval: float = 30.0    # look for journals of processes that are gone
    maintain_interval: float = 300.0 # roll up buckets and purge old activity
    retention: Retention = field(default_factory=Retention)


@dataclass
class ShipperStats:
    shipped: int = 0                 # records of this writer that are in the store
    stored: int = 0                  # events new to the store (not already there)
    adopted: int = 0                 # records shipped from other (dead) writers' journals
    failures: int = 0
    skipped: int = 0                 # unreadable records


class Shipper:
    def __init__(self, journal: Journal, engine: Engine, options: ShipperOptions | None = None,
                 store: Callable[[Engine, list[UsageEvent]], int] = store_batch) -> None:
        self.journal = journal
        self.engine = engine
        self.options = options or ShipperOptions()
        self.stats = ShipperStats()
        self._store = store
        self._offsets: dict[int, int] = {}           # shipped offset of this writer's segments
        self._shipped_to: tuple[int, int] = (0, 0)   # everything before this position is stored
        self._sealed_at = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False

    # -- blocking work, in a thread ----------------------------------------------------------------
    def _decode(self, records: list[bytes]) -> list[UsageEvent]:
        events = []
        for payload in records:
            try:
                events.append(decode(payload))
            except (ValueError, TypeError):
                self.stats.skipped += 1
                log.error("usage journal: skipping an unreadable record (%d bytes)", len(payload))
        return events

    def _ship_file(self, path: Path, offset: int, until_end: bool) -> tuple[int, bool, int]:
        """Ship ``path`` from ``offset``; returns (new offset, damaged tail seen, records shipped)."""
        count = 0
        while True:
            chunk = read_segment(path, offset, self.options.batch_size)
            if chunk.records:
                self.stats.stored += self._store(self.engine, self._decode(chunk.records))
                offset = chunk.end
                count += len(chunk.records)
            if chunk.damaged or len(chunk.records) < self.options.batch_size or not until_end:
                return offset, chunk.damaged, count

    def ship_own(self, *, seal: bool = False) -> None:
        """Ship this writer's segments in order; delete the sealed ones once shipped, and seal the
        active one when it is shipped and old enough (or ``seal`` is set)."""
        for seq, path, sealed in self.journal.segments():
            offset = self._offsets.get(seq, 0)
            offset, damaged, count = self._ship_file(path, offset, until_end=True)
            self._offsets[seq] = offset
            self.stats.shipped += count
            self._shipped_to = (seq, offset)
            if sealed:
                if damaged:
                    log.error("usage journal: segment %s ends with a damaged record", path.name)
                self.journal.forget(seq)
                del self._offsets[seq]
                continue
            old = time.monotonic() - self._sealed_at >= self.options.seal_after
            if (seal or old) and self.journal.seal_if_shipped(seq, offset, min_bytes=1):
                del self._offsets[seq]
                self._sealed_at = time.monotonic()

    def ship_orphans(self) -> int:
        """Ship and delete the segments of writers whose process is gone; returns records shipped."""
        directory = self.journal.directory
        if not directory.exists():
            return 0
        total = 0
        segments = list_segments(directory)
        writers = set(segments) | {p.stem for p in directory.glob("*.lock")}
        for writer in sorted(writers - {self.journal.writer}):
            lock_path = directory / f"{writer}.lock"
            fd = try_lock(lock_path)
            if fd is None:
                continue  # a live process writes it
            try:
                for _seq, path in segments.get(writer, []):
                    try:
                        _offset, damaged, count = self._ship_file(path, 0, until_end=True)
                    except FileNotFoundError:
                        continue  # another process adopted it first
                    if damaged:
                        log.warning("usage journal: %s ends with a record cut short by a crash; ignored",
                                    path.name)
                    total += count
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                with contextlib.suppress(FileNotFoundError):
                    lock_path.unlink()
            finally:
                os.close(fd)
        if total:
            log.info("usage journal: shipped %d records left by an earlier process", total)
        self.stats.adopted += total
        return total

    # -- positions, for flush and for the backlog metric ----------------------------------------
    @property
    def shipped_to(self) -> tuple[int, int]:
        return self._shipped_to

    def backlog_records(self) -> int:
        return max(0, self.journal.appended - self.stats.shipped)

    # -- the task ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Ship what earlier processes left, then keep shipping in the background."""
        try:
            await asyncio.to_thread(self.ship_orphans)
        except Exception:
            self.stats.failures += 1
            log.exception("usage journal: could not ship an earlier process's journal yet; will retry")
        self._task = asyncio.create_task(self._run(), name="usage-shipper")

    async def stop(self, within: float = 15.0) -> None:
        """Stop the task, then ship what is left (for up to ``within`` seconds; what is not shipped stays in the
        journal for the next process)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        try:
            await asyncio.wait_for(asyncio.to_thread(self.ship_own), within)
        except Exception:
            log.exception("usage journal: records left unshipped at exit; the next start ships them")

    def wake(self) -> None:
        self._wake.set()

    async def flush(self, within: float = 5.0) -> bool:
        """Wait until every record written before this call is in the store; False on timeout."""
        target = self.journal.position()
        deadline = time.monotonic() + within
        while self._shipped_to < target:
            if time.monotonic() >= deadline or self._task is None or self._task.done():
                return False
            self._wake.set()
            await asyncio.sleep(0.005)
        return True

    async def _run(self) -> None:
        opts = self.options
        now = time.monotonic()
        next_sync = now + opts.sync_interval
        next_orphans = now + opts.orphan_interval
        next_maintain = now + 5.0
        backoff = opts.interval
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff)
            self._wake.clear()
            if self._stopping:
                break
            now = time.monotonic()
            try:
                if self._pending() or (now - self._sealed_at >= opts.seal_after and self.journal.position()[1]):
                    await asyncio.to_thread(self.ship_own)
                if now >= next_sync:
                    next_sync = now + opts.sync_interval
                    await asyncio.to_thread(self.journal.sync)
                if now >= next_orphans:
                    next_orphans = now + opts.orphan_interval
                    await asyncio.to_thread(self.ship_orphans)
                if now >= next_maintain:
                    next_maintain = now + opts.maintain_interval
                    done = await asyncio.to_thread(maintain, self.engine, datetime.now(UTC), opts.retention)
                    log.debug("usage upkeep: %s", done)
                backoff = opts.interval
            except Exception:
                self.stats.failures += 1
                if self.stats.failures == 1 or self.stats.failures % 100 == 0:
                    log.exception("usage shipping failed (%d failures so far); retrying", self.stats.failures)
                backoff = min(max(backoff * 2, 0.5), 30.0)

    def _pending(self) -> bool:
        return self._shipped_to < self.journal.position()
