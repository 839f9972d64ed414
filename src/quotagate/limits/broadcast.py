"""Relaying key changes between instances over Redis pub/sub, and marking revocations in Redis.

Each instance's ``KeyEvents`` bus tells its own caches about a change at once. The broadcaster is one
more listener on that bus: it hands each local change to a task on the event loop (changes are
published from the console's worker threads), which

1. looks the key up and, if it is revoked, sets the revocation marker that every admission script
   checks (``RedisLimiter.mark_revoked``): even if the message below is lost, no instance admits the
   key again on the limiter path;
2. publishes the change on a channel, tagged with this instance's id.

It also subscribes to that channel and delivers other instances' changes to the local bus without
publishing them again (its own listener recognises a relayed change, so there are no loops).
Delivery is at most once: a message sent while an instance is disconnected from Redis is lost to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
from collections.abc import Callable

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from quotagate.keys.events import KeyChanged, KeyEvents
from quotagate.keys.models import KeyRecord
from quotagate.limits.redis import UNAVAILABLE, RedisLimiter

log = logging.getLogger(__name__)

Resolve = Callable[[str], KeyRecord | None]


class KeyBroadcaster:
    """Relays ``events`` to and from every other instance subscribed to ``channel``."""

    def __init__(self, client: Redis, events: KeyEvents, resolve: Resolve, limiter: RedisLimiter, *,
                 channel: str = "qg:key-changes") -> None:
        self._redis = client
        self._events = events
        self._resolve = resolve
        self._limiter = limiter
        self._channel = channel
        self.instance = secrets.token_hex(8)
        self._relaying = threading.local()  # set while this thread delivers a change from elsewhere
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: asyncio.Queue[KeyChanged] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()
        events.subscribe(self._on_local_change)

    async def start(self) -> None:
        """Subscribe to the channel and start relaying (returns once subscribed)."""
        self._loop = asyncio.get_running_loop()
        self._outbox = asyncio.Queue()
        self._tasks = [self._loop.create_task(self._publish_loop(), name="key-broadcast-out"),
                       self._loop.create_task(self._subscribe_loop(), name="key-broadcast-in")]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), 5.0)

    async def stop(self) -> None:
        """Publish what is still queued (briefly), then stop relaying."""
        if self._outbox is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox.join(), 2.0)
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded: stopping must not hang on an unresponsive Redis
            await asyncio.wait(self._tasks, timeout=2.0)
        self._tasks = []
        self._loop = None

    # --- out: local changes --------------------------------------------------------------------

    def _on_local_change(self, change: KeyChanged) -> None:
        if getattr(self._relaying, "active", False):
            return  # it came from another instance: do not send it back
        loop, outbox = self._loop, self._outbox
        if loop is None or outbox is None:
            return  # not started (e.g. a CLI command): no other instance to tell
        loop.call_soon_threadsafe(outbox.put_nowait, change)

    async def _publish_loop(self) -> None:
        assert self._outbox is not None
        while True:
            change = await self._outbox.get()
            backoff = 0.05
            while True:
                try:
                    await self._send(change)
                    break
                except UNAVAILABLE as exc:
                    log.warning("key change for %s not yet broadcast (%s); retrying", change.key_id, exc)
                except Exception:
                    log.exception("broadcasting the change of %s failed; retrying", change.key_id)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            self._outbox.task_done()

    async def announce(self, change: KeyChanged) -> None:
        """Tell every instance about ``change`` now, from a process that does not relay (a CLI command):
        its revocation marker, then the message. Raises if Redis cannot be reached."""
        await self._send(change)

    async def _send(self, change: KeyChanged) -> None:
        record = await asyncio.to_thread(self._resolve, change.secret_hash)
        if record is not None and record.revoked:
            await self._limiter.mark_revoked(record.id)
        message = orjson.dumps({"origin": self.instance, "key_id": change.key_id,
                                "secret_hash": change.secret_hash, "project_id": change.project_id})
        await self._redis.publish(self._channel, message)

    # --- in: other instances' changes ----------------------------------------------------------

    async def _subscribe_loop(self) -> None:
        backoff = 0.05
        while True:
            pubsub: PubSub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                self._subscribed.set()
                backoff = 0.05
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._deliver(message["data"])
            except UNAVAILABLE as exc:
                self._subscribed.clear()
                log.warning("key change subscription lost (%s); resubscribing", exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _deliver(self, data: bytes) -> None:
        try:
            body = orjson.loads(data)
            if body["origin"] == self.instance:
                return
            change = KeyChanged(key_id=body["key_id"], secret_hash=body["secret_hash"],
                                project_id=body["project_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("ignoring a malformed key change message")
            return
        self._relaying.active = True
        try:
            self._events.publish(change)
        finally:
            self._relaying.active = False
