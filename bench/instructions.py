"""Instructions per LLM API request in the gateway process, counted by valgrind's callgrind.

    .venv/bin/python bench/instructions.py [--requests 400] [--stream] [--responses]
    .venv/bin/python bench/instructions.py --chunks 50 [--requests 20] [--delay 0.01]

Wall-clock figures on a shared VM drift by a third within minutes (docs/performance.md); an instruction
count does not: the same code gives the same count to about 0.1%, whatever else the machine is doing. So
this is the figure to compare two versions of the hot path by. It starts bench/upstream.py and
``quotagate serve`` under callgrind (its usage shipper, a child process, is not counted), mints a key with
every limit, sends 200 requests to warm up, zeroes the counters, sends ``--requests`` more one at a time,
and prints the count per request. Counts cover user space only (not the kernel's side of the system
calls), and a run takes about a minute, most of it starting Python under valgrind.

``--chunks T`` counts the cost of a relayed stream chunk instead (issue 14): the upstream is
bench/stream_upstream.py, sending one token chunk every ``--delay`` seconds (so that each arrives in a read
of its own, as it does from a model server generating at 20–100 tokens a second, and not all in one);
``--requests`` streams of T token chunks are counted, then as many of 2T, and the difference over the T
extra chunks of each stream is the count per chunk, free of the per-request work (admission, settlement,
the connection).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import mint_bench_key  # noqa: E402
from tests.support import free_port, wait_for_http  # noqa: E402

PY = sys.executable
WARM_UP = 200


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--responses", action="store_true", help="POST /v1/responses instead of chat completions")
    parser.add_argument("--chunks", type=int, default=0, metavar="T",
                        help="count per relayed stream chunk: streams of T, then 2T, token chunks")
    parser.add_argument("--delay", type=float, default=0.01, help="with --chunks: seconds between token chunks")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qg-instructions-"))
    up_port, console_port, llm_port = free_port(), free_port(), free_port()
    config = tmp / "bench.toml"
    config.write_text(f'[[models]]\nid = "bench"\ntype = "chat"\nupstreams = ["http://127.0.0.1:{up_port}/v1"]\n')
    env = {**os.environ, "QUOTAGATE_DATA_DIR": str(tmp / "data"), "QUOTAGATE_CONFIG": str(config),
           "QUOTAGATE_CONSOLE_PORT": str(console_port), "QUOTAGATE_LLM_PORT": str(llm_port),
           "QUOTAGATE_LOG_LEVEL": "warning"}
    for name in ("QUOTAGATE_DATABASE_URL", "QUOTAGATE_REDIS_URL"):
        env.pop(name, None)
    out = tmp / "callgrind.out"
    upstream = ([str(ROOT / "bench" / "stream_upstream.py"), str(up_port), "--delay", str(args.delay)] if args.chunks
                else [str(ROOT / "bench" / "upstream.py"), str(up_port)])
    procs = [subprocess.Popen([PY, *upstream], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    with (tmp / "valgrind.log").open("w") as vg_log:
        gateway = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                                    "--trace-children=no", PY, "-m", "quotagate", "serve"],
                                   env=env, stdout=subprocess.DEVNULL, stderr=vg_log)
    procs.append(gateway)
    try:
        wait_for_http(f"http://127.0.0.1:{llm_port}/healthz", timeout=600, proc=gateway)
        key = mint_bench_key(env, console_port)["secret"]
        body: dict[str, object] = {"model": "bench", "max_tokens": 32, "stream": args.stream,
                                   "messages": [{"role": "user", "content": "Say hello to the benchmark."}]}
        path = "/v1/chat/completions"
        if args.responses:
            body = {"model": "bench", "input": "Say hello to the benchmark.", "max_output_tokens": 32,
                    "stream": args.stream}
            path = "/v1/responses"
        llm = httpx.Client(base_url=f"http://127.0.0.1:{llm_port}", headers={"Authorization": f"Bearer {key}"},
                           timeout=120)
        if args.chunks:
            chunks(gateway.pid, llm, body, args.chunks, args.requests, tmp)
            return
        for _ in range(WARM_UP):
            llm.post(path, json=body).raise_for_status()
        time.sleep(1.5)  # the shipper's pass after the warm-up, out of the count
        subprocess.run(["callgrind_control", "-z", str(gateway.pid)], check=True, capture_output=True)
        for _ in range(args.requests):
            llm.post(path, json=body).raise_for_status()
        total = dump(gateway.pid, tmp)
        kind = ("streaming" if args.stream else "non-streaming") + (" Responses" if args.responses else " chat")
        print(f"{total / args.requests:,.0f} instructions per {kind} request "
              f"({args.requests} requests after {WARM_UP} of warm-up)")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def dump(pid: int, tmp: Path) -> int:
    """Dump (and zero) the gateway's counters; the instructions counted since the last zeroing."""
    before = set(tmp.glob("callgrind.out*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    deadline = time.monotonic() + 60
    while not (new := set(tmp.glob("callgrind.out*")) - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)  # (the dump is written whole by then)
    if not new:
        raise SystemExit("callgrind wrote no dump")
    path = max(new, key=lambda p: p.stat().st_mtime)
    match = re.search(r"^(?:summary|totals): (\d+)", path.read_text(errors="replace"), re.M)
    if match is None:
        raise SystemExit(f"no instruction total in {path}")
    return int(match.group(1))


def chunks(pid: int, llm: httpx.Client, body: dict[str, object], tokens: int, streams: int, tmp: Path) -> None:
    """Instructions per relayed token chunk: ``streams`` streams of ``tokens`` chunks, then of twice as many."""

    def run(count: int, length: int) -> None:
        request = {**body, "stream": True, "max_tokens": length}
        for _ in range(count):
            with llm.stream("POST", "/v1/chat/completions", json=request) as r:
                r.raise_for_status()
                got = b"".join(r.iter_bytes())
            if got.count(b'"content"') != length or not got.endswith(b"data: [DONE]\n\n"):
                raise SystemExit(f"a stream of {length} chunks came back as {got[-300:]!r}")

    run(20, 8)  # warm-up
    time.sleep(1.5)  # the shipper's pass after the warm-up, out of the count
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
    run(streams, tokens)
    short = dump(pid, tmp)
    run(streams, 2 * tokens)
    long = dump(pid, tmp)
    print(f"{(long - short) / (streams * tokens):,.0f} instructions per relayed chunk "
          f"({streams} streams of {tokens} and of {2 * tokens} token chunks: {short / streams:,.0f} and "
          f"{long / streams:,.0f} instructions per stream)")


if __name__ == "__main__":
    main()
