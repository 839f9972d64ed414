"""The gateway's load benchmark: the direct call vs the gateway with every check on, side by side.

    .venv/bin/python bench/run.py [--duration 10] [--repeat 1] [--redis redis://127.0.0.1:6379/0]

Starts bench/upstream.py (a fast fixed-answer upstream) and the load generator (Debian's ``wrk``) on
CPU 1, and ``quotagate serve`` (one worker, SQLite, metering on; the in-memory limiter, or with
``--redis URL`` the Redis limiter and the key-change broadcast on that Redis) on CPU 0; mints a
key with rpm, tpm, a budget and allowed_models, so that every check runs on every request; then runs
wrk against the upstream directly and through the gateway, non-streaming and streaming, at
concurrency 1 and 64, and measures time to first token at concurrency 1 with an aiohttp client.
The metering shipper process that ``serve`` starts stays on the gateway's core (it runs at nice 19, so it
takes what the gateway leaves; ``--shipper-cpu 1`` moves it to the other core instead); its CPU time per
request, counted until it has shipped the whole run's usage, is reported in a column of its own.
``--workers N`` runs ``serve --workers N`` instead, and then nothing is pinned: the gateway's processes,
the upstream and wrk all share every core (compare ``--workers 1`` with ``--workers 2`` that way); the
gateway's CPU per request is then the parent's and the workers' together.
Prints a Markdown table (see docs/performance.md). In Redis mode the bench key's counters are deleted
from that Redis afterwards (nothing else is touched; never point it at a Redis you cannot write to).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.support import free_port, wait_for_http  # noqa: E402

PY = sys.executable
BODY = {"model": "bench", "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
        "max_tokens": 32}
LUA = """wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
"""


def _seconds(text: str) -> float:
    """A wrk duration (``812.00us``, ``3.17ms``, ``1.20s``, ``1.00m``) in seconds."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    value, unit = match.groups()
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Processes started by ``pid`` (for the gateway: its metering shipper)."""
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def workers_of(pid: int) -> list[int]:
    """The LLM API's worker processes of a ``serve --workers N``."""
    return [k for k in children(pid) if b"quotagate.workers.main" in Path(f"/proc/{k}/cmdline").read_bytes()]


