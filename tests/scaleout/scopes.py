"""Scenarios for project limits and per-model key limits across a gateway's processes (three instances on
PostgreSQL + Redis: tests/scaleout/test_scopes.py; ``serve --workers 2``: tests/workers/test_scopes.py):
hundreds of simultaneous requests spread round-robin never get more than the project's (shared by all of
its keys) or the key's per-model rpm, tpm or budget admitted or charged, and reach it; limits set on a
project whose keys every process already has cached take effect in every one."""

from __future__ import annotations

import asyncio

from tests.scaleout.cluster import (
    ONE_REQUEST,
    ONE_REQUEST_B,
    Cluster,
    Seen,
    Spread,
    assert_nothing_lost,
    served,
    spread,
)


async def _rounds(s: Spread, secrets: list[str], model: str = "chat") -> list[Seen]:
    """Waves of simultaneous requests over ``secrets`` (half of them streamed) until one wave gets nothing
    admitted: with every earlier request settled, less than one request's worth is left."""
    seen: list[Seen] = []
    for _ in range(20):
        wave = await asyncio.gather(*(s.chat(secrets[i % len(secrets)], stream=i % 2 == 0, model=model)
                                      for i in range(150)))
        seen += wave
        if not served(list(wave)):
            break
        await asyncio.sleep(0.1)  # let the other instances' settlements land
    return seen


def _keys(cluster: Cluster, project_id: str, n: int = 3, **limits: object) -> list[tuple[str, str]]:
    minted = [cluster.mint(project_id, **limits) for _ in range(n)]
    return [(secret, key["id"]) for secret, key in minted]


def project_limits_hold(cluster: Cluster) -> None:
    rpm_project = cluster.new_project("limits-rpm")
    tpm_project = cluster.new_project("limits-tpm")
    budget_project = cluster.new_project("limits-budget")
    rpm_keys = _keys(cluster, rpm_project)
    tpm_keys = _keys(cluster, tpm_project)
    budget_keys = _keys(cluster, budget_project, rpm=10_000)  # a key limit that never binds
    everything = rpm_keys + tpm_keys + budget_keys
    n = len(cluster.instances)

    async def warm() -> list[Seen]:
        # Every key cached on every process before its project gets limits: the change must reach them.
        async with spread(cluster) as s:
            return list(await asyncio.gather(*(s.chat(secret, instance=i % n) for secret, _ in everything
                                               for i in range(3))))

    warmed = asyncio.run(warm())
    assert len(served(warmed)) == len(warmed)
    for project_id, limits in ((rpm_project, {"rpm": 40}), (tpm_project, {"tpm": 600}),
                               (budget_project, {"token_limit": 900, "token_limit_period": "day"})):
        project = cluster.admin.ok("PATCH", f"/v1/projects/{project_id}", json=limits)
        assert {k: project[k] for k in limits} == limits

    async def flood() -> tuple[list[Seen], list[Seen], list[Seen]]:
        async with spread(cluster) as s:
            async def burst() -> list[Seen]:
                return list(await asyncio.gather(*(s.chat(rpm_keys[i % 3][0]) for i in range(300))))

            # One after the other: a client with 600 connections at once on a loaded machine was once too
            # slow to send some requests within the server's first-request deadline (10 s).
            return (await burst(), await _rounds(s, [k for k, _ in tpm_keys]),
                    await _rounds(s, [k for k, _ in budget_keys]))

    rpm, tpm, budget = asyncio.run(flood())
    assert len(served(rpm)) == 40, "the project's rpm, shared by its three keys, across the instances"
    assert {(x.status, x.code, x.param) for x in rpm if x.status != 200} == {(429, "rate_limit_exceeded", "project")}
    tpm_charged = sum(x.tokens for x in served(tpm))
    budget_charged = sum(x.tokens for x in served(budget))
    print(f"\nproject rpm 40: {len(served(rpm))} of {len(rpm)} admitted; project tpm 600: {tpm_charged} tokens "
          f"in {len(served(tpm))} of {len(tpm)}; project budget 900: {budget_charged} tokens in "
          f"{len(served(budget))} of {len(budget)}")
    assert 600 - ONE_REQUEST < tpm_charged <= 600
    assert {(x.status, x.code, x.param) for x in tpm if x.status != 200} == {(429, "rate_limit_exceeded", "project")}
    assert 900 - ONE_REQUEST < budget_charged <= 900
    assert {(x.status, x.code, x.param) for x in budget if x.status != 200} == {
        (429, "token_limit_exceeded", "project")}
    assert all(x.code is None for x in served(tpm + budget)), "a stream ended in an error"
    for seen in (rpm, tpm, budget):
        assert {x.instance for x in seen} == set(range(n))
    # The project's usage shows its limits' live state, and so does every key of it.
    usage = cluster.admin.ok("GET", f"/v1/projects/{budget_project}/usage")
    assert usage["limits"]["budget"]["limit"] == 900
    assert (usage["limits"]["budget"]["used"], usage["limits"]["budget"]["reserved"]) == (budget_charged, 0)
    key_usage = cluster.admin.ok("GET", f"/v1/inference/keys/{budget_keys[0][1]}/usage")
    assert key_usage["limits"]["project"]["budget"]["used"] == budget_charged
    assert key_usage["limits"]["rpm"]["limit"] == 10_000
    # Request i of the burst went with key i % 3; warm-up request j with key j // 3 of ``everything``.
    for k, (_, key_id) in enumerate(rpm_keys):
        mine = [x for i, x in enumerate(rpm) if i % 3 == k] + [x for j, x in enumerate(warmed) if j // 3 == k]
        assert served(mine), "every key of the project had requests admitted"
        assert_nothing_lost(cluster, key_id, mine)


def model_limits_hold(cluster: Cluster) -> None:
    secret, key = cluster.mint(rpm=10_000, model_limits={
        "chat": {"rpm": 30}, "chat-b": {"token_limit": 700, "token_limit_period": "day"}})
    assert key["model_limits"]["chat"] == {"rpm": 30, "tpm": None, "token_limit": None, "token_limit_period": None}

    async def flood() -> tuple[list[Seen], list[Seen]]:
        async with spread(cluster) as s:
            async def burst() -> list[Seen]:
                return list(await asyncio.gather(*(s.chat(secret) for _ in range(300))))

            return await burst(), await _rounds(s, [secret], model="chat-b")

    chat, chat_b = asyncio.run(flood())
    assert len(served(chat)) == 30, "the key's rpm for the model, across the instances"
    assert {(x.status, x.code, x.param) for x in chat if x.status != 200} == {
        (429, "rate_limit_exceeded", "model_limits")}
    charged = sum(x.tokens for x in served(chat_b))
    print(f"\nmodel rpm 30: {len(served(chat))} of {len(chat)}; model budget 700: {charged} tokens in "
          f"{len(served(chat_b))} of {len(chat_b)}")
    assert 700 - ONE_REQUEST_B < charged <= 700
    assert {(x.status, x.code, x.param) for x in chat_b if x.status != 200} == {
        (429, "token_limit_exceeded", "model_limits")}
    for seen in (chat, chat_b):
        assert {x.instance for x in seen} == set(range(len(cluster.instances)))
    usage = cluster.admin.ok("GET", f"/v1/inference/keys/{key['id']}/usage")
    assert usage["limits"]["models"]["chat-b"]["budget"]["used"] == charged
    assert usage["limits"]["models"]["chat"]["rpm"]["used"] == 30
    assert_nothing_lost(cluster, key["id"], chat + chat_b)
