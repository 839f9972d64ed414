"""Webhooks across three instances on one PostgreSQL and one Redis: every instance looks for threshold
crossings and key events and every one delivers, yet the receiver (which fails each event's first two
attempts) accepts each threshold of each key exactly once per period, each event under one id, signed
with the secret that instance 0 handed out; a revocation and a leak arrive once each too."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.scaleout.cluster import Cluster, postgres_database, start_cluster
from tests.scaleout.conftest import scaleout_redis_url
from tests.webhooks.receiver import Receiver, verified

# The same signing key on every instance (docs/webhooks.md), a pass every 0.3 s, quick retries. Thresholds
# are found in the usage the shipper stores; at its default niceness (19) a shipper on a shared, loaded
# test machine can starve for tens of seconds (an instance waits for its first pass before serving), so
# here it runs at the gateway's priority.
ENV = {"QUOTAGATE_WEBHOOK_SIGNING_KEY": secrets.token_urlsafe(32), "QUOTAGATE_WEBHOOK_POLL_SECONDS": "0.3",
       "QUOTAGATE_WEBHOOK_RETRY_BASE_SECONDS": "0.2", "QUOTAGATE_WEBHOOK_TIMEOUT_SECONDS": "3",
       "QUOTAGATE_SHIPPER_NICE": "0"}
THRESHOLDS = [0.5, 0.8, 1.0]
LIMIT = 4000


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream) -> Iterator[Cluster]:
    directory: Path = tmp_path_factory.mktemp("scaleout-webhooks")
    with postgres_database() as url:
        c = start_cluster(directory, url, scaleout_redis_url(), upstream.base_url, extra_env=ENV)
        try:
            yield c
        finally:
            c.stop()
            c.forget_keys()


async def traffic(cluster: Cluster, secrets_: list[str], concurrency: int, rounds: int) -> dict[str, int]:
    """Streams of 64 tokens spread over the instances, ``concurrency`` at a time per key: tokens charged per key."""
    turn = itertools.count()
    charged = dict.fromkeys(secrets_, 0)
    clients = [httpx.AsyncClient(base_url=gw.llm_url, timeout=60,
                                 limits=httpx.Limits(max_connections=1000)) for gw in cluster.instances]

    async def one(secret: str) -> None:
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "stream": True,
                "stream_options": {"include_usage": True}, "fake": {"tokens": 64}}
        client = clients[next(turn) % len(clients)]
        async with client.stream("POST", "/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {secret}"}) as r:
            if r.status_code != 200:
                assert r.status_code == 429, await r.aread()
                return
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    usage = orjson.loads(line[6:]).get("usage")
                    if usage:
                        charged[secret] += usage["total_tokens"]

    try:
        for _ in range(rounds):
            await asyncio.gather(*(one(s) for s in secrets_ for _ in range(concurrency)))
    finally:
        for client in clients:
            await client.aclose()
    return charged


def test_each_threshold_is_delivered_exactly_once_across_instances(hooked: Cluster) -> None:
    receiver = Receiver(fail_first=2).start()
    try:
        admin = hooked.admin
        hook: dict[str, Any] = admin.ok("POST", f"/v1/projects/{hooked.project_id}/webhooks", 201,
                                        json={"url": receiver.url, "budget_thresholds": THRESHOLDS})
        keys = [hooked.mint(token_limit=LIMIT, token_limit_period="day") for _ in range(2)]
        charged = asyncio.run(traffic(hooked, [s for s, _ in keys], concurrency=150, rounds=2))
        assert all(tokens == LIMIT for tokens in charged.values()), charged
        # A revocation through instance 1's console and a leak report through instance 2's.
        _, revoked = hooked.mint()
        leaked_secret, leaked = hooked.mint()
        revoker = hooked.instances[1]
        httpx.delete(f"{revoker.console_url}/v1/inference/keys/{revoked['id']}",
                     headers={"Authorization": f"Bearer {admin.token}"}, timeout=30).raise_for_status()
        httpx.post(f"{hooked.instances[2].console_url}/v1/inference/keys/leaked",
                   json=[{"token": leaked_secret, "url": "https://paste.example/x", "source": "paste"}],
                   timeout=30).raise_for_status()
        expected = len(keys) * len(THRESHOLDS) + 2
        receiver.wait_for(lambda rs: len({r.event_id for r in rs if r.answered == 200}) >= expected,
                          timeout=60, what=f"{expected} events accepted")
        time.sleep(3.0)  # ten more passes of every instance: nothing more may arrive
        got = receiver.snapshot()
        accepted = [r for r in got if r.answered == 200]
        # Exactly once: one accepted POST per event, and per (key, threshold) one event.
        assert len(accepted) == len({r.event_id for r in accepted}) == expected
        thresholds = Counter((r.event["data"]["key"]["id"], r.event["data"]["threshold"])
                             for r in accepted if r.event["type"] == "key.budget_threshold")
        assert thresholds == Counter({(k["id"], t): 1 for _, k in keys for t in THRESHOLDS})
        others = sorted((r.event["type"], r.event["data"]["key"]["id"]) for r in accepted
                        if r.event["type"] != "key.budget_threshold")
        assert others == sorted([("key.revoked", revoked["id"]), ("key.leaked", leaked["id"])])
        # Every event was tried three times (two refusals, then accepted), under one id and one body.
        per_event = Counter(r.event_id for r in got)
        assert set(per_event.values()) == {3}, per_event
        for event_id in per_event:
            tries = [r for r in got if r.event_id == event_id]
            assert [r.answered for r in tries] == [500, 500, 200]
            assert len({r.body for r in tries}) == 1
        assert all(verified(hook["secret"], r) for r in got)
        # The delivery log says so, read through another instance.
        reader = hooked.instances[2]
        log = httpx.get(f"{reader.console_url}/v1/projects/{hooked.project_id}/webhooks/{hook['id']}/deliveries",
                        headers={"Authorization": f"Bearer {admin.token}"}, timeout=30).json()["data"]
        assert {(d["status"], d["attempts"], d["response_code"]) for d in log} == {("delivered", 3, 200)}
        assert {d["id"] for d in log} == set(per_event)
        # Which instances found the events: the log line of a pass that queued some.
        finders = [i for i, gw in enumerate(hooked.instances) if "new event deliveries queued" in gw.log()]
        print(f"\ninstances that queued events: {finders}; attempts: {len(got)} for {expected} events")
    finally:
        receiver.stop()
