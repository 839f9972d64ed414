"""Idle connections against the LLM listener, while a client keeps making real requests (issue 13).

    .venv/bin/python bench/idle_connections.py [--attempts 30000] [--addresses 1] [--seconds 60] [--env K=V ...]

Starts ``quotagate serve`` (SQLite, defaults unless ``--env``) in front of the tests' fake model server,
mints a key, measures the gateway's memory (RSS of the serving process) and the p99 of sequential chat
requests (one keep-alive client from 127.0.0.250) while idle; then opens ``--attempts`` connections that
never send a byte, from ``--addresses`` loopback addresses (127.0.0.1, .2, ...), holding each until the
gateway closes it (a 503 over a cap, or the first-head deadline), and measures the same meanwhile. The
client raises its own open-file limit to the hard one. Prints one Markdown row per phase.
"""

from __future__ import annotations

import argparse
import select
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakes.upstream import FakeUpstream
from tests.support import Gateway, start_gateway

from quotagate.runner import raise_fd_limit


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_connections(gw: Gateway) -> float:
    for line in gw.metrics().splitlines():
        if line.startswith('quotagate_connections_open{listener="llm"}'):
            return float(line.split()[1])
    return float("nan")


class Attacker(threading.Thread):
    """Opens idle connections and holds each until the gateway closes it."""

    def __init__(self, port: int, attempts: int, addresses: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.port, self.attempts, self.addresses, self.seconds = port, attempts, addresses, seconds
        self.opened = self.failed = self.peak_held = 0
        self.held: dict[int, socket.socket] = {}

    def run(self) -> None:
        poller = select.poll()
        end = time.monotonic() + self.seconds
        while self.opened + self.failed < self.attempts and time.monotonic() < end:
            source = f"127.0.0.{1 + (self.opened + self.failed) % self.addresses}"
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=5, source_address=(source, 0))
            except OSError:
                self.failed += 1
                time.sleep(0.01)
                continue
            self.opened += 1
            self.held[sock.fileno()] = sock
            poller.register(sock, select.POLLIN | select.POLLHUP)
            if self.opened % 200 == 0:
                self._sweep(poller)
        while time.monotonic() < end and self.held:  # hold what is left until the gateway lets go
            self._sweep(poller)
            time.sleep(0.5)

    def _sweep(self, poller: select.poll) -> None:
        self.peak_held = max(self.peak_held, len(self.held))
        for fd, _ in poller.poll(0):
            poller.unregister(fd)
            self.held.pop(fd).close()

    def close(self) -> None:
        for sock in self.held.values():
            sock.close()


def latencies(client: httpx.Client, seconds: float) -> list[float]:
    """Sequential chat requests on the client's keep-alive connection (opened before any flood)."""
    out: list[float] = []
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        r = client.post("/chat/completions", json=body)
        out.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text
    return out


def p99_ms(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--attempts", type=int, default=30000)
    parser.add_argument("--addresses", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--env", action="append", default=[])
    args = parser.parse_args()
    raise_fd_limit()
    upstream = FakeUpstream().start()
    tmp = Path(tempfile.mkdtemp(prefix="qg-idle-"))
    config = tmp / "m.toml"
    config.write_text(f'[[models]]\nid = "chat"\nupstreams = ["{upstream.base_url}"]\n')
    env = dict(item.split("=", 1) for item in args.env)
    gw = start_gateway(tmp / "data", f"sqlite:///{tmp / 'qg.db'}", config, extra_env=env)
    try:
        admin = gw.user("bench@example.com", admin=True)
        secret = admin.mint(admin.project("bench")["id"])["secret"]
        client = httpx.Client(base_url=gw.llm_url, transport=httpx.HTTPTransport(local_address="127.0.0.250"),
                              timeout=30, headers={"Authorization": f"Bearer {secret}"})
        latencies(client, 3)  # warm up
        pid = gw.proc.pid
        idle = latencies(client, 10)
        idle_rss = rss_mb(pid)
        print("| phase | gateway RSS | requests | p99 | connections held (gateway / client) |")
        print("|---|---|---|---|---|")
        print(f"| idle | {idle_rss:.0f} MB | {len(idle)} | {p99_ms(idle):.2f} ms | 0 |")
        attacker = Attacker(gw.llm_port, args.attempts, args.addresses, args.seconds)
        attacker.start()
        peak = [idle_rss, 0.0]

        def sample() -> None:
            while attacker.is_alive():
                peak[0] = max(peak[0], rss_mb(pid))
                peak[1] = max(peak[1], open_connections(gw))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        during: list[float] = []
        while attacker.is_alive():
            during += latencies(client, 2)
        sampler.join()
        print(f"| {attacker.opened} idle connections from {args.addresses} address(es) "
              f"({attacker.failed} failed to connect) | peak {peak[0]:.0f} MB | {len(during)} | "
              f"{p99_ms(during):.2f} ms | peak {peak[1]:.0f} / {attacker.peak_held} |")
        attacker.close()
        after = latencies(client, 5)
        print(f"| after | {rss_mb(pid):.0f} MB | {len(after)} | {p99_ms(after):.2f} ms | 0 |")
        log = gw.log()
        print("\nwarnings logged:", log.count("refusing new connections"), "+", log.count("more connections in"),
              "summaries")
    finally:
        gw.stop()
        upstream.stop()


if __name__ == "__main__":
    main()
