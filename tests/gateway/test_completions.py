"""``/v1/completions`` (the legacy text completion API): served, metered and limited as chat is, through
the same generation path (admission, lengths rewritten, leases, cut-off, usage settled)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import orjson
import pytest

from quotagate.gateway.parsing import parse_completions
from tests.fakes.upstream import FakeUpstream
from tests.gateway.conftest import Mint
from tests.gateway.helpers import async_sdk, budget_remaining, raw, sdk
from tests.support import Console, Gateway


def _last(upstream: FakeUpstream) -> dict[str, Any]:
    return [r for r in upstream.requests if "prompt" in r][-1]


def _activity(admin: Console, key_id: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:  # the shipper stores the usage a moment later
        rows: list[dict[str, Any]] = admin.ok("GET", f"/v1/inference/keys/{key_id}/activity")["data"]
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_completion_is_forwarded_and_metered(gw: Gateway, mint: Mint, upstream: FakeUpstream,
                                             admin: Console) -> None:
    secret, key = mint()
    answer = sdk(gw, secret).completions.create(model="chat", prompt="Once upon a time", max_tokens=5)
    assert answer.object == "text_completion"
    assert answer.choices[0].text == " tok" * 5
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (8, 5)
    forwarded = _last(upstream)
    assert forwarded["prompt"] == "Once upon a time" and forwarded["max_tokens"] == 5
    rows = _activity(admin, key["id"])
    assert [(r["endpoint"], r["model"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        ("completions", "chat", 8, 5)]


def test_completion_stream_through_the_sdk(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(token_limit=10_000, token_limit_period="day")
    stream = sdk(gw, secret).completions.create(model="chat", prompt=["a b", "c d"], n=2, max_tokens=4,
                                                stream=True, stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    usage = None
    for chunk in stream:
        assert chunk.object == "text_completion"
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
        usage = chunk.usage or usage
    assert texts == {i: " tok" * 4 for i in range(4)}  # two prompts, two choices each
    assert usage is not None and usage.completion_tokens == 16
    assert budget_remaining(gw, secret) == 10_000 - usage.total_tokens


def test_completion_without_max_tokens_under_a_budget_is_leased_and_answered_whole(
        gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    # No length of its own: forwarded as a stream (its tokens reserved as generated), answered in one piece.
    secret, _ = mint(token_limit=10_000, token_limit_period="day")
    answer = sdk(gw, secret).completions.create(model="chat", prompt="tell", extra_body={"fake": {"tokens": 30}})
    forwarded = _last(upstream)
    assert forwarded["stream"] is True and forwarded["stream_options"] == {"include_usage": True}
    assert answer.object == "text_completion" and answer.choices[0].text == " tok" * 30
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == 30
    assert budget_remaining(gw, secret) == 10_000 - answer.usage.total_tokens


def test_a_completion_stream_is_cut_off_at_the_budget(gw: Gateway, mint: Mint) -> None:
    # The budget has room for the prompt bound and 40 tokens: a stream that would go on is cut off there.
    body = {"model": "chat", "prompt": "tell", "stream": True, "stream_options": {"include_usage": True},
            "fake": {"tokens": 500}}
    bound = parse_completions(orjson.dumps(body)).prompt_bound  # no tokenizer for "chat": a byte bound
    secret, _ = mint(token_limit=bound + 40, token_limit_period="day")
    stream = sdk(gw, secret).completions.create(model="chat", prompt="tell", stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"fake": {"tokens": 500}})
    text, finish, usage = "", None, None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    assert text == " tok" * 40 and finish == "length"
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (bound, 40)
    assert budget_remaining(gw, secret) == 0
    with pytest.raises(openai.RateLimitError) as refused:
        sdk(gw, secret).completions.create(model="chat", prompt="tell", max_tokens=1)
    assert refused.value.code == "token_limit_exceeded"


def test_concurrent_completions_never_overspend_a_budget(gw: Gateway, mint: Mint) -> None:
    limit = 2_000
    secret, _ = mint(token_limit=limit, token_limit_period="day")

    async def go() -> tuple[int, int]:
        client = async_sdk(gw, secret)

        async def one(i: int) -> int:
            if i % 2:
                stream = await client.completions.create(model="chat", prompt="count", stream=True,
                                                         stream_options={"include_usage": True},
                                                         extra_body={"fake": {"tokens": 25}})
                usage = None
                async for chunk in stream:
                    usage = chunk.usage or usage
                assert usage is not None
                return usage.total_tokens
            answer = await client.completions.create(model="chat", prompt="count", max_tokens=25)
            assert answer.usage is not None
            return answer.usage.total_tokens

        results = await asyncio.gather(*(one(i) for i in range(200)), return_exceptions=True)
        await client.close()
        refused = [r for r in results if isinstance(r, BaseException)]
        assert all(isinstance(r, openai.RateLimitError) for r in refused), refused[:3]
        return sum(r for r in results if isinstance(r, int)), len(refused)

    charged, refused = asyncio.run(go())
    assert charged <= limit and refused > 0
    assert budget_remaining(gw, secret) == limit - charged


def test_completions_rpm_and_allowed_models(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(rpm=3, allowed_models=["chat"])
    client = sdk(gw, secret)
    with pytest.raises(openai.PermissionDeniedError):
        client.completions.create(model="chat-b", prompt="x", max_tokens=1)
    client.completions.create(model="chat", prompt="x", max_tokens=1)
    client.completions.create(model="chat", prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="chat", prompt="x", max_tokens=1)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "chat"}, "prompt"),
    ({"model": "chat", "prompt": []}, "prompt"),
    ({"model": "chat", "prompt": [["a"]]}, "prompt"),
    ({"model": "chat", "prompt": "x", "echo": "yes"}, "echo"),
    ({"model": "chat", "prompt": "x", "suffix": 3}, "suffix"),
    ({"model": "chat", "prompt": "x", "n": 3, "best_of": 2}, "best_of"),
    ({"model": "chat", "prompt": ["x"] * 65, "n": 2}, "prompt"),
    ({"model": "chat", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "embed", "prompt": "x"}, "model"),
])
def test_bad_completion_bodies_are_refused(gw: Gateway, mint: Mint, body: dict[str, Any], param: str) -> None:
    secret, _ = mint()
    with raw(gw, secret) as client:
        r = client.post("/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_token_array_prompts_are_counted_as_tokens(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    secret, _ = mint(token_limit=10_000, token_limit_period="day")
    with raw(gw, secret) as client:
        r = client.post("/completions", json={"model": "chat", "prompt": [[1, 2, 3], [4, 5]], "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 5
    assert len(r.json()["choices"]) == 2


def test_completions_get_is_refused(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint()
    r = httpx.get(f"{gw.llm_url}/completions", headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 405 and r.headers["allow"] == "POST"  # RFC 9110: a 405 says what is allowed
    for path in ("/healthz", "/openapi.json"):  # outside the API, no key: GET only, and not a 404
        r = httpx.post(gw.llm_url.removesuffix("/v1") + path)
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD", path