def wrk(url: str, script: Path, connections: int, duration: int, pid: int | None = None,
        drained: Callable[[], None] | None = None, cpus: str = "1") -> dict[str, float]:
    gateway = [pid, *workers_of(pid)] if pid else []
    cpu0 = sum(cpu_seconds(g) for g in gateway)
    kids = [k for k in children(pid) if k not in gateway] if pid else []
    kid0 = sum(cpu_seconds(k) for k in kids)
    out = subprocess.run(["taskset", "-c", cpus, "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency",
                          "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise SystemExit(f"wrk saw errors against {url}:\n{out}")
    try:
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        # Anchored: an unanchored "50%" also matches the end of a "+/- Stdev" figure such as "75.50%".
        p50 = _seconds(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
        p99 = _seconds(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
        requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    except (AttributeError, ValueError) as exc:
        raise SystemExit(f"could not read wrk's output against {url} ({exc}):\n{out}") from None
    cpu = (sum(cpu_seconds(g) for g in gateway) - cpu0) / requests if pid else 0.0
    if drained is not None:
        drained()  # the shipper's cost per request: all of it, including catching up after the run
    kid_cpu = (sum(cpu_seconds(k) for k in kids) - kid0) / requests if kids else 0.0
    return {"rps": rps, "p50": p50, "p99": p99, "cpu": cpu, "shipper_cpu": kid_cpu}


async def ttft(url: str, key: str, count: int) -> list[float]:
    """Time to the first content chunk of ``count`` sequential streams."""
    body = json.dumps({**BODY, "stream": True}).encode()
    times = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}",
                                              "Content-Type": "application/json"}) as session:
        for _ in range(count + 50):
            t0 = time.perf_counter()
            async with session.post(url, data=body) as r:
                async for line in r.content:
                    if b'"content"' in line:
                        times.append(time.perf_counter() - t0)
                        break
                await r.read()
    return times[50:]  # after warm-up


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="non-streaming at concurrency 64 only")
    parser.add_argument("--cells", metavar="MODE:CONC,...",
                        help="only these cells, e.g. 'non-stream:1,stream:64' (default: all four)")
    parser.add_argument("--redis", metavar="URL", help="use the Redis limiter on this Redis (default: memory)")
    parser.add_argument("--workers", type=int, help="serve --workers N, every process on every core (default: "
                        "one process, pinned as described above)")
    parser.add_argument("--shipper-cpu", type=int, choices=(0, 1), default=0,
                        help="the core of the usage shipper process (default 0: the gateway's)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qg-bench-"))
    up_port, console_port, llm_port = free_port(), free_port(), free_port()
    gateway_cpus, other_cpus = ("0", "1") if args.workers is None else ("0,1", "0,1")
    procs = [subprocess.Popen(["taskset", "-c", other_cpus, PY, str(ROOT / "bench" / "upstream.py"), str(up_port)])]
    config = tmp / "bench.toml"
    config.write_text(f'[[models]]\nid = "bench"\ntype = "chat"\nupstreams = ["http://127.0.0.1:{up_port}/v1"]\n')
    env = {**os.environ, "QUOTAGATE_DATA_DIR": str(tmp / "data"), "QUOTAGATE_CONFIG": str(config),
           "QUOTAGATE_CONSOLE_PORT": str(console_port), "QUOTAGATE_LLM_PORT": str(llm_port),
           "QUOTAGATE_LOG_LEVEL": "warning"}
    env.pop("QUOTAGATE_DATABASE_URL", None)
    env.pop("QUOTAGATE_REDIS_URL", None)
    if args.redis:
        env["QUOTAGATE_REDIS_URL"] = args.redis
    if args.workers is not None:
        env["QUOTAGATE_WORKERS"] = str(args.workers)
    key_id = None
    try:
        procs.append(subprocess.Popen(["taskset", "-c", gateway_cpus, PY, "-m", "quotagate", "serve"], env=env))
        wait_for_http(f"http://127.0.0.1:{llm_port}/healthz", proc=procs[-1])
        wait_for_http(f"http://127.0.0.1:{up_port}/", proc=procs[0])
        for shipper in set(children(procs[1].pid)) - set(workers_of(procs[1].pid)):  # the metering shipper
            if args.workers is None:  # (it inherits the gateway's core)
                os.sched_setaffinity(shipper, {args.shipper_cpu})
        minted = mint_bench_key(env, console_port)
        key, key_id, admin = minted["secret"], minted["id"], minted["admin_token"]
        direct = f"http://127.0.0.1:{up_port}/v1/chat/completions"
        gateway = f"http://127.0.0.1:{llm_port}/v1/chat/completions"
        metrics = f"http://127.0.0.1:{console_port}/metrics"
        rows = []
        cells = [(s, c) for s in (False, True) for c in (1, 64)]
        if args.quick:
            cells = [(False, 64)]
        if args.cells:
            modes = {"non-stream": False, "stream": True}
            cells = [(modes[m], int(c)) for m, _, c in (cell.partition(":") for cell in args.cells.split(","))]
        for stream, conns in cells:
            body = json.dumps({**BODY, "stream": stream})
            script = tmp / f"post-{stream}.lua"
            script.write_text(LUA.format(body=body, key=key))
            for _ in range(args.repeat):
                wrk(gateway, script, conns, 2, cpus=other_cpus)  # warm-up
                d = wrk(direct, script, conns, args.duration, cpus=other_cpus)
                drain(metrics, admin)  # the warm-up's usage is not this run's to pay for
                g = wrk(gateway, script, conns, args.duration, pid=procs[1].pid, drained=lambda: drain(metrics, admin),
                        cpus=other_cpus)
                rows.append((stream, conns, d, g))
        t_direct = asyncio.run(ttft(direct, key, 100 if args.quick else 500))
        t_gw = asyncio.run(ttft(gateway, key, 100 if args.quick else 500))
        print(f"\nlimiter: {'Redis at ' + args.redis if args.redis else 'memory'}; workers: {args.workers or 1}"
              f"{' (every process on every core)' if args.workers else ''}; "
              f"load average before the table: {os.getloadavg()}")
        print("| mode | conc. | direct req/s | gateway req/s | ratio | direct p50 / p99 | gateway p50 / p99 |"
              " added p50 / p99 | gateway CPU per request (→ req/s per core) | shipper CPU per request |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for stream, conns, d, g in rows:
            print(f"| {'stream' if stream else 'non-stream'} | {conns} | {d['rps']:,.0f} | {g['rps']:,.0f} | "
                  f"{g['rps'] / d['rps']:.2f} | {d['p50'] * 1e3:.2f} / {d['p99'] * 1e3:.2f} ms | "
                  f"{g['p50'] * 1e3:.2f} / {g['p99'] * 1e3:.2f} ms | "
                  f"{(g['p50'] - d['p50']) * 1e3:+.2f} / {(g['p99'] - d['p99']) * 1e3:+.2f} ms | "
                  f"{g['cpu'] * 1e6:.0f} µs (→ {1 / g['cpu']:,.0f}) | {g['shipper_cpu'] * 1e6:.0f} µs |")
        q = statistics.quantiles
        print(f"\ntime to first token, concurrency 1, {len(t_gw)} streams: direct p50 "
              f"{statistics.median(t_direct) * 1e3:.3f} ms p99 {q(t_direct, n=100)[98] * 1e3:.3f} ms; gateway p50 "
              f"{statistics.median(t_gw) * 1e3:.3f} ms p99 {q(t_gw, n=100)[98] * 1e3:.3f} ms; added p50 "
              f"{(statistics.median(t_gw) - statistics.median(t_direct)) * 1e3:+.3f} ms")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=15)
        if args.redis and key_id:
            forget(args.redis, key_id)


