"""The LLM API as a new user meets it: the official openai SDK (sync and async) and raw HTTP."""

from __future__ import annotations

import asyncio
import base64
import re
import struct
import time

import openai
import pytest

from quotagate.gateway.app import RequestIds
from tests.fakes.upstream import FakeUpstream
from tests.gateway.conftest import UPSTREAM_KEY, Mint
from tests.gateway.helpers import async_sdk, budget_remaining, hi, raw, sdk
from tests.support import Gateway

RATE_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
                "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


def test_models_lists_only_what_the_key_may_use(gw: Gateway, mint: Mint) -> None:
    narrow, _ = mint(allowed_models=["chat", "embed"])
    wide, _ = mint()
    assert sorted(m.id for m in sdk(gw, narrow).models.list()) == ["chat", "embed"]
    assert {m.id for m in sdk(gw, wide).models.list()} == {"chat", "chat-b", "embed", "rerank", "mapped", "failover",
                                                          "flaky", "dead"}
    assert sdk(gw, narrow).models.retrieve("chat").id == "chat"
    with pytest.raises(openai.NotFoundError):
        sdk(gw, narrow).models.retrieve("chat-b")


def test_chat_completion_with_the_sdk(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    secret, _ = mint(rpm=100, tpm=100_000)
    response = sdk(gw, secret).chat.completions.with_raw_response.create(model="chat", messages=hi(), max_tokens=5)
    completion = response.parse()
    assert completion.choices[0].message.content == " tok" * 5
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert response.headers["x-request-id"].startswith("req_")
    for name in RATE_HEADERS:
        assert name in response.headers, name
    assert response.headers["x-ratelimit-limit-requests"] == "100"
    assert response.headers["x-ratelimit-remaining-requests"] == "99"
    assert response.headers["x-ratelimit-limit-tokens"] == "100000"
    # The upstream's own key came from the env var; the client's key never reaches the model server.
    assert upstream.authorizations[-1] == f"Bearer {UPSTREAM_KEY}"


def test_stream_relays_usage_only_when_asked(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    secret, _ = mint(token_limit=100_000, token_limit_period="day")
    client = sdk(gw, secret)
    chunks = list(client.chat.completions.create(model="chat", messages=hi(), stream=True, max_tokens=6,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " tok" * 6
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 6

    chunks = list(client.chat.completions.create(model="chat", messages=hi(), stream=True, max_tokens=6))
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    # ...but the gateway asked the model server for usage all the same, to charge it.
    assert upstream.chat_requests()[-1]["stream_options"] == {"include_usage": True}


def test_stream_headers(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(rpm=50)
    with raw(gw, secret) as client, client.stream("POST", "/chat/completions", json={
            "model": "chat", "messages": hi(), "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-ratelimit-limit-requests"] == "50"
        assert r.headers["x-request-id"].startswith("req_")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_embeddings_with_the_sdk(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(token_limit=10_000, token_limit_period="hour")
    client = sdk(gw, secret)
    result = client.embeddings.create(model="embed", input=["hello", "world"])  # the SDK asks for base64
    assert len(result.data) == 2
    assert result.data[0].embedding == list(struct.unpack("<2f", base64.b64decode("AACAPwAAAEA=")))
    assert result.usage.prompt_tokens > 0
    floats = client.embeddings.create(model="embed", input="hello", encoding_format="float")
    assert floats.data[0].embedding == [1.0, 2.0]
    tokens = client.embeddings.create(model="embed", input=[[1, 2, 3]], encoding_format="float")
    assert len(tokens.data) == 1


def test_async_client_streams_and_embeds(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(rpm=100)

    async def go() -> tuple[str, int]:
        client = async_sdk(gw, secret)
        stream = await client.chat.completions.create(model="chat", messages=hi(), stream=True, max_tokens=3)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        emb = await client.embeddings.create(model="embed", input="x")
        await client.close()
        return text, len(emb.data)

    assert asyncio.run(go()) == (" tok" * 3, 1)


def test_error_classes_and_codes(gw: Gateway, mint: Mint) -> None:
    # rpm=3: the 403 and the 404 count as requests too (docs/limits.md), the success is the third.
    secret, _ = mint(allowed_models=["chat"], rpm=3)
    with pytest.raises(openai.AuthenticationError) as e:
        sdk(gw, "qgk_not-a-real-key").chat.completions.create(model="chat", messages=hi())
    assert e.value.code == "invalid_api_key"
    forged = secret[:-1] + ("A" if secret[-1] != "A" else "B")  # checksum no longer matches
    with pytest.raises(openai.AuthenticationError) as e:
        sdk(gw, forged).chat.completions.create(model="chat", messages=hi())
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.PermissionDeniedError) as e:
        sdk(gw, secret).chat.completions.create(model="chat-b", messages=hi())
    assert e.value.code == "model_not_allowed"
    with pytest.raises(openai.NotFoundError) as e:
        sdk(gw, secret).chat.completions.create(model="no-such-model", messages=hi())
    assert e.value.code == "model_not_found"
    sdk(gw, secret).chat.completions.create(model="chat", messages=hi())
    with pytest.raises(openai.RateLimitError) as e:
        sdk(gw, secret).chat.completions.create(model="chat", messages=hi())
    assert e.value.code == "rate_limit_exceeded"
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
    assert e.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    body = e.value.response.json()["error"]
    assert set(body) == {"message", "type", "code", "param"}


def test_wrong_model_type_is_a_bad_request(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint()
    with pytest.raises(openai.BadRequestError):
        sdk(gw, secret).chat.completions.create(model="embed", messages=hi())
    with pytest.raises(openai.BadRequestError):
        sdk(gw, secret).embeddings.create(model="chat", input="x")


@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
    (b'{"model": 7, "messages": [{"role": "user", "content": "hi"}]}', "model"),
    (b'{"model": "chat"}', "messages"),
    (b'{"model": "chat", "messages": "hi"}', "messages"),
    (b'{"model": "chat", "messages": [{"content": "hi"}]}', "messages[0]"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}', "max_tokens"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}', "max_tokens"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e30}', "max_tokens"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 99999999999}',
     "max_tokens"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": true}',
     "max_completion_tokens"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "functions": {}}', "functions"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "n": 1000}', "n"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": [1]}]}', "messages[0].content"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": [{"text": "hi"}]}]}', "messages[0].content"),
    # Nested deeper than orjson writes (or than Python would walk): found before anything is reserved.
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 300 + b"]" * 300
     + b"}", None),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi", "meta": ' + b"[" * 600 + b"]" * 600
     + b"}]}", None),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "tools": ' + b"[" * 300 + b"]" * 300
     + b"}", None),
])
def test_bad_chat_bodies_are_400_and_never_forwarded(gw: Gateway, mint: Mint, upstream: FakeUpstream,
                                                     body: bytes, param: str | None) -> None:
    secret, _ = mint(rpm=1000)
    before = len(upstream.requests)
    with raw(gw, secret) as client:
        r = client.post("/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert r.headers["x-request-id"]
    assert r.headers["x-ratelimit-limit-requests"] == "1000"
    assert len(upstream.requests) == before


@pytest.mark.parametrize("body", [b'{"model": "embed"}', b'{"model": "embed", "input": 5}',
                                  b'{"model": "embed", "input": []}', b'{"model": "embed", "input": [1.5]}',
                                  b'{"model": "embed", "input": "x", "encoding_format": "hex"}'])
def test_bad_embedding_bodies_are_400(gw: Gateway, mint: Mint, upstream: FakeUpstream, body: bytes) -> None:
    secret, _ = mint()
    before = len(upstream.requests)
    with raw(gw, secret) as client:
        r = client.post("/embeddings", content=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert len(upstream.requests) == before


def test_a_body_too_deep_to_rewrite_reserves_nothing(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    # Found by an adversarial run: a body the gateway must write again (a stream without include_usage,
    # max_tokens lowered to the budget) that orjson could not write failed with a 500 after admission
    # and left its reservation in place: the whole budget, until the month ended.
    secret, _ = mint(token_limit=20_000, token_limit_period="month")
    deep = b"[" * 300 + b"]" * 300
    body = (b'{"model": "chat", "max_tokens": 10000000, "stream": true, '
            b'"messages": [{"role": "user", "content": "hi"}], "x": ' + deep + b"}")
    before, log_before = len(upstream.requests), len(gw.log())
    with raw(gw, secret) as client:
        r = client.post("/chat/completions", content=body)
        assert r.status_code == 400, r.text
        assert "nested" in r.json()["error"]["message"]
        assert budget_remaining(gw, secret) == 20_000
        r = client.post("/chat/completions", json={"model": "chat", "messages": hi(), "max_tokens": 5})
        assert r.status_code == 200, r.text
    assert len(upstream.requests) == before + 1
    assert "Traceback" not in gw.log()[log_before:]


def test_oversized_body_is_413(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    secret, _ = mint()
    before = len(upstream.requests)
    big = b'{"model": "chat", "messages": [{"role": "user", "content": "' + b"x" * (9 * 1024 * 1024) + b'"}]}'
    with raw(gw, secret) as client:
        r = client.post("/chat/completions", content=big)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "payload_too_large"

        def chunks():  # no Content-Length: the limit is enforced while reading
            for i in range(0, len(big), 1 << 20):
                yield big[i:i + (1 << 20)]

        r = client.post("/chat/completions", content=chunks())
        assert r.status_code == 413
    assert len(upstream.requests) == before


def test_every_response_has_a_request_id(gw: Gateway) -> None:
    with raw(gw, None) as client:
        for r in (client.get("/models"), client.post("/chat/completions", json={}),
                  client.get("/nope"), client.get("/chat/completions")):
            assert r.headers["x-request-id"].startswith("req_")
            assert set(r.json()["error"]) == {"message", "type", "code", "param"}
        assert client.get("/chat/completions").status_code in (401, 405)


def test_max_tokens_is_lowered_to_the_budget_and_none_is_added(gw: Gateway, mint: Mint,
                                                              upstream: FakeUpstream) -> None:
    secret, _ = mint(token_limit=300, token_limit_period="day")
    client = sdk(gw, secret)
    # No length of its own: none is added (answers cut silently at the gateway's default were a harm); it
    # is forwarded as a stream, reserved as it is generated, and answered in one piece.
    r = client.chat.completions.create(model="chat", messages=hi())
    forwarded = upstream.chat_requests()[-1]
    assert "max_tokens" not in forwarded and forwarded["stream"] is True
    assert r.object == "chat.completion" and r.choices[0].message.content == " tok" * 8
    client.chat.completions.create(model="chat", messages=hi(), max_tokens=100_000)
    forwarded = upstream.chat_requests()[-1]["max_tokens"]
    assert forwarded < 300 - 72  # lowered to what the budget still allows after the prompt bound
    client.chat.completions.create(model="chat", messages=hi(), max_completion_tokens=100_000)
    assert upstream.chat_requests()[-1]["max_completion_tokens"] < 300


def test_no_limits_key_passes_the_body_through(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    secret, _ = mint()
    sdk(gw, secret).chat.completions.create(model="chat", messages=hi(), extra_body={"custom_field": [1, 2]})
    forwarded = upstream.chat_requests()[-1]
    assert forwarded["custom_field"] == [1, 2]
    assert "max_tokens" not in forwarded


def test_request_ids_are_unique_and_ordered_by_time() -> None:
    # Ordered so that the activity table's primary key index takes them at its end (RequestIds: why).
    before = int(time.time() * 1000)
    one, other = RequestIds(), RequestIds()  # as in two processes
    ids = [gen() for _ in range(10_000) for gen in (one, other)]
    after = int(time.time() * 1000)
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"req_[0-9a-f]{32}", i) for i in ids)
    stamps = [int(i[4:16], 16) for i in ids]
    assert stamps == sorted(stamps)
    assert before <= stamps[0] and stamps[-1] <= after


def test_made_up_model_names_are_not_kept(gw: Gateway, mint: Mint) -> None:
    # A 404 model_not_found once put the raw name into Prometheus labels and usage rows: 50 names of
    # 4 MiB took the process from 145 to 350 MB for good, and /metrics to 419 MB.
    secret, key = mint()
    names = [f"bogus-{i}-" + "x" * 10_000 for i in range(50)]
    with raw(gw, secret) as client:
        for name in names:
            r = client.post("/chat/completions", json={"model": name, "messages": hi()})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            message = r.json()["error"]["message"]
            assert len(message) < 200 and name[:50] in message  # echoed, cut short
    metrics = gw.metrics()
    assert "bogus-" not in metrics and 'model="unknown"' in metrics
    owner = gw.user("bogus-owner@example.com", admin=True)
    deadline = time.monotonic() + 10
    while True:  # the shipper stores the usage a moment later
        usage = owner.ok("GET", f"/v1/inference/keys/{key['id']}/usage")
        if usage["totals"]["requests"] >= 50 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert usage["totals"]["requests"] == 50 and {p["model"] for p in usage["data"]} == {"unknown"}
    activity = owner.ok("GET", f"/v1/inference/keys/{key['id']}/activity")["data"]
    assert {a["model"] for a in activity} == {"unknown"}
