"""Micro-benchmark of admit() + settle() per backend (not a test; run by hand):

    .venv/bin/python -m tests.limits.bench_admit [--redis redis://127.0.0.1:6379/0] [--seconds 3]

Reports admissions per second on one core (one event loop), and for Redis the p50/p99 latency of a
lone admission and the throughput with many in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import uvloop

from quotagate.limits.interfaces import Limiter
from quotagate.limits.memory import MemoryLimiter
from quotagate.limits.redis import RedisLimiter
from tests.limits.conftest import make_key

BIG = 10**12


async def sequential(lim: Limiter, seconds: float, keys: int) -> tuple[float, list[float]]:
    ks = [make_key(rpm=BIG, tpm=BIG, token_limit=BIG, period="month") for _ in range(keys)]
    n, lat = 0, []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(100):
            t = time.perf_counter()
            adm = await lim.admit(ks[n % keys], 100, 200)
            lat.append(time.perf_counter() - t)
            await lim.settle(ks[n % keys], adm, 150)
            n += 1
    return n / seconds, lat


async def concurrent(lim: Limiter, seconds: float, keys: int, width: int) -> float:
    ks = [make_key(rpm=BIG, tpm=BIG, token_limit=BIG, period="month") for _ in range(keys)]
    count = 0
    end = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal count
        while time.perf_counter() < end:
            key = ks[(i + count) % keys]
            adm = await lim.admit(key, 100, 200)
            await lim.settle(key, adm, 150)
            count += 1

    await asyncio.gather(*(worker(i) for i in range(width)))
    return count / seconds


def pct(lat: list[float], q: int) -> float:
    return statistics.quantiles(lat, n=100)[q - 1] * 1e6 if q < 100 else max(lat) * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()
    mem = MemoryLimiter()
    rate, lat = await sequential(mem, a.seconds, 1000)
    print(f"memory  sequential: {rate:>9,.0f} admit+settle/s  p50 {pct(lat, 50):.1f} µs  p99 {pct(lat, 99):.1f} µs")
    prefix = f"qgbench{uuid.uuid4().hex[:8]}"
    red = RedisLimiter.from_url(a.redis, prefix=prefix)
    try:
        rate, lat = await sequential(red, a.seconds, 1000)
        print(f"redis   sequential: {rate:>9,.0f} admit+settle/s  p50 {pct(lat, 50):.0f} µs  p99 {pct(lat, 99):.0f} µs")
        for width in (16, 64):
            rate = await concurrent(red, a.seconds, 1000, width)
            print(f"redis   {width:>3} in flight: {rate:>9,.0f} admit+settle/s")
        await red.flush()
    finally:
        keys = [k async for k in red.client.scan_iter(match=prefix + ":*", count=5000)]
        for i in range(0, len(keys), 1000):
            await red.client.delete(*keys[i:i + 1000])
        await red.close()


if __name__ == "__main__":
    uvloop.run(main())
