"""The parent's end of the workers' control channels (channel.py): the one limiter every worker admits
through (the embedded default: the parent's ``MemoryLimiter``), and the fan-out of key changes.

Exactness comes from there being one limiter: each request is checked and reserved by ``admit_sync`` on
the parent's event loop, atomically as in one process. What a worker reserved and had not settled when
its channel closed (the worker exited or was killed) is settled to 0 tokens at once: such a request never
completed, so none of its usage was journaled, and the store (what a restart rebuilds limits from) will
never charge it either. Its request keeps counting against rpm for its minute, as any admitted request.

A key change published in the parent (the console's revocations and edits, and with Redis other
instances' changes) is sent to every worker, and the publishing thread waits until each worker has
applied it to its key cache (``ack_timeout`` at most): when the console's answer to a revocation leaves,
no worker will admit the key again. A change made in a worker comes here and goes out to every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import threading
from typing import Any, cast

import orjson

from quotagate.keys.events import KeyChanged, KeyEvents
from quotagate.keys.models import KeyRecord
from quotagate.limits.memory import MemoryLimiter
from quotagate.workers.channel import (
    ACK,
    ADMIT,
    EVENT,
    EXTEND,
    METRICS,
    READY,
    SETTLE,
    STATE,
    admission_fields,
    key_record,
    record_fields,
    state_fields,
)

log = logging.getLogger(__name__)

_RECORDS = 100_000  # key records kept for reuse (bounded: cleared when full)


class _Wait:
    """One change on its way to every worker: the links yet to acknowledge it."""

    __slots__ = ("done", "pending")

    def __init__(self, pending: set[HubLink]) -> None:
        self.pending = pending
        self.done = threading.Event()


class _Scrape:
    """The workers' /metrics texts asked for at once, by worker index, as they come."""

    __slots__ = ("complete", "expected", "texts")

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.texts: dict[int, str] = {}
        self.complete = asyncio.Event()


