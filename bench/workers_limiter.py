"""What the shared limiter of ``serve --workers N`` costs per request (not a test; run by hand):

    .venv/bin/python bench/workers_limiter.py [--seconds 3]

Runs admit + settle of keys with rpm, tpm and a budget, from one event loop, against (a) the in-process
``MemoryLimiter`` (one process, as ``--workers 1``) and (b) a worker's ``SharedLimiter``, whose parent (a
forked process here, as in ``serve``) runs the ``MemoryLimiter`` behind a ``Hub``. Reports CPU time per
admit + settle (from /proc: user + system) of the worker's side and of the parent's, and the latency of
a lone admission. CPU times are much less sensitive to a busy machine than the rates are.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.limits.conftest import make_key  # noqa: E402

from quotagate.keys.events import KeyEvents  # noqa: E402
from quotagate.limits.interfaces import Limiter  # noqa: E402
from quotagate.limits.memory import MemoryLimiter  # noqa: E402
from quotagate.workers.hub import Hub  # noqa: E402
from quotagate.workers.link import ParentLink, SharedLimiter  # noqa: E402

BIG = 10**12


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(lim: Limiter, seconds: float, width: int) -> tuple[int, list[float]]:
    """``width`` loops of admit + settle for ``seconds``: how many, and each admission's latency."""
    keys = [make_key(rpm=BIG, tpm=BIG, token_limit=BIG, period="month") for _ in range(1000)]
    count, lat = 0, []
    end = time.perf_counter() + seconds

    async def one(i: int) -> None:
        nonlocal count
        while time.perf_counter() < end:
            key = keys[(i + count) % len(keys)]
            t = time.perf_counter()
            adm = await lim.admit(key, 100, 200)
            lat.append(time.perf_counter() - t)
            await lim.settle(key, adm, 150)
            count += 1

    await asyncio.gather(*(one(i) for i in range(width)))
    return count, lat


def parent(sock: socket.socket) -> None:
    async def serve() -> None:
        hub = Hub(MemoryLimiter(), KeyEvents())
        link = await hub.attach(sock, 0, "bench worker")
        while link.transport is not None:
            await asyncio.sleep(0.1)

    uvloop.run(serve())


async def measure(lim: Limiter, seconds: float, width: int, server: int | None) -> str:
    me = os.getpid()
    cpu0, srv0 = cpu_seconds(me), cpu_seconds(server) if server else 0.0
    count, lat = await load(lim, seconds, width)
    cpu = (cpu_seconds(me) - cpu0) / count * 1e6
    srv = (cpu_seconds(server) - srv0) / count * 1e6 if server else 0.0
    q = statistics.quantiles(lat, n=100)
    return (f"{width:>3} in flight: {count / seconds:>8,.0f} admit+settle/s; CPU per admit+settle: this process "
            f"{cpu:.1f} µs" + (f", the parent {srv:.1f} µs" if server else "") +
            f"; admission p50 {q[49] * 1e6:.0f} µs p99 {q[98] * 1e6:.0f} µs")


async def main(seconds: float, server: int, sock: socket.socket) -> None:
    for width in (1, 64):
        print("in-process MemoryLimiter,", await measure(MemoryLimiter(), seconds, width, None))
    link = ParentLink()
    await asyncio.get_running_loop().create_unix_connection(lambda: link, sock=sock)
    shared = SharedLimiter(link)
    for width in (1, 64):
        print("worker's SharedLimiter,  ", await measure(shared, seconds, width, server))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    mine, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        mine.close()
        parent(theirs)
        os._exit(0)
    theirs.close()
    try:
        uvloop.run(main(args.seconds, pid, mine))
    finally:
        mine.close()
        os.waitpid(pid, 0)
