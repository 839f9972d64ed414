"""Key changes relayed between instances over the shared Redis, and revocations marked for the limiter."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from quotagate.keys.events import KeyChanged, KeyEvents
from quotagate.keys.models import KeyRecord
from quotagate.limits import build_broadcaster
from quotagate.limits.broadcast import KeyBroadcaster
from quotagate.limits.redis import RedisLimiter
from tests.limits.conftest import REDIS_URL, make_key, redis_prefix

pytestmark = [pytest.mark.anyio, pytest.mark.skipif(not REDIS_URL, reason="QUOTAGATE_TEST_REDIS_URL=''")]


@dataclass
class Instance:
    """What one gateway instance has: its bus, a listener on it, its limiter and its broadcaster."""

    events: KeyEvents
    limiter: RedisLimiter
    broadcaster: KeyBroadcaster
    heard: list[tuple[float, KeyChanged]] = field(default_factory=list)
    got: asyncio.Event = field(default_factory=asyncio.Event)


class Store:
    """Stands in for the key store: records by secret hash."""

    def __init__(self) -> None:
        self.records: dict[str, KeyRecord] = {}

    def resolve(self, secret_hash: str) -> KeyRecord | None:
        return self.records.get(secret_hash)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Instance, Instance, Store]]:
    store = Store()
    async with redis_prefix() as prefix:
        instances = []
        loop = asyncio.get_running_loop()
        for _ in range(2):
            events = KeyEvents()
            limiter = RedisLimiter.from_url(REDIS_URL, prefix=prefix)
            broadcaster = build_broadcaster(limiter, events, store.resolve)
            assert broadcaster is not None
            inst = Instance(events, limiter, broadcaster)

            def listen(change: KeyChanged, inst: Instance = inst) -> None:
                inst.heard.append((time.monotonic(), change))
                loop.call_soon_threadsafe(inst.got.set)

            events.subscribe(listen)
            await broadcaster.start()
            instances.append(inst)
        yield instances[0], instances[1], store
        for inst in instances:
            await inst.broadcaster.stop()
            await inst.limiter.close()


def change_of(key: KeyRecord) -> KeyChanged:
    return KeyChanged(key_id=key.id, secret_hash=key.secret_hash, project_id=key.project_id)


async def test_a_change_reaches_the_other_instance_within_100ms(pair: tuple[Instance, Instance, Store]) -> None:
    a, b, store = pair
    key = make_key(rpm=5)
    store.records[key.secret_hash] = key
    for _ in range(5):
        b.got.clear()
        b.heard.clear()
        sent = time.monotonic()
        a.events.publish(change_of(key))
        await asyncio.wait_for(b.got.wait(), 2)
        assert b.heard[0][0] - sent < 0.1
        assert b.heard[0][1] == change_of(key)
    await asyncio.sleep(0.2)
    # Each instance heard each change exactly once: nothing echoed back, nothing relayed twice.
    assert len(a.heard) == 5 and len(b.heard) == 1


async def test_changes_published_from_worker_threads_are_relayed(pair: tuple[Instance, Instance, Store]) -> None:
    a, b, _ = pair
    keys = [make_key() for _ in range(20)]
    threads = [threading.Thread(target=a.events.publish, args=(change_of(k),)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = time.monotonic() + 2
    while len(b.heard) < 20 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert sorted(c.key_id for _, c in b.heard) == sorted(k.id for k in keys)


async def test_a_revocation_is_marked_so_a_lost_message_cannot_let_the_key_in(
        pair: tuple[Instance, Instance, Store]) -> None:
    a, b, store = pair
    key = make_key(rpm=100)
    store.records[key.secret_hash] = key
    assert (await b.limiter.admit(key, 1, 1)).admitted
    await b.broadcaster.stop()  # b misses every message from now on
    store.records[key.secret_hash] = replace(key, revoked=True)
    a.events.publish(change_of(key))
    deadline = time.monotonic() + 2
    while (await b.limiter.admit(key, 1, 1)).admitted and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    # b's cache still holds the unrevoked record, yet its limiter refuses the key
    refused = await b.limiter.admit(key, 1, 1)
    assert refused.refusal == "key_revoked"
    assert not b.heard


async def test_an_edit_does_not_mark_the_key(pair: tuple[Instance, Instance, Store]) -> None:
    a, b, store = pair
    key = make_key(rpm=100)
    store.records[key.secret_hash] = key
    a.events.publish(change_of(key))
    await asyncio.wait_for(b.got.wait(), 2)
    assert (await b.limiter.admit(key, 1, 1)).admitted


async def test_the_runtime_wires_the_broadcaster(tmp_path: Path) -> None:
    from quotagate.app import Runtime
    from quotagate.settings import Settings

    runtime = Runtime.build(Settings(data_dir=tmp_path, redis_url=REDIS_URL))
    try:
        assert isinstance(runtime.limiter, RedisLimiter)
        assert isinstance(runtime.extras.get("broadcaster"), KeyBroadcaster)
        await runtime.start()
        await runtime.stop()
    finally:
        runtime.close()