def mint_bench_key(env: dict[str, str], console_port: int) -> dict[str, Any]:
    """An admin, a project and a key with rpm, tpm, a monthly budget and allowed_models, all far above what
    a run uses, so that every check runs on every request and none refuses. Returns the minted key."""
    cli = [PY, "-m", "quotagate"]
    subprocess.run([*cli, "users", "create", "bench@example.com", "--admin"], env=env, check=True,
                   capture_output=True)
    token = subprocess.run([*cli, "tokens", "create", "bench@example.com"], env=env, check=True,
                           capture_output=True, text=True).stdout.strip()
    console = httpx.Client(base_url=f"http://127.0.0.1:{console_port}", headers={"Authorization": f"Bearer {token}"},
                           timeout=120)
    project = console.post("/v1/projects", json={"name": "bench"}).json()["id"]
    minted: dict[str, Any] = console.post(f"/v1/projects/{project}/inference/keys", json={
        "name": "bench", "rpm": 100_000_000, "tpm": 1_000_000_000_000, "token_limit": 1_000_000_000_000,
        "token_limit_period": "month", "allowed_models": ["bench"]}).json()
    minted["admin_token"] = token  # /metrics on the console port is for instance admins
    return minted


def drain(metrics_url: str, token: str, within: float = 120.0) -> None:
    """Wait until the gateway's usage journal is shipped (its backlog gauge at 0)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        text = httpx.get(metrics_url, headers={"Authorization": f"Bearer {token}"}, timeout=10).text
        # (With --workers, one line per worker process beside the parent's own.)
        backlog = re.findall(r"^quotagate_journal_backlog_records(?:\{[^}]*\})? (\S+)", text, re.M)
        if not backlog:
            raise SystemExit("no quotagate_journal_backlog_records on /metrics")
        if sum(float(b) for b in backlog) == 0:
            return
        time.sleep(0.2)
    raise SystemExit(f"the usage journal was not shipped within {within:.0f} s")


def forget(url: str, key_id: str) -> None:
    """Delete the bench key's counters from Redis (only those: the Redis may be shared)."""
    from redis import Redis

    client = Redis.from_url(url)
    try:
        names = list(client.scan_iter(match=f"qg:{{{key_id}}}:*"))
        if names:
            client.delete(*names)
    finally:
        client.close()


if __name__ == "__main__":
    main()
