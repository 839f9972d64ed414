"""``serve --workers 2``: real processes, real requests through the one LLM port. Limits hold across the
workers exactly as across instances (embedded limiter and Redis); a revocation is refused by every worker
on the very next request; a worker killed with SIGKILL gives back what it had reserved, the other keeps
serving and the parent starts a new one; ``--workers 1`` is one process, as before."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from quotagate.settings import Settings
from tests.fakes.upstream import FakeUpstream
from tests.scaleout.cluster import ONE_REQUEST, Cluster, Seen, assert_nothing_lost, served, spread
from tests.workers.conftest import start_workers
from tests.workers.procs import connections_per_worker, worker_pids


def assert_both_workers_served(per_worker: dict[int, int]) -> None:
    assert len(per_worker) == 2 and all(n > 0 for n in per_worker.values()), \
        f"client connections per worker: {per_worker} (the kernel should spread them over both)"


def test_rpm_tpm_and_budget_hold_across_workers_under_a_flood(two_workers: Cluster) -> None:
    cluster = two_workers
    gw = cluster.instances[0]
    rpm_secret, rpm_key = cluster.mint(rpm=25)
    tpm_secret, tpm_key = cluster.mint(tpm=600)
    budget_secret, budget_key = cluster.mint(token_limit=900, token_limit_period="day")

    async def flood() -> tuple[list[Seen], list[Seen], list[Seen], dict[int, int]]:
        async with spread(cluster) as s:
            async def burst() -> list[Seen]:
                return list(await asyncio.gather(*(s.chat(rpm_secret) for _ in range(300))))

            async def rounds(secret: str) -> list[Seen]:
                # Waves of simultaneous requests (half of them streamed) until one wave gets nothing
                # admitted: with every earlier request settled, less than one request's worth is left.
                seen: list[Seen] = []
                for _ in range(20):
                    wave = await asyncio.gather(*(s.chat(secret, stream=i % 2 == 0) for i in range(150)))
                    seen += wave
                    if not served(list(wave)):
                        break
                    await asyncio.sleep(0.1)  # (with Redis, settlements are written a few ms later)
                return seen

            rpm, tpm, budget = await asyncio.gather(burst(), rounds(tpm_secret), rounds(budget_secret))
            return rpm, tpm, budget, connections_per_worker(gw)

    rpm, tpm, budget, per_worker = asyncio.run(flood())

    assert_both_workers_served(per_worker)
    assert len(served(rpm)) == 25, "rpm: admitted across the workers"
    assert {(s.status, s.code) for s in rpm if s.status != 200} == {(429, "rate_limit_exceeded")}
    tpm_charged = sum(s.tokens for s in served(tpm))
    budget_charged = sum(s.tokens for s in served(budget))
    print(f"\nconnections per worker {per_worker}; rpm 25: {len(served(rpm))} of {len(rpm)} admitted; tpm 600: "
          f"{tpm_charged} tokens in {len(served(tpm))} of {len(tpm)}; budget 900: {budget_charged} tokens in "
          f"{len(served(budget))} of {len(budget)} (one request reserves at most {ONE_REQUEST})")
    assert 600 - ONE_REQUEST < tpm_charged <= 600
    assert {(s.status, s.code) for s in tpm if s.status != 200} == {(429, "rate_limit_exceeded")}
    assert 900 - ONE_REQUEST < budget_charged <= 900
    assert {(s.status, s.code) for s in budget if s.status != 200} == {(429, "token_limit_exceeded")}
    assert all(s.code is None for s in served(tpm + budget)), "a stream ended in an error"
    for key, seen in ((rpm_key, rpm), (tpm_key, tpm), (budget_key, budget)):
        assert_nothing_lost(cluster, key["id"], seen)
    # The console's /metrics has every worker's requests, each labelled with its worker.
    counted: dict[str, float] = {}
    for family in text_string_to_metric_families(gw.metrics()):
        for sample in family.samples:
            if sample.name == "quotagate_requests_total" and sample.labels.get("project") == cluster.project_id:
                counted[sample.labels["worker"]] = counted.get(sample.labels["worker"], 0) + sample.value
    assert set(counted) == {"0", "1"} and sum(counted.values()) == len(rpm + tpm + budget), counted


def test_a_revocation_is_refused_by_every_worker_on_the_next_request(two_workers: Cluster) -> None:
    cluster = two_workers
    gw = cluster.instances[0]
    # No limits at all (no limiter call, so nothing but the key change can stop it) and with an rpm.
    plain_secret, plain_key = cluster.mint()
    rpm_secret, rpm_key = cluster.mint(rpm=100_000)

    async def run() -> tuple[list[Seen], list[Seen], dict[int, int]]:
        async with spread(cluster) as s:
            secrets = (plain_secret, rpm_secret)
            # Every worker has both keys in its cache, on connections that stay open.
            before = list(await asyncio.gather(*(s.chat(secrets[i % 2]) for i in range(200))))
            per_worker = connections_per_worker(gw)
            for key in (plain_key, rpm_key):
                await asyncio.to_thread(cluster.admin.ok, "DELETE", f"/v1/inference/keys/{key['id']}")
            after = list(await asyncio.gather(*(s.chat(secrets[i % 2]) for i in range(200))))
            return before, after, per_worker

    before, after, per_worker = asyncio.run(run())
    assert_both_workers_served(per_worker)
    assert len(served(before)) == 200
    assert {(s.status, s.code) for s in after} == {(401, "key_revoked")}


def _stream_body(tokens: int, token_delay: float) -> bytes:
    return orjson.dumps({"model": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 64,
                         "stream": True, "stream_options": {"include_usage": True},
                         "fake": {"tokens": tokens, "token_delay": token_delay}})


async def _stream(client: httpx.AsyncClient, secret: str) -> Seen | None:
    """A slow stream; its Seen if it completed with its usage, None if its worker died under it."""
    started = time.monotonic()
    try:
        async with client.stream("POST", "/chat/completions", content=_stream_body(40, 0.05),
                                 headers={"Authorization": f"Bearer {secret}",
                                          "Content-Type": "application/json"}) as r:
            seen = Seen(0, started, 0.0, r.status_code, r.headers.get("x-request-id", ""))
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"usage":{' in line.replace(" ", ""):
                    usage = orjson.loads(line[6:]).get("usage") or {}
                    seen.prompt, seen.completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    except httpx.TransportError:
        return None
    seen.ended = time.monotonic()
    return seen if seen.completion else None


def test_a_killed_worker_gives_back_its_reservations_and_is_started_again(tmp_path: Path, database_url: str,
                                                                          upstream: FakeUpstream) -> None:
    cluster = start_workers(tmp_path, database_url, upstream, 2)
    gw = cluster.instances[0]
    try:
        secret, key = cluster.mint(token_limit=100_000, token_limit_period="day")

        async def run() -> tuple[list[Seen | None], int, dict[int, int], list[Seen]]:
            limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
            async with httpx.AsyncClient(base_url=gw.llm_url, timeout=60, limits=limits) as client:
                streams = [asyncio.create_task(_stream(client, secret)) for _ in range(40)]
                await asyncio.sleep(1.0)  # every stream admitted, reserving, halfway through its tokens
                per_worker = connections_per_worker(gw)
                victim = max(per_worker, key=lambda pid: per_worker[pid])
                os.kill(victim, signal.SIGKILL)
                ended = await asyncio.gather(*streams)
            async with spread(cluster) as s:
                after = list(await asyncio.gather(*(s.chat(secret) for _ in range(50))))
            return ended, victim, per_worker, after

        ended, victim, per_worker, after = asyncio.run(run())
        assert_both_workers_served(per_worker)
        completed = [s for s in ended if s is not None]
        print(f"\nstreams per worker {per_worker}; killed {victim}: {len(completed)} of {len(ended)} streams completed")
        assert 0 < len(completed) < len(ended), "the killed worker's streams break, the other's complete"
        assert len(served(after)) == 50, "the gateway keeps serving after a worker is killed"
        deadline = time.monotonic() + 20
        while (len(pids := worker_pids(gw)) != 2 or victim in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(pids) == 2 and victim not in pids, f"the parent did not start a new worker: {pids}"
        assert "worker" in gw.log() and "exited (signal 9); starting it again" in gw.log()
        # The broken streams' reservations are released, not held until the period ends: nothing is
        # reserved any more, and the budget has charged exactly what the clients were sent.
        charged = sum(s.tokens for s in completed + after)
        budget = cluster.admin.ok("GET", f"/v1/inference/keys/{key['id']}/usage")["limits"]["budget"]
        assert (budget["reserved"], budget["used"]) == (0, charged)
        assert_nothing_lost(cluster, key["id"], completed + after)
    finally:
        cluster.stop()


def test_one_worker_is_one_process(tmp_path: Path, database_url: str, upstream: FakeUpstream) -> None:
    cluster = start_workers(tmp_path, database_url, upstream, 1)
    gw = cluster.instances[0]
    try:
        secret, key = cluster.mint(rpm=3)

        async def run() -> list[Seen]:
            async with spread(cluster) as s:
                return list(await asyncio.gather(*(s.chat(secret) for _ in range(10))))

        seen = asyncio.run(run())
        assert worker_pids(gw) == []
        assert len(served(seen)) == 3
        assert_nothing_lost(cluster, key["id"], seen)
    finally:
        cluster.stop()


def test_workers_0_is_one_per_core() -> None:
    assert Settings(workers=0).effective_workers == len(os.sched_getaffinity(0))
    assert Settings().effective_workers == 1
