"""Hundreds of simultaneous requests against keys with small limits: the admitted count and the tokens
charged never exceed the limits, and they reach them. Tokens charged are read from the usage the clients
were sent, and cross-checked against what the gateway itself says is left."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import orjson

from quotagate.gateway.parsing import parse_chat
from tests.fakes.upstream import FakeUpstream
from tests.gateway.conftest import Mint
from tests.gateway.helpers import async_sdk, budget_remaining, hi, raw, sdk
from tests.support import Gateway


async def _burst(gw: Gateway, secret: str, count: int, **kwargs: Any) -> tuple[list[Any], list[Exception]]:
    """``count`` simultaneous chat requests; (successes, refusals). Streams are read to the end and
    yield their final usage."""
    client = async_sdk(gw, secret)

    async def one() -> Any:
        if kwargs.get("stream"):
            stream = await client.chat.completions.create(model="chat", messages=hi(), **kwargs)
            usage = None
            async for chunk in stream:
                usage = chunk.usage or usage
            return usage
        return (await client.chat.completions.create(model="chat", messages=hi(), **kwargs)).usage

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    await client.close()
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    for r in refused:
        assert isinstance(r, openai.RateLimitError), repr(r)
    return ok, refused  # type: ignore[return-value]


def test_rpm_admits_exactly_the_limit(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    secret, _ = mint(rpm=25)
    before = len(upstream.chat_requests())
    ok, refused = asyncio.run(_burst(gw, secret, 300))
    assert len(ok) == 25
    assert len(refused) == 275
    assert all(r.code == "rate_limit_exceeded" for r in refused)  # type: ignore[attr-defined]
    assert all(int(r.response.headers["retry-after"]) >= 1 for r in refused)  # type: ignore[attr-defined]
    # Refused requests never reached the model server.
    assert len(upstream.chat_requests()) - before == 25


def test_tpm_never_exceeded_and_reached(gw: Gateway, mint: Mint) -> None:
    tpm = 2_000
    secret, _ = mint(tpm=tpm)
    ok, refused = asyncio.run(_burst(gw, secret, 250, max_tokens=20))
    charged = sum(u.total_tokens for u in ok)
    assert charged <= tpm
    assert refused, "a burst of 250 must hit a 2000-token tpm"
    # Top it up one request at a time until refused: then the window is within one reservation of full.
    client = sdk(gw, secret)
    while True:
        try:
            usage = client.chat.completions.create(model="chat", messages=hi(), max_tokens=20).usage
        except openai.RateLimitError:
            break
        assert usage is not None
        charged += usage.total_tokens
    assert charged <= tpm
    assert charged >= tpm - 100  # one reservation: prompt bound (74) + 20, plus a little
    assert budget_remaining(gw, secret) == tpm - charged


def test_budget_never_exceeded_by_concurrent_streams(gw: Gateway, mint: Mint) -> None:
    limit = 3_000
    secret, _ = mint(token_limit=limit, token_limit_period="day")
    ok, refused = asyncio.run(_burst(gw, secret, 200, stream=True, stream_options={"include_usage": True},
                                     extra_body={"fake": {"tokens": 30}}))
    assert all(u is not None for u in ok)
    charged = sum(u.total_tokens for u in ok)
    assert charged <= limit
    assert refused and all(r.code == "token_limit_exceeded" for r in refused)  # type: ignore[attr-defined]
    # What the gateway says is left is exactly the budget minus what the clients were told they used.
    assert budget_remaining(gw, secret) == limit - charged
    # Spend the rest: small requests get their max_tokens lowered until the budget is exhausted.
    client = sdk(gw, secret)
    while True:
        try:
            stream = client.chat.completions.create(model="chat", messages=hi(), stream=True,
                                                    stream_options={"include_usage": True},
                                                    extra_body={"fake": {"tokens": 30}})
            usage = [c.usage for c in stream if c.usage][-1]
        except openai.RateLimitError as exc:
            assert exc.code == "token_limit_exceeded"
            break
        charged += usage.total_tokens
    assert charged <= limit
    # Refused only when not even the prompt bound + 1 token fits: at most the bound is left over.
    bound = parse_chat(orjson.dumps({"model": "chat", "messages": hi(), "stream": True,
                                     "stream_options": {"include_usage": True},
                                     "fake": {"tokens": 30}})).prompt_bound
    assert charged >= limit - bound
    assert budget_remaining(gw, secret) == limit - charged


def test_budget_with_non_streaming_and_embeddings(gw: Gateway, mint: Mint) -> None:
    limit = 1_500
    secret, _ = mint(token_limit=limit, token_limit_period="hour")

    async def go() -> int:
        client = async_sdk(gw, secret)

        async def chat() -> int:
            r = await client.chat.completions.create(model="chat", messages=hi(), max_tokens=40,
                                                     extra_body={"fake": {"tokens": 40}})
            assert r.usage is not None
            return r.usage.total_tokens

        async def embed() -> int:
            r = await client.embeddings.create(model="embed", input=["some text to embed"] * 4)
            return r.usage.total_tokens

        results = await asyncio.gather(*([chat() for _ in range(60)] + [embed() for _ in range(60)]),
                                       return_exceptions=True)
        await client.close()
        for r in results:
            if isinstance(r, BaseException):
                assert isinstance(r, openai.RateLimitError), repr(r)
        return sum(r for r in results if isinstance(r, int))

    charged = asyncio.run(go())
    assert charged <= limit
    assert budget_remaining(gw, secret) == limit - charged


def test_rpm_and_budget_on_one_key(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(rpm=10, token_limit=100_000, token_limit_period="month")
    ok, refused = asyncio.run(_burst(gw, secret, 100, stream=True))
    assert len(ok) == 10 and len(refused) == 90


def test_refusals_that_are_the_callers_fault_count_against_rpm(gw: Gateway, mint: Mint,
                                                               upstream: FakeUpstream) -> None:
    # 400/403/404 skipped rpm: a key with rpm=1 sent 3,000 such requests in 0.9 s.
    secret, _ = mint(rpm=3, allowed_models=["chat"])
    before = len(upstream.chat_requests())
    with raw(gw, secret) as client:
        bad = [client.post("/chat/completions", json=body) for body in (
            {"model": "chat", "messages": "not a list"},             # 400
            {"model": "chat-b", "messages": hi()},                  # 403: not allowed
            {"model": "no-such-model", "messages": hi()},           # 404
        )]
        assert [r.status_code for r in bad] == [400, 403, 404]
        assert bad[-1].headers["x-ratelimit-remaining-requests"] == "0"
        flood = [client.post("/chat/completions", json={"model": "chat", "messages": "bad"}) for _ in range(50)]
        assert {r.status_code for r in flood} == {429}
        assert {r.json()["error"]["param"] for r in flood} == {"rpm"}
        assert client.post("/chat/completions", json={"model": "chat", "messages": hi()}).status_code == 429
    assert len(upstream.chat_requests()) == before
