"""The webhook loop every instance runs (not the workers of ``serve --workers``, whose parent runs it):
every ``poll`` seconds, find new events (detect.py), then deliver what is due (delivery.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy import Engine

from quotagate.ids import utcnow
from quotagate.webhooks.delivery import Claimed, Policy, claim, record, send
from quotagate.webhooks.detect import scan
from quotagate.webhooks.signing import SigningKey

log = logging.getLogger(__name__)

BATCH = 16  # deliveries claimed (and sent concurrently) at a time


class WebhookWorker:
    def __init__(self, engine: Engine, key: SigningKey, policy: Policy, poll: float) -> None:
        self._engine = engine
        self._key = key
        self._policy = policy
        self._poll = poll
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.passes = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="webhooks")

    async def stop(self) -> None:
        """Let an attempt under way finish (its outcome recorded, so it is not sent again), then stop."""
        self._stopping = True
        self.wake()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self._policy.timeout + 5.0)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task

    def wake(self) -> None:
        """Run a pass now rather than at the next poll (safe from any thread: a test event was queued)."""
        if self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to wake
                self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            try:
                await self.run_pass()
            except Exception:
                log.exception("webhooks: a pass failed; trying again in %g s", self._poll)
            self.passes += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll)
            self._wake.clear()

    async def run_pass(self) -> None:
        queued = await asyncio.to_thread(scan, self._engine, utcnow())
        if queued:
            log.info("webhooks: %d new event deliveries queued", queued)
        while not self._stopping:
            batch = await asyncio.to_thread(claim, self._engine, self._key, self._policy, BATCH)
            if not batch:
                return
            await asyncio.gather(*(self._deliver(c) for c in batch))
            if len(batch) < BATCH:
                return

    async def _deliver(self, claimed: Claimed) -> None:
        outcome = await send(claimed, self._policy.timeout)
        kept = await asyncio.to_thread(record, self._engine, claimed, outcome, self._policy)
        if not outcome.ok:
            log.warning("webhooks: delivery %s of %s to webhook %s failed (attempt %d): %s", claimed.row.id,
                        claimed.row.event_type, claimed.row.webhook_id, claimed.row.attempts + 1, outcome.error)
        if not kept:
            log.error("webhooks: the outcome of delivery %s was not recorded (its lease ran out, or its webhook "
                      "was deleted meanwhile)", claimed.row.id)
