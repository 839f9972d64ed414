"""Project limits and per-model key limits through the APIs: set and validated in the console API (owners
only for a project's, audited), enforced by the LLM API with hundreds of simultaneous requests from the
official SDK (shared by a project's keys; per model), named in the refusal (``param``) and the headers,
and shown live in the usage API."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from tests.gateway.conftest import Mint
from tests.gateway.helpers import async_sdk, hi, raw
from tests.support import Console, Gateway


def _error(r: Any) -> dict[str, Any]:
    error: dict[str, Any] = r.json()["error"]
    return error


@pytest.fixture
def owned(admin: Console) -> dict[str, Any]:
    """A project of its own (its limits would bind the other tests' keys)."""
    return admin.project("scoped")


def test_project_limits_are_set_by_owners_validated_and_audited(gw: Gateway, admin: Console,
                                                                owned: dict[str, Any]) -> None:
    pid = owned["id"]
    assert (owned["rpm"], owned["tpm"], owned["token_limit"], owned["token_limit_period"]) == (None, None, None, None)
    for body, field in (({"rpm": 0}, "rpm"), ({"tpm": 1.5}, "tpm"), ({"rpm": "10"}, "rpm"),
                        ({"token_limit": 100}, "token_limit_period"),
                        ({"token_limit_period": "day"}, "token_limit"),
                        ({"token_limit": 10, "token_limit_period": "year"}, "token_limit_period"),
                        ({"burst": 3}, "burst")):
        r = admin.request("PATCH", f"/v1/projects/{pid}", json=body)
        assert r.status_code == 400, (body, r.text)
        assert field in _error(r)["message"], (body, r.text)
    project = admin.ok("PATCH", f"/v1/projects/{pid}", json={"rpm": 100, "token_limit": 5_000,
                                                             "token_limit_period": "week"})
    assert (project["rpm"], project["tpm"], project["token_limit"], project["token_limit_period"]) == (
        100, None, 5_000, "week")
    assert admin.ok("GET", f"/v1/projects/{pid}")["token_limit"] == 5_000
    project = admin.ok("PATCH", f"/v1/projects/{pid}", json={"token_limit": None})
    assert (project["rpm"], project["token_limit"], project["token_limit_period"]) == (100, None, None)
    # A member may not set them (403); a stranger does not see the project (404).
    member = gw.user("scoped-member@example.com")
    admin.ok("POST", f"/v1/projects/{pid}/members", 201, json={"email": "scoped-member@example.com",
                                                               "role": "member"})
    member.join(pid)
    assert member.request("PATCH", f"/v1/projects/{pid}", json={"rpm": 1}).status_code == 403
    stranger = gw.user("scoped-stranger@example.com")
    assert stranger.request("PATCH", f"/v1/projects/{pid}", json={"rpm": 1}).status_code == 404
    events = admin.ok("GET", f"/v1/projects/{pid}/audit-log")["data"]
    edits = [e["details"] for e in events if e["action"] == "project.edited"]
    assert edits[0] == {"limits": {"before": {"token_limit": 5_000, "token_limit_period": "week"},
                                   "after": {"token_limit": None, "token_limit_period": None}}}
    assert edits[1]["limits"]["after"] == {"rpm": 100, "token_limit": 5_000, "token_limit_period": "week"}


def test_model_limits_are_validated_and_shown(admin: Console, mint: Mint, project: dict[str, Any]) -> None:
    for body, field in (({"nope": {"rpm": 1}}, "nope"), ({"chat": {"rpm": 0}}, "rpm"),
                        ({"chat": {"token_limit": 10}}, "model_limits.chat.token_limit_period"),
                        ({"chat": {}}, "model_limits.chat"), ({"chat": {"rpm": 1, "x": 2}}, "x"),
                        ({"chat": 5}, "model_limits"), ([{"chat": {"rpm": 1}}], "model_limits")):
        r = admin.request("POST", f"/v1/projects/{project['id']}/inference/keys",
                          json={"name": "m", "model_limits": body})
        assert r.status_code == 400, (body, r.text)
        assert field in _error(r)["message"], (body, r.text)
    _, key = mint(model_limits={"chat": {"tpm": 500}, "embed": {"token_limit": 9, "token_limit_period": "hour"}})
    assert key["model_limits"] == {
        "chat": {"rpm": None, "tpm": 500, "token_limit": None, "token_limit_period": None},
        "embed": {"rpm": None, "tpm": None, "token_limit": 9, "token_limit_period": "hour"}}
    edited = admin.ok("PATCH", f"/v1/inference/keys/{key['id']}", json={"model_limits": {"chat": {"rpm": 3}}})
    assert edited["model_limits"] == {"chat": {"rpm": 3, "tpm": None, "token_limit": None, "token_limit_period": None}}
    assert admin.ok("PATCH", f"/v1/inference/keys/{key['id']}", json={"model_limits": None})["model_limits"] is None


async def _burst(gw: Gateway, secrets: list[str], count: int, model: str = "chat",
                 **kwargs: Any) -> tuple[list[Any], list[openai.RateLimitError]]:
    clients = [async_sdk(gw, s) for s in secrets]

    async def one(i: int) -> Any:
        client = clients[i % len(clients)]
        if model == "embed":
            return (await client.embeddings.create(model=model, input="hello")).usage
        if kwargs.get("stream"):
            usage = None
            async for chunk in await client.chat.completions.create(model=model, messages=hi(), max_tokens=8,
                                                                    **kwargs):
                usage = chunk.usage or usage
            return usage
        return (await client.chat.completions.create(model=model, messages=hi(), max_tokens=8, **kwargs)).usage

    results = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    for c in clients:
        await c.close()
    refused = [r for r in results if isinstance(r, BaseException)]
    for r in refused:
        assert isinstance(r, openai.RateLimitError), repr(r)
    return [r for r in results if not isinstance(r, BaseException)], refused  # type: ignore[misc]


def test_a_project_rpm_is_shared_by_its_keys(gw: Gateway, admin: Console, owned: dict[str, Any]) -> None:
    pid = owned["id"]
    secrets = [admin.mint(pid, rpm=1_000)["secret"] for _ in range(3)]
    for s in secrets:  # cached before the project has limits: the change must reach the cache
        assert raw(gw, s).post("/chat/completions", json={"model": "chat", "messages": hi()}).status_code == 200
    admin.ok("PATCH", f"/v1/projects/{pid}", json={"rpm": 30})
    ok, refused = asyncio.run(_burst(gw, secrets, 300))
    assert len(ok) == 30
    assert {(r.code, r.body["param"]) for r in refused} == {("rate_limit_exceeded", "project")}  # type: ignore[index]
    assert "project" in refused[0].message
    # The headers show the binding limit: the project's 30, not the key's 1,000.
    r = raw(gw, secrets[0]).post("/chat/completions", json={"model": "chat", "messages": hi()})
    assert r.status_code == 429 and r.headers["x-ratelimit-limit-requests"] == "30"
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    usage = admin.ok("GET", f"/v1/projects/{pid}/usage")
    assert usage["limits"]["rpm"] == {"limit": 30, "used": 30, "remaining": 0, "window_seconds": 60}
    assert usage["limits"]["live"] is True


def test_a_project_budget_holds_over_concurrent_streams_of_its_keys(gw: Gateway, admin: Console,
                                                                   owned: dict[str, Any]) -> None:
    pid = owned["id"]
    admin.ok("PATCH", f"/v1/projects/{pid}", json={"token_limit": 2_000, "token_limit_period": "day"})
    keys = [admin.mint(pid) for _ in range(4)]
    ok, refused = asyncio.run(_burst(gw, [k["secret"] for k in keys], 200, stream=True,
                                     stream_options={"include_usage": True}, extra_body={"fake": {"tokens": 8}}))
    assert refused and {(r.code, r.body["param"]) for r in refused} == {  # type: ignore[index]
        ("token_limit_exceeded", "project")}
    usage = admin.ok("GET", f"/v1/projects/{pid}/usage")
    budget = usage["limits"]["budget"]
    assert budget["limit"] == 2_000 and budget["reserved"] == 0
    assert budget["used"] == usage["totals"]["total_tokens"] <= 2_000
    per_key = [admin.ok("GET", f"/v1/inference/keys/{k['id']}/usage") for k in keys]
    assert sum(u["totals"]["total_tokens"] for u in per_key) == budget["used"]
    assert all(u["limits"]["project"]["budget"]["used"] == budget["used"] for u in per_key)
    assert len(ok) + len(refused) == 200 and all(u is not None for u in ok)
    assert sum(u.total_tokens for u in ok) == budget["used"]  # what the clients were told is what was charged


def test_per_model_limits_bind_their_model_only(gw: Gateway, admin: Console, mint: Mint) -> None:
    secret, key = mint(model_limits={"chat": {"rpm": 20}, "embed": {"rpm": 150}})
    (chat_ok, chat_refused), (embed_ok, embed_refused), (other_ok, other_refused) = asyncio.run(_all(gw, secret))
    assert len(chat_ok) == 20 and len(embed_ok) == 150 and len(other_ok) == 100 and not other_refused
    assert {(r.code, r.body["param"]) for r in chat_refused + embed_refused} == {  # type: ignore[index]
        ("rate_limit_exceeded", "model_limits")}
    assert "'chat'" in chat_refused[0].message
    usage = admin.ok("GET", f"/v1/inference/keys/{key['id']}/usage")
    assert usage["limits"]["models"]["chat"]["rpm"]["used"] == 20
    assert usage["limits"]["models"]["embed"]["rpm"]["used"] == 150
    assert usage["limits"]["rpm"] is None


async def _all(gw: Gateway, secret: str) -> list[tuple[list[Any], list[openai.RateLimitError]]]:
    return list(await asyncio.gather(_burst(gw, [secret], 200), _burst(gw, [secret], 200, model="embed"),
                                     _burst(gw, [secret], 100, model="chat-b")))
