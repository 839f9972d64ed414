"""The streams benchmark: thousands of long streams at once, direct to the model server and through the gateway.

    .venv/bin/python bench/streams.py [--streams 1000,2000,3000] [--tokens 100] [--delay 0.05] [--ramp 2]

An LLM API's load is many long streams at once (issue 14). This starts bench/stream_upstream.py (one token
chunk every ``--delay`` seconds, ``--tokens`` of them, then the finish chunk, the usage chunk and [DONE])
and the load generator (this process) on CPU 1, and ``quotagate serve`` (one worker, SQLite, in-memory
limiter, metering on, its usage shipper with it) on CPU 0, each run with a gateway started afresh (so that
its memory figure is not the previous run's arenas). For each N of ``--streams`` it opens N streams, each on
a connection of its own, spread evenly over ``--ramp`` seconds, first straight to the upstream and then
through the gateway with a key that has rpm, tpm, a budget and allowed_models (so that every stream holds a
lease and every check runs), and reports:

- time to first chunk (from the connect to the first body bytes) and the worst gap between two reads of a
  stream, p50 and p99 over the streams, direct and through the gateway;
- the gateway's CPU time (user + system, /proc) over the run per token chunk relayed (so the per-request
  work, admission and settlement, is included, spread over the stream's chunks);
- its memory per open stream: the peak RSS during the run less the RSS before it, over N;
- whether every stream completed: status 200, every token chunk, its usage chunk with the right count, and
  [DONE].

The client is a raw asyncio protocol on uvloop (httptools parses the answers): what it does per read is
take the time and keep the bytes. Prints a Markdown table (docs/performance.md, "Streams").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httptools
import orjson
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import mint_bench_key  # noqa: E402
from tests.support import free_port, wait_for_http  # noqa: E402

PY = sys.executable
WARM_UP = 100  # short streams through a fresh gateway before each measured run


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Stream(asyncio.Protocol):
    """One streamed request on a connection of its own: records when each read came, keeps the body."""

    def __init__(self, request: bytes, t0: float, done: Callable[[_Stream], None]) -> None:
        self.request = request
        self.t0 = t0
        self.first: float | None = None
        self.last = 0.0
        self.worst_gap = 0.0
        self.status = 0
        self.body: list[bytes] = []
        self.complete = False
        self.error: str | None = None
        self._done = done
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()  # (uvloop's loop.time() counts whole milliseconds)
        if self.first is None:
            self.first = now
        else:
            self.worst_gap = max(self.worst_gap, now - self.last)
        self.last = now
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = f"not HTTP: {exc}"
            self._end()

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self._end()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.complete and self.error is None:
            self.error = f"connection lost: {exc}"
        self._end()

    def _end(self) -> None:
        if self.transport is not None:
            transport, self.transport = self.transport, None
            transport.close()
            self._done(self)


def _request(port: int, key: str | None, tokens: int) -> bytes:
    body = orjson.dumps({"model": "bench", "messages": [{"role": "user", "content": "Tell the benchmark a story."}],
                         "max_tokens": tokens, "stream": True, "stream_options": {"include_usage": True}})
    auth = b"Authorization: Bearer %s\r\n" % key.encode() if key else b""
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n%s"
            b"Content-Length: %d\r\n\r\n%s" % (port, auth, len(body), body))


def _check(stream: _Stream, tokens: int) -> str | None:
    """Why a stream did not complete as it should, or None."""
    if stream.error is not None:
        return stream.error
    if stream.status != 200:
        return f"status {stream.status}: {b''.join(stream.body)[:200]!r}"
    body = b"".join(stream.body)
    got = body.count(b'"delta":{"content":')
    if got != tokens:
        return f"{got} token chunks of {tokens}"
    if b'"completion_tokens":%d,' % tokens not in body:
        return "no usage chunk with the right count"
    if not body.endswith(b"data: [DONE]\n\n"):
        return "no [DONE] at the end"
    return None


async def load(port: int, key: str | None, count: int, tokens: int, ramp: float, pid: int | None,
               timeout: float) -> dict[str, Any]:
    """``count`` streams opened evenly over ``ramp`` seconds; their figures, and the gateway's (``pid``)."""
    loop = asyncio.get_running_loop()
    request = _request(port, key, tokens)
    finished: list[_Stream] = []
    all_done = loop.create_future()

    def done(stream: _Stream) -> None:
        finished.append(stream)
        if len(finished) == count and not all_done.done():
            all_done.set_result(None)

    async def open_one() -> None:
        stream = _Stream(request, time.perf_counter(), done)
        try:
            await loop.create_connection(lambda: stream, "127.0.0.1", port)
        except OSError as exc:
            stream.error = f"connect: {exc}"
            done(stream)

    rss0 = rss_bytes(pid) if pid else 0
    cpu0 = cpu_split(pid) if pid else (0.0, 0.0)
    peak = rss0
    start = loop.time() + 0.05
    for i in range(count):
        loop.call_at(start + ramp * i / count, lambda: loop.create_task(open_one()))
    deadline = loop.time() + ramp + timeout
    while not all_done.done() and loop.time() < deadline:
        if pid:
            peak = max(peak, rss_bytes(pid))
        await asyncio.wait([all_done], timeout=0.1)
    cpu1 = cpu_split(pid) if pid else (0.0, 0.0)
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    failures: dict[str, int] = {}
    for stream in finished:
        why = _check(stream, tokens)
        if why is not None:
            failures[why] = failures.get(why, 0) + 1
    if len(finished) < count:
        failures["not finished in time"] = count - len(finished)
    ok = [s for s in finished if _check(s, tokens) is None]
    ttft = [s.first - s.t0 for s in ok if s.first is not None]
    gaps = [s.worst_gap for s in ok]
    return {"ok": len(ok), "failures": failures, "ttft": ttft, "gap": gaps, "cpu": user + system, "user": user,
            "system": system, "chunks": len(ok) * tokens, "rss": peak - rss0}