class HubLink(asyncio.Protocol):
    """The parent's end of one worker's channel."""

    def __init__(self, hub: Hub, index: int, name: str) -> None:
        self.hub = hub
        self.index = index
        self.name = name
        self.ready = False  # the worker said it is about to accept connections
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self.held: dict[str, str] = {}  # reservation id -> key id, until settled

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's transports are not subclasses)

    def data_received(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        limiter = self.hub.limiter
        out: list[bytes] = []
        for line in lines:
            m = orjson.loads(line)
            op = m[0]
            if op == SETTLE:
                if limiter is not None and self.held.pop(m[2], None) is not None:
                    limiter.settle_sync(m[1], m[2], m[3])
            elif op == ADMIT:
                assert limiter is not None, "a worker asked for the shared limiter, which only the embedded default has"
                key = self.hub.record(m)
                adm = limiter.admit_sync(key, m[10], m[11], m[12], m[13])
                if adm.reservation is not None:
                    self.held[adm.reservation] = key.id
                out.append(orjson.dumps(admission_fields(adm)))
            elif op == EXTEND:
                assert limiter is not None
                added = limiter.extend_sync(self.hub.record(m), m[10], m[11]) if m[10] in self.held else 0
                out.append(orjson.dumps([0, added]))
            elif op == STATE:
                assert limiter is not None
                out.append(orjson.dumps(state_fields(limiter.state_sync(self.hub.record(m)))))
            elif op == ACK:
                self.hub.acknowledged(self, m[1])
            elif op == EVENT:
                self.hub.events.publish(KeyChanged(key_id=m[1], secret_hash=m[2], project_id=m[3]))
            elif op == METRICS:
                self.hub.metrics_arrived(m[1], self.index, m[2])
            elif op == READY:
                self.ready = True
        if out and self.transport is not None:
            out.append(b"")
            self.transport.write(b"\n".join(out))

    def send_event(self, seq: int, change: KeyChanged) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(orjson.dumps([EVENT, seq, change.key_id, change.secret_hash, change.project_id])
                                 + b"\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        limiter = self.hub.limiter
        if self.held and limiter is not None:
            log.warning("%s is gone: releasing its %d reservation(s) of requests that never completed",
                        self.name, len(self.held))
            for rid, key_id in self.held.items():
                limiter.settle_sync(key_id, rid, 0)
        self.held.clear()
        self.hub.detach(self)


class Hub:
    """Serves ``limiter`` (None with Redis: the workers use Redis themselves) and relays ``events``."""

    def __init__(self, limiter: MemoryLimiter | None, events: KeyEvents, *, ack_timeout: float = 2.0) -> None:
        self.limiter = limiter
        self.events = events
        self.ack_timeout = ack_timeout
        self.links: set[HubLink] = set()
        self._waits: dict[int, _Wait] = {}
        self._records: dict[tuple[Any, ...], KeyRecord] = {}
        self._scrapes: dict[int, _Scrape] = {}  # metrics asked of the workers, by seq
        self._seq = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        events.subscribe(self._on_change)

    def record(self, m: list[Any]) -> KeyRecord:
        """The key record of a request's key fields, reused while they do not change (built once per key
        and version of its limits rather than once per request)."""
        fields = record_fields(m)
        key = self._records.get(fields)
        if key is None:
            if len(self._records) >= _RECORDS:
                self._records.clear()
            key = self._records[fields] = key_record(fields)
        return key

    async def attach(self, sock: socket.socket, index: int, name: str) -> HubLink:
        """Serve worker ``index``'s channel over ``sock`` (the parent's end of its socketpair)."""
        loop = asyncio.get_running_loop()
        self._loop, self._loop_thread = loop, threading.get_ident()
        _transport, link = await loop.connect_accepted_socket(lambda: HubLink(self, index, name), sock)
        self.links.add(link)
        return link

    async def scrape(self, within: float = 2.0) -> dict[int, str]:
        """Every live worker's /metrics text, by worker index (those that answer ``within`` seconds)."""
        seq = next(self._seq)
        links = [link for link in self.links if link.transport is not None]
        scrape = self._scrapes[seq] = _Scrape(len(links))
        for link in links:
            assert link.transport is not None
            link.transport.write(orjson.dumps([METRICS, seq]) + b"\n")
        try:
            if links:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(scrape.complete.wait(), within)
        finally:
            del self._scrapes[seq]
        return scrape.texts

    def metrics_arrived(self, seq: int, index: int, text: str) -> None:
        scrape = self._scrapes.get(seq)
        if scrape is not None:
            scrape.texts[index] = text
            if len(scrape.texts) >= scrape.expected:
                scrape.complete.set()

    def detach(self, link: HubLink) -> None:
        self.links.discard(link)
        for seq in list(self._waits):
            self.acknowledged(link, seq)

    def acknowledged(self, link: HubLink, seq: int) -> None:
        wait = self._waits.get(seq)
        if wait is None:
            return
        wait.pending.discard(link)
        if not wait.pending:
            del self._waits[seq]
            wait.done.set()

    def _fan_out(self, change: KeyChanged, wait: _Wait) -> None:
        seq = next(self._seq)
        wait.pending = {link for link in self.links if link.transport is not None}
        if not wait.pending:
            wait.done.set()
            return
        self._waits[seq] = wait
        for link in wait.pending:
            link.send_event(seq, change)

    def _on_change(self, change: KeyChanged) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # no worker started yet: a worker that starts later loads keys afresh
        wait = _Wait(set())
        if threading.get_ident() == self._loop_thread:
            self._fan_out(change, wait)  # on the loop itself waiting would block the acknowledgements
            return
        loop.call_soon_threadsafe(self._fan_out, change, wait)
        if not wait.done.wait(self.ack_timeout):
            log.warning("a key change of %s was not acknowledged by every worker within %gs",
                        change.key_id, self.ack_timeout)
