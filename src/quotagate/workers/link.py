"""A worker's end of its control channel (channel.py): the ``Limiter`` that asks the parent, and key
changes in both directions.

The cost on the hot path is one small write and one read per admission (the reply comes back in order,
so a future per request is all the bookkeeping) and one write per settlement, which needs no answer:
the parent applies it before anything this worker sends after it. Keys with no limits, and keys already
known to be revoked, are answered here without a message, as the in-memory limiter does.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import orjson

from quotagate.keys.events import KeyChanged, KeyEvents
from quotagate.keys.models import KeyRecord
from quotagate.limits.errors import LimiterUnavailable
from quotagate.limits.interfaces import Admission, LimitState
from quotagate.workers.channel import (
    ACK,
    ADMIT,
    EVENT,
    EXTEND,
    METRICS,
    SETTLE,
    STATE,
    admission,
    key_fields,
    limit_state,
)

log = logging.getLogger(__name__)

_GONE = "the gateway's parent process is gone; this worker is stopping"


class ParentLink(asyncio.Protocol):
    """The channel to the parent. ``on_lost`` is called once it closes (the parent is gone)."""

    def __init__(self, on_lost: Callable[[], None] = lambda: None) -> None:
        self.on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        # Replies come in the order of the requests: (future, key id of an admission, else None).
        self._waiting: deque[tuple[asyncio.Future[list[Any]], str | None]] = deque()
        self._buffer = b""
        self._out: list[bytes] = []  # lines to send at the end of this turn of the event loop
        self._events: KeyEvents | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._relaying = threading.local()  # set while a change from the parent is being applied here
        self.metrics: Callable[[], bytes] | None = None  # this process's /metrics text, for the parent's

    def listen(self, events: KeyEvents) -> None:
        """Apply the parent's key changes to ``events``, and send it the ones published here."""
        self._events = events
        events.subscribe(self._on_local_change)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # (uvloop's transports are not subclasses)
        self._loop = asyncio.get_running_loop()

    def request(self, message: list[Any], admitting: str | None = None) -> asyncio.Future[list[Any]]:
        """Send ``message`` and return the future of its reply; ``admitting`` is the key id of an
        admission, whose reservation is released if nobody is waiting for the reply any more."""
        transport = self._transport
        if transport is None or self._loop is None:
            raise LimiterUnavailable(_GONE)
        future = self._loop.create_future()
        self._waiting.append((future, admitting))
        self._write(orjson.dumps(message))
        return future

    def send(self, message: list[Any]) -> None:
        """Send ``message``, which has no reply (dropped if the parent is gone: it released everything)."""
        if self._transport is not None:
            self._write(orjson.dumps(message))

    def _write(self, line: bytes) -> None:
        # What the requests of one turn of the event loop send goes out in one write at its end: under
        # load one system call (and one read and one write in the parent) carries many messages.
        out = self._out
        out.append(line)
        if len(out) == 1:
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        out = self._out
        if self._transport is not None and out:
            out.append(b"")
            self._transport.write(b"\n".join(out))
        out.clear()

    def data_received(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            m = orjson.loads(line)
            if m[0] == EVENT:
                self._apply(m)
            elif m[0] == METRICS:
                self.send([METRICS, m[1], self.metrics().decode() if self.metrics is not None else ""])
            else:
                future, admitting = self._waiting.popleft()
                if not future.done():
                    future.set_result(m)
                elif admitting is not None and m[2] is not None:
                    # The request was cancelled (its client left) while the admission was on its way.
                    self.send([SETTLE, admitting, m[2], 0])

    def _apply(self, m: list[Any]) -> None:
        if self._events is not None:
            self._relaying.active = True
            try:
                self._events.publish(KeyChanged(key_id=m[2], secret_hash=m[3], project_id=m[4]))
            finally:
                self._relaying.active = False
        self.send([ACK, m[1]])

    def _on_local_change(self, change: KeyChanged) -> None:
        if getattr(self._relaying, "active", False) or self._loop is None:
            return
        message = [EVENT, change.key_id, change.secret_hash, change.project_id]
        self._loop.call_soon_threadsafe(self.send, message)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        while self._waiting:
            future, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(LimiterUnavailable(_GONE))
        log.warning("the channel to the parent process closed; stopping")
        self.on_lost()


class SharedLimiter:
    """The ``Limiter`` of a worker: the parent's ``MemoryLimiter``, over ``link`` (see hub.py)."""

    def __init__(self, link: ParentLink) -> None:
        self._link = link

    async def admit(self, key: KeyRecord, prompt_tokens: int, max_completion: int,
                    min_completion: int = 1, model: str | None = None) -> Admission:
        if key.revoked:
            return Admission(admitted=False, refusal="key_revoked")
        if not key.scopes(model):
            return Admission(admitted=True)
        return admission(await self._link.request([ADMIT, *key_fields(key), prompt_tokens, max_completion,
                                                   min_completion, model], key.id))

    async def extend(self, key: KeyRecord, admission: Admission, tokens: int) -> int:
        if admission.reservation is None or tokens <= 0 or key.revoked:
            return 0
        try:
            reply = await self._link.request([EXTEND, *key_fields(key), admission.reservation, tokens])
        except LimiterUnavailable:
            return 0
        added: int = reply[1]
        return added

    async def settle(self, key: KeyRecord, admission: Admission, actual_tokens: int) -> None:
        if admission.reservation is not None:
            self._link.send([SETTLE, key.id, admission.reservation, actual_tokens])

    async def state(self, key: KeyRecord) -> LimitState:
        return limit_state(await self._link.request([STATE, *key_fields(key)]))

    async def close(self) -> None:
        return None