def pct(values: list[float], p: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", default="1000,2000,3000", help="comma-separated numbers of concurrent streams")
    parser.add_argument("--tokens", type=int, default=100, help="token chunks per stream")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds between a stream's token chunks")
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds over which the streams are opened")
    parser.add_argument("--no-direct", action="store_true", help="through the gateway only")
    args = parser.parse_args()
    counts = [int(c) for c in args.streams.split(",")]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.sched_setaffinity(0, {1})  # the load generator beside the upstream, off the gateway's core
    tmp = Path(tempfile.mkdtemp(prefix="qg-streams-"))
    up_port, console_port, llm_port = free_port(), free_port(), free_port()
    upstream = subprocess.Popen(["taskset", "-c", "1", PY, str(ROOT / "bench" / "stream_upstream.py"), str(up_port),
                                 "--delay", str(args.delay)])
    config = tmp / "bench.toml"
    config.write_text(f'[[models]]\nid = "bench"\ntype = "chat"\nupstreams = ["http://127.0.0.1:{up_port}/v1"]\n')
    env = {**os.environ, "QUOTAGATE_DATA_DIR": str(tmp / "data"), "QUOTAGATE_CONFIG": str(config),
           "QUOTAGATE_CONSOLE_PORT": str(console_port), "QUOTAGATE_LLM_PORT": str(llm_port),
           "QUOTAGATE_LOG_LEVEL": "warning",
           "QUOTAGATE_MAX_CONNECTIONS_PER_ADDRESS": "0"}  # every stream comes from 127.0.0.1
    env.pop("QUOTAGATE_DATABASE_URL", None)
    env.pop("QUOTAGATE_REDIS_URL", None)
    gateway: subprocess.Popen[bytes] | None = None
    rows = []
    timeout = args.tokens * args.delay + 60
    try:
        wait_for_http(f"http://127.0.0.1:{up_port}/", proc=upstream)
        key = None
        for count in counts:
            gateway = subprocess.Popen(["taskset", "-c", "0", PY, "-m", "quotagate", "serve"], env=env)
            wait_for_http(f"http://127.0.0.1:{llm_port}/healthz", proc=gateway)
            if key is None:
                key = mint_bench_key(env, console_port)["secret"]
            warm = uvloop.run(load(llm_port, key, WARM_UP, 4, 0.5, None, 60))
            if warm["failures"]:
                raise SystemExit(f"the warm-up failed: {warm['failures']}")
            direct = None if args.no_direct else uvloop.run(load(up_port, None, count, args.tokens, args.ramp, None,
                                                                 timeout))
            time.sleep(1)
            through = uvloop.run(load(llm_port, key, count, args.tokens, args.ramp, gateway.pid, timeout))
            rows.append((count, direct, through))
            gateway.terminate()
            gateway.wait(timeout=30)
            gateway = None
            time.sleep(1)
    finally:
        for proc in (gateway, upstream):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(f"\n{args.tokens} token chunks per stream, one every {args.delay * 1e3:g} ms, opened over {args.ramp:g} s; "
          f"load average {os.getloadavg()}")
    print("| streams | completed with usage (direct; gateway) | time to first chunk p50 / p99, direct → gateway |"
          " worst gap p50 / p99, direct → gateway | added TTFT p99 / gap p99 | gateway CPU per chunk (user + system) |"
          " memory per open stream |")
    print("|---|---|---|---|---|---|---|")
    for count, d, g in rows:
        d = d or {"ok": 0, "failures": {}, "ttft": [float("nan")], "gap": [float("nan")]}
        ms = 1e3
        print(f"| {count:,} | {d['ok']:,}; {g['ok']:,} | "
              f"{pct(d['ttft'], 50) * ms:.1f} / {pct(d['ttft'], 99) * ms:.1f} → "
              f"{pct(g['ttft'], 50) * ms:.1f} / {pct(g['ttft'], 99) * ms:.1f} ms | "
              f"{pct(d['gap'], 50) * ms:.1f} / {pct(d['gap'], 99) * ms:.1f} → "
              f"{pct(g['gap'], 50) * ms:.1f} / {pct(g['gap'], 99) * ms:.1f} ms | "
              f"{(pct(g['ttft'], 99) - pct(d['ttft'], 99)) * ms:+.1f} / "
              f"{(pct(g['gap'], 99) - pct(d['gap'], 99)) * ms:+.1f} ms | "
              f"{g['cpu'] / max(g['chunks'], 1) * 1e6:.1f} µs ({g['user'] / max(g['chunks'], 1) * 1e6:.1f} + "
              f"{g['system'] / max(g['chunks'], 1) * 1e6:.1f}) | {g['rss'] / count / 1024:.1f} KB |")
        for label, r in (("direct", d), ("gateway", g)):
            if r["failures"]:
                print(f"  {count} streams, {label}: failures {r['failures']}")


if __name__ == "__main__":
    main()
