"""Redis stopped in the middle of traffic over three instances, then started again: clients get the
documented 503 ``limiter_unavailable`` (never a 500, never a request admitted unchecked), traffic recovers
without restarting quotagate, no limit is exceeded across the outage, and usage loses nothing.

The Redis here is a throwaway one of the test's own (never the machine's shared Redis), with an
append-only file fsynced on every write, as docs/operations.md recommends for hard budgets: its counters
survive the restart, so the limits must hold across it exactly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.redis_server import RedisServer
from tests.fakes.upstream import FakeUpstream
from tests.scaleout.cluster import (
    ONE_REQUEST,
    Cluster,
    Seen,
    assert_nothing_lost,
    postgres_database,
    served,
    spread,
    start_cluster,
)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    yield server
    server.kill()


@pytest.fixture
def own_cluster(tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> Iterator[Cluster]:
    with postgres_database() as url:
        c = start_cluster(tmp_path, url, redis_server.url, upstream.base_url)
        try:
            yield c
        finally:
            c.stop()


def unavailable_total(c: Cluster) -> float:
    total = 0.0
    for gw in c.instances:
        for family in text_string_to_metric_families(gw.metrics()):
            total += sum(s.value for s in family.samples if s.name == "quotagate_limiter_redis_unavailable_total")
    return total


def test_redis_restart_mid_traffic(own_cluster: Cluster, redis_server: RedisServer) -> None:
    c = own_cluster
    keys = {"rpm": c.mint(rpm=100), "budget": c.mint(token_limit=1000, token_limit_period="day"),
            "free": c.mint(rpm=100_000)}
    seen: dict[str, list[Seen]] = {name: [] for name in keys}
    killed: list[float] = []
    restarted: list[float] = []

    def recovered() -> bool:
        if not restarted:
            return False
        after = [x for name in keys for x in seen[name] if x.started > restarted[0]]
        return (any(x.status == 200 for x in after if x in seen["free"])
                and any(x.code == "rate_limit_exceeded" for x in after if x in seen["rpm"])
                and any(x.code == "token_limit_exceeded" for x in after if x in seen["budget"]))

    async def traffic() -> None:
        async with spread(c) as s:
            stop = asyncio.Event()

            async def worker(n: int) -> None:
                names = list(keys)
                while not stop.is_set():
                    name = names[n % len(names)]
                    n += 1
                    seen[name].append(await s.chat(keys[name][0], stream=n % 4 == 0))

            async def operator() -> None:
                await asyncio.sleep(0.8)
                redis_server.kill()
                killed.append(time.monotonic())
                await asyncio.sleep(1.5)
                restarted.append(time.monotonic())
                await asyncio.to_thread(redis_server.start)
                deadline = time.monotonic() + 30
                while not recovered() and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)
                stop.set()

            await asyncio.gather(operator(), *(worker(n) for n in range(24)))

    asyncio.run(traffic())
    everything = [x for name in keys for x in seen[name]]
    outage = [x for x in everything if x.started > killed[0] and x.ended < restarted[0]]
    print(f"\n{len(everything)} requests; {len(outage)} during the outage "
          f"({(restarted[0] - killed[0]) * 1000:.0f} ms); statuses "
          f"{ {st: sum(x.status == st for x in everything) for st in sorted({x.status for x in everything})} }")
    assert {x.status for x in everything} <= {200, 429, 503}, "a request failed otherwise than documented"
    unavailable = [x for x in everything if x.status == 503]
    assert unavailable and outage
    assert all(x.code == "limiter_unavailable" and x.retry_after == "1" for x in unavailable)
    assert all(x.status == 503 for x in outage), "a request was answered without the limiter"
    assert recovered(), "traffic did not recover after Redis came back"
    assert len(served(seen["rpm"])) == 100, "rpm across the outage"
    budget_charged = sum(x.tokens for x in served(seen["budget"]))
    assert 1000 - ONE_REQUEST < budget_charged <= 1000, budget_charged
    assert all(x.code is None for x in served(everything)), "a stream ended in an error"
    assert unavailable_total(c) >= len(unavailable)
    logs = "".join(gw.log() for gw in c.instances)
    assert "Redis limiter unavailable" in logs and "reachable again" in logs
    for name, (_secret, key) in keys.items():
        assert_nothing_lost(c, key["id"], seen[name])
