"""Events on one instance: budget thresholds crossed under hundreds of concurrent streams (each threshold
once), a key revoked (by DELETE and by a rotation without grace), a leaked key, a key about to expire;
signatures, replays and what each webhook subscribed to."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import pytest

from quotagate.store.tables import projects
from quotagate.webhooks.signing import verify
from tests.gateway.helpers import async_sdk
from tests.support import Console, Gateway
from tests.webhooks.receiver import Received, Receiver, verified


def add_hook(owner: Console, project_id: str, url: str, **body: Any) -> dict[str, Any]:
    made: dict[str, Any] = owner.ok("POST", f"/v1/projects/{project_id}/webhooks", 201, json={"url": url, **body})
    return made


async def drain_budget(gw: Gateway, secret: str, concurrency: int, rounds: int) -> tuple[int, int]:
    """``concurrency`` streams at a time, ``rounds`` times: (tokens the clients were charged, refusals)."""
    client = async_sdk(gw, secret)
    charged = refused = 0

    async def one() -> None:
        nonlocal charged, refused
        try:
            stream = await client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=64, stream=True,
                stream_options={"include_usage": True}, extra_body={"fake": {"tokens": 64}})
            async for chunk in stream:
                if chunk.usage is not None:
                    charged += chunk.usage.total_tokens
        except openai.RateLimitError:
            refused += 1

    for _ in range(rounds):
        await asyncio.gather(*(one() for _ in range(concurrency)))
    await client.close()
    return charged, refused


def test_each_budget_threshold_is_announced_once(gw: Gateway, owner: Console) -> None:
    receiver, quarter = Receiver(fail_first=1).start(), Receiver().start()
    try:
        project = owner.project("budget")
        hook = add_hook(owner, project["id"], receiver.url, budget_thresholds=[0.5, 0.8, 1.0])
        other = add_hook(owner, project["id"], quarter.url, events=["key.budget_threshold"], budget_thresholds=[0.25])
        key = owner.mint(project["id"], token_limit=3000, token_limit_period="day")
        spare = owner.mint(project["id"], token_limit=10**9, token_limit_period="day")  # crosses nothing
        charged, refused = asyncio.run(drain_budget(gw, key["secret"], concurrency=200, rounds=2))
        asyncio.run(drain_budget(gw, spare["secret"], concurrency=10, rounds=1))
        assert charged == 3000 and refused > 0, (charged, refused)
        got = receiver.wait_for(lambda rs: len({r.event["data"]["threshold"] for r in rs if r.answered == 200}) == 3,
                                what="three thresholds")
        time.sleep(1.5)  # several more passes: nothing more may come
        got = receiver.snapshot()
        accepted = [r for r in got if r.answered == 200]
        assert sorted(r.event["data"]["threshold"] for r in accepted) == [0.5, 0.8, 1.0]
        assert len({r.event_id for r in accepted}) == 3
        assert len(got) == 6  # each event failed once, then was accepted once
        for r in accepted:
            assert verified(hook["secret"], r)
            data = r.event["data"]
            assert r.event["type"] == "key.budget_threshold"
            assert data["key"] == {"id": key["id"], "name": key["name"], "prefix": key["prefix"]}
            assert data["token_limit"] == 3000 and data["period"] == "day" and data["project_id"] == project["id"]
            assert data["used_tokens"] >= data["threshold"] * 3000
            day = datetime.now(UTC).strftime("%Y-%m-%d")
            assert data["period_start"] == f"{day}T00:00:00Z"
        quarter_got = quarter.wait_for(lambda rs: len(rs) >= 1, what="the 25% threshold")
        time.sleep(0.5)
        assert [r.event["data"]["threshold"] for r in quarter.snapshot()] == [0.25]
        assert verified(other["secret"], quarter_got[0]) and not verified(hook["secret"], quarter_got[0])
    finally:
        receiver.stop()
        quarter.stop()


def test_revoked_leaked_and_expiring_keys_are_announced(gw: Gateway, owner: Console) -> None:
    receiver = Receiver().start()
    try:
        project = owner.project("key-events")
        early = owner.mint(project["id"], name="revoked-before-the-webhook")
        owner.ok("DELETE", f"/v1/inference/keys/{early['id']}")  # before the webhook: not announced
        hook = add_hook(owner, project["id"], receiver.url)
        revoked, leaked, rotated = (owner.mint(project["id"], name=n) for n in ("revoked", "leaked", "rotated"))
        soon = owner.mint(project["id"], name="soon", expires_at=(datetime.now(UTC) + timedelta(days=3)).isoformat())
        owner.mint(project["id"], name="later", expires_at=(datetime.now(UTC) + timedelta(days=10)).isoformat())
        owner.ok("DELETE", f"/v1/inference/keys/{revoked['id']}")
        owner.ok("DELETE", f"/v1/inference/keys/{revoked['id']}")  # again: changes nothing, announces nothing
        owner.ok("POST", f"/v1/inference/keys/{rotated['id']}/rotate", 201, json={"grace_period_seconds": 0})
        report = [{"token": leaked["secret"], "type": "quotagate_key", "url": "https://gist.example/1",
                   "source": "gist"}]
        answer = httpx.post(f"{gw.console_url}/v1/inference/keys/leaked", json=report, timeout=30).json()
        assert answer[0]["label"] == "true_positive"
        got = receiver.wait_for(lambda rs: len(rs) >= 4, what="four key events")
        time.sleep(1.0)
        got = receiver.snapshot()
        by_type: dict[str, list[Received]] = {}
        for r in got:
            by_type.setdefault(r.event["type"], []).append(r)
        assert sorted((t, len(rs)) for t, rs in by_type.items()) == [("key.expiring", 1), ("key.leaked", 1),
                                                                      ("key.revoked", 2)]
        assert all(verified(hook["secret"], r) for r in got)
        revocations = {r.event["data"]["key"]["id"]: r.event["data"] for r in by_type["key.revoked"]}
        assert set(revocations) == {revoked["id"], rotated["id"]}
        me = owner.ok("GET", "/v1/me")
        assert revocations[revoked["id"]]["actor"] == {"id": me["id"], "email": me["email"]}
        assert revocations[revoked["id"]]["reason"] == "revoked" and revocations[rotated["id"]]["reason"] == "rotated"
        leak = by_type["key.leaked"][0].event["data"]
        assert leak["key"]["id"] == leaked["id"] and leak["revoked"] is True
        assert (leak["url"], leak["source"], leak["type"]) == ("https://gist.example/1", "gist", "quotagate_key")
        expiring = by_type["key.expiring"][0].event["data"]
        assert expiring["key"]["id"] == soon["id"] and 2 * 86400 < expiring["expires_in_seconds"] <= 3 * 86400
        # The delivery log has them all, delivered at the first attempt.
        log = owner.ok("GET", f"/v1/projects/{project['id']}/webhooks/{hook['id']}/deliveries")["data"]
        assert sorted(d["event_type"] for d in log) == ["key.expiring", "key.leaked", "key.revoked", "key.revoked"]
        assert {(d["status"], d["attempts"], d["response_code"]) for d in log} == {("delivered", 1, 200)}
        assert {d["id"] for d in log} == {r.event_id for r in got}
    finally:
        receiver.stop()


def test_a_webhook_gets_only_the_events_it_subscribed_to(gw: Gateway, owner: Console) -> None:
    receiver = Receiver().start()
    try:
        project = owner.project("subscribed")
        add_hook(owner, project["id"], receiver.url, events=["key.leaked"])
        disabled = add_hook(owner, project["id"], receiver.url)
        owner.ok("PATCH", f"/v1/projects/{project['id']}/webhooks/{disabled['id']}", json={"enabled": False})
        key = owner.mint(project["id"])
        owner.ok("DELETE", f"/v1/inference/keys/{key['id']}")
        leaked = owner.mint(project["id"])
        httpx.post(f"{gw.console_url}/v1/inference/keys/leaked", json=[{"token": leaked["secret"]}], timeout=30)
        receiver.wait_for(lambda rs: len(rs) >= 1, what="the leak")
        time.sleep(1.0)
        assert [r.event["type"] for r in receiver.snapshot()] == ["key.leaked"]
    finally:
        receiver.stop()


def test_a_replay_is_detectable(gw: Gateway, owner: Console) -> None:
    """A captured delivery sent again: same event id (a receiver that keeps the ids it has seen refuses it),
    and once its timestamp is older than the tolerance its signature no longer verifies; a body changed
    in any way never verifies."""
    receiver = Receiver().start()
    try:
        project = owner.project("replay")
        hook = add_hook(owner, project["id"], receiver.url)
        queued = owner.ok("POST", f"/v1/projects/{project['id']}/webhooks/{hook['id']}/test", 201)
        got = receiver.wait_for(lambda rs: len(rs) == 1, what="the test event")[0]
        header, body = got.headers["quotagate-signature"], got.body
        assert got.event_id == queued["id"] == got.event["id"]
        assert verify(hook["secret"], header, body)
        t = int(header.split(",")[0].removeprefix("t="))
        assert not verify(hook["secret"], header, body, now=t + 301)
        assert verify(hook["secret"], header, body, now=t + 299)
        assert not verify(hook["secret"], header, body.replace(b"webhook.test", b"webhook.tesT"))
        assert not verify(hook["secret"], header.replace(f"t={t}", f"t={t + 1}"), body)
        assert not verify("whsec_" + "x" * 43, header, body)
    finally:
        receiver.stop()


def test_each_project_budget_threshold_is_announced_once(gw: Gateway, owner: Console) -> None:
    """A project's own budget (CONTRACT §6 project limits), drained through two keys of it at once."""
    if projects.c.get("token_limit") is None:
        pytest.skip("project limits (projects.token_limit, migration 0009) are not in this tree")
    receiver = Receiver().start()
    try:
        project = owner.project("project-budget")
        hook = add_hook(owner, project["id"], receiver.url, events=["project.budget_threshold"],
                        budget_thresholds=[0.5, 1.0])
        owner.ok("PATCH", f"/v1/projects/{project['id']}", json={"token_limit": 3000, "token_limit_period": "day"})
        keys = [owner.mint(project["id"], name=f"k{i}") for i in range(2)]

        async def both() -> list[tuple[int, int]]:
            return list(await asyncio.gather(*(drain_budget(gw, k["secret"], concurrency=100, rounds=2) for k in keys)))

        results = asyncio.run(both())
        assert sum(charged for charged, _ in results) == 3000, results
        receiver.wait_for(lambda rs: len(rs) >= 2, what="two project thresholds")
        time.sleep(1.5)
        got = receiver.snapshot()
        assert sorted(r.event["data"]["threshold"] for r in got) == [0.5, 1.0]
        for r in got:
            data = r.event["data"]
            assert r.event["type"] == "project.budget_threshold" and verified(hook["secret"], r)
            assert data["project"] == {"id": project["id"], "name": "project-budget"}
            assert data["token_limit"] == 3000 and data["period"] == "day"
            assert data["used_tokens"] >= data["threshold"] * 3000
    finally:
        receiver.stop()
