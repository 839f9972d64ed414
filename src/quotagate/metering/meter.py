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
from quotagate.metering.journal import Journal
from quotagate.metering.metrics import UsageMetrics
from quotagate.metering.shipper import ShipperOptions, ShipperProcess
from quotagate.metering.store import encode

log = logging.getLogger(__name__)


class JournalMeter:
    """Records usage events durably in a journal under ``directory``; a shipper process it starts ships
    them to the store at ``database_url`` (by default the URL of ``engine``)."""

    def __init__(self, engine: Engine, directory: Path, *, metrics: UsageMetrics | None = None,
                 options: ShipperOptions | None = None, segment_bytes: int = 4 << 20,
                 database_url: str | None = None) -> None:
        options = options or ShipperOptions()
        self.metrics = metrics or UsageMetrics()
        self.journal = Journal(directory, segment_bytes=segment_bytes, seal_after=options.seal_after)
        self.shipper = ShipperProcess(directory, database_url or engine.url.render_as_string(hide_password=False),
                                      options)
        self.lost = 0
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
        await self.shipper.start()
        self._tick = asyncio.create_task(self._upkeep(), name="usage-journal-upkeep")

    async def _upkeep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.journal.seal_if_old()
                self.shipper.check()
            except Exception:
                log.exception("usage journal upkeep failed")

    async def flush(self, within: float = 5.0) -> bool:
        """Wait until everything recorded so far is in the store (False if not done ``within`` seconds)."""
        seq, size = self.journal.position()
        deadline = time.monotonic() + within
        next_wake = 0.0
        while True:
            p = self.shipper.progress(self.journal.writer)
            if p is not None and (p.seq, p.offset) >= (seq, size):
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            if now >= next_wake:  # ask for a pass now rather than at the next interval
                self.shipper.wake()
                next_wake = now + 0.05
            await asyncio.sleep(0.002)

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
        await self.shipper.stop()
