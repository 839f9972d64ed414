"""The ``Meter`` the gateway records into: metrics in memory, then one append to the local journal.

Shipping is another process's work (``shipper.py``): this process only appends, seals old segments,
and keeps the shipper process running."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from sqlalchemy import Engine

from quotagate.metering.interfaces import UsageEvent
from quotagate.metering.journal import Journal, list_segments, segment_name
from quotagate.metering.metrics import UsageMetrics
from quotagate.metering.shipper import ShipperOptions, ShipperProcess
from quotagate.metering.store import encode

log = logging.getLogger(__name__)


class JournalMeter:
    """Records usage events durably in a journal under ``directory``; a shipper process it starts ships
    them to the store at ``database_url`` (by default the URL of ``engine``)."""

    def __init__(self, engine: Engine, directory: Path, *, metrics: UsageMetrics | None = None,
                 options: ShipperOptions | None = None, segment_bytes: int = 4 << 20,
                 database_url: str | None = None, ship: bool = True) -> None:
        options = options or ShipperOptions()
        self.metrics = metrics or UsageMetrics()
        self.journal = Journal(directory, segment_bytes=segment_bytes, seal_after=options.seal_after)
        self.shipper = ShipperProcess(directory, database_url or engine.url.render_as_string(hide_password=False),
                                      options)
        self.lost = 0
        # False in the workers of ``serve --workers N``: their parent's meter runs the one shipper of the
        # directory (each worker still writes journal files of its own, under its own writer lock).
        self.ships = ship
        self._tick: asyncio.Task[None] | None = None

    def record(self, event: UsageEvent) -> None:
        """Count the event and append it to the journal; durable against a killed process on return.

        Never raises: a request must not fail because its usage could not be written (that is logged,
        counted, and visible in the metrics)."""
        try:
            self.metrics.observe(event)
            self.journal.append(encode(event))
        except Exception:
            self.lost += 1
            log.exception("usage journal: could not record request %s", event.request_id)

    async def start(self) -> None:
        """Open the journal, start the shipper process and wait for its first pass (which ships what
        processes now gone left in the journal)."""
        if not self.journal.is_open:
            self.journal.open()
        if self.ships:
            await self.shipper.start()
        self._tick = asyncio.create_task(self._upkeep(), name="usage-journal-upkeep")

    async def _upkeep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.journal.seal_if_old()
                if self.ships:
                    self.shipper.check()
            except Exception:
                log.exception("usage journal upkeep failed")

    async def flush(self, within: float = 15.0) -> bool:
        """Wait until everything recorded so far, by this process and by every other writer of the
        directory (the workers of ``serve --workers N``), is in the store (False if not done ``within``
        seconds).

        The wait is long because the shipper runs at nice 19: on a machine busy with other work a pass
        can take seconds, and an answer that leaves out the caller's own requests is wrong, not late
        (a usage read that gave up after 5 s once missed a request answered just before it)."""
        targets = self._positions()
        deadline = time.monotonic() + within
        next_wake = 0.0
        while True:
            targets = {w: pos for w, pos in targets.items() if not self._shipped(w, *pos)}
            if not targets:
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            if now >= next_wake:  # ask for a pass now rather than at the next interval
                self.shipper.wake()
                next_wake = now + 0.05
            await asyncio.sleep(0.002)

    def _positions(self) -> dict[str, tuple[int, int]]:
        """Where each writer's journal ends now: writer -> (last segment's sequence number, its size)."""
        positions: dict[str, tuple[int, int]] = {}
        found = list_segments(self.journal.directory) if self.journal.directory.exists() else {}
        for writer, segments in found.items():
            seq, path = segments[-1]
            with contextlib.suppress(FileNotFoundError):
                positions[writer] = (seq, path.stat().st_size)
        positions[self.journal.writer] = self.journal.position()
        return positions

    def _shipped(self, writer: str, seq: int, size: int) -> bool:
        p = self.shipper.progress(writer)
        if p is not None and (p.seq, p.offset) >= (seq, size):
            return True
        if size == 0 and p is None:
            return True  # nothing written there
        # A dead writer's segments are deleted once stored to their end (and then it has no progress).
        return writer != self.journal.writer and not (self.journal.directory / segment_name(writer, seq)).exists()

    def backlog_records(self) -> int:
        """Records this process journaled that are not known to be in the store yet."""
        p = self.shipper.progress(self.journal.writer)
        if p is None:
            return self.journal.appended
        before = self.journal.records_before(p.seq)
        if before is None:
            return self.journal.appended
        return max(0, self.journal.appended - before - p.records)

    def shipped_records(self) -> int:
        return self.journal.appended - self.backlog_records()

    async def close(self) -> None:
        """Stop recording; the shipper ships what is left (this writer is gone once its journal is
        closed) and exits. What it cannot ship in time stays in the journal for the next start."""
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
        self.journal.close()
        if self.ships:
            await self.shipper.stop()
