"""The ``Meter`` the gateway records into: metrics in memory, then one append to the local journal."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Engine

from quotagate.metering.interfaces import UsageEvent
from quotagate.metering.journal import Journal
from quotagate.metering.metrics import UsageMetrics
from quotagate.metering.shipper import Shipper, ShipperOptions
from quotagate.metering.store import encode

log = logging.getLogger(__name__)


class JournalMeter:
    """Records usage events durably in a journal under ``directory`` and ships them to the store."""

    def __init__(self, engine: Engine, directory: Path, *, metrics: UsageMetrics | None = None,
                 options: ShipperOptions | None = None, segment_bytes: int = 4 << 20) -> None:
        self.metrics = metrics or UsageMetrics()
        self.journal = Journal(directory, segment_bytes=segment_bytes)
        self.shipper = Shipper(self.journal, engine, options)
        self.lost = 0

    def record(self, event: UsageEvent) -> None:
        """Count the event and append it to the journal; durable against a killed process on return.

        Never raises: a request must not fail because its usage could not be written (that is logged,
        counted, and visible in the metrics)."""
        try:
            self.metrics.observe(event)
            if not self.journal.is_open:
                log.warning("usage journal: record() before start(); opening the journal now")
                self.journal.open()
            self.journal.append(encode(event))
        except Exception:
            self.lost += 1
            log.exception("usage journal: could not record request %s", event.request_id)

    async def start(self) -> None:
        if not self.journal.is_open:
            self.journal.open()
        await self.shipper.start()

    async def flush(self, within: float = 5.0) -> bool:
        """Wait until everything recorded so far is in the store (False if not done ``within`` seconds)."""
        return await self.shipper.flush(within)

    async def close(self) -> None:
        await self.shipper.stop()
        self.journal.close_if_shipped(self.shipper.shipped_to)
