"""One body policy: what is forwarded is what was checked, and every length, choice count and prompt
source a server family reads is rewritten to the grant, counted, or refused (docs/gateway.md)."""

from __future__ import annotations

import json

import httpx
import orjson

from quotagate.gateway.parsing import parse_chat
from tests.fakes.upstream import FakeUpstream
from tests.gateway.conftest import Mint
from tests.gateway.helpers import budget_remaining, hi, raw, sdk
from tests.support import Gateway


def _post(gw: Gateway, secret: str, body: bytes) -> httpx.Response:
    with raw(gw, secret) as client:
        return client.post("/chat/completions", content=body, headers={"Content-Type": "application/json"})


def test_max_completion_tokens_beside_max_tokens_cannot_widen_the_grant(gw: Gateway, mint: Mint,
                                                                        upstream: FakeUpstream) -> None:
    secret, _ = mint(token_limit=5_000, token_limit_period="day")
    r = sdk(gw, secret).chat.completions.create(model="chat", messages=hi(), max_tokens=1,
                                                extra_body={"max_completion_tokens": 2000,
                                                            "fake": {"tokens": 2000}})
    sent = upstream.chat_requests()[-1]
    # The server obeys max_completion_tokens: it must say what was granted, like max_tokens.
    assert sent["max_tokens"] == 1 and sent["max_completion_tokens"] == 1
    assert r.choices[0].message.content == " tok"  # one token generated, one charged
    assert r.usage is not None and r.usage.completion_tokens == 1


def test_n_predict_is_a_length_and_is_rewritten(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    secret, _ = mint(token_limit=5_000, token_limit_period="day")
    r = sdk(gw, secret).chat.completions.create(model="chat", messages=hi(), max_tokens=10,
                                                extra_body={"n_predict": 1200, "fake": {"tokens": 1200}})
    sent = upstream.chat_requests()[-1]
    assert sent["n_predict"] == 10 and sent["max_tokens"] == 10
    assert r.usage is not None and r.usage.completion_tokens == 10
    assert r.choices[0].message.content == " tok" * 10


def test_n_predict_alone_is_the_clients_length(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    secret, _ = mint(token_limit=5_000, token_limit_period="day")
    sdk(gw, secret).chat.completions.create(model="chat", messages=hi(), extra_body={"n_predict": 7})
    sent = upstream.chat_requests()[-1]
    assert sent["n_predict"] == 7 and "max_tokens" not in sent  # within the grant: left as the client sent it


def test_best_of_candidates_are_reserved_and_charged(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    limit = 1_000
    secret, _ = mint(token_limit=limit, token_limit_period="day")
    r = sdk(gw, secret).chat.completions.create(model="chat", messages=hi(), max_tokens=20,
                                                extra_body={"best_of": 4, "fake": {"tokens": 20}})
    assert upstream.chat_requests()[-1]["best_of"] == 4
    assert r.usage is not None and r.usage.completion_tokens == 80  # four candidates of 20, one returned
    assert budget_remaining(gw, secret) == limit - r.usage.total_tokens


def test_min_tokens_is_lowered_with_the_grant(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    bound = parse_chat(orjson.dumps({"model": "chat", "messages": hi(), "max_tokens": 50,
                                     "min_tokens": 50})).prompt_bound
    secret, _ = mint(token_limit=bound + 20, token_limit_period="day")
    sdk(gw, secret).chat.completions.create(model="chat", messages=hi(), max_tokens=50,
                                            extra_body={"min_tokens": 50})
    sent = upstream.chat_requests()[-1]
    assert sent["max_tokens"] == 20 and sent["min_tokens"] == 20


def test_min_tokens_above_the_length_is_a_400(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint()
    r = _post(gw, secret, orjson.dumps({"model": "chat", "messages": hi(), "max_tokens": 5, "min_tokens": 9}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"


def test_duplicate_keys_are_refused_and_never_forwarded(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    secret, _ = mint(allowed_models=["chat"])
    before = len(upstream.requests)
    bodies = [
        b'{"model": "chat", "model": "chat-b", "messages": [{"role": "user", "content": "hi"}]}',
        b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "max_tokens": 900}',
        b'{"model": "chat", "messages": [{"role": "user", "content": "hi", "content": "a much longer prompt"}]}',
        # A colon written as an escape must not hide a duplicate from the count of colons.
        b'{"model": "chat", "messages": [{"role": "user", "content": "a\\u003ab"}], "n": 1, "n": 3}',
    ]
    for body in bodies:
        r = _post(gw, secret, body)
        assert r.status_code == 400, body
        assert "repeats a key" in r.json()["error"]["message"]
    assert len(upstream.requests) == before


def test_no_false_duplicates(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint()
    body = {"model": "chat", "messages": [{"role": "user", "content": 'a: "b": {"c": 1}, \\": x\u003a'}],
            "metadata": {"a": "1:2", "b": {"a": ":"}}}
    for text in (json.dumps(body), json.dumps(body, indent=2), json.dumps(body, ensure_ascii=True),
                 orjson.dumps(body).decode()):
        r = _post(gw, secret, text.encode())
        assert r.status_code == 200, (text, r.text)
    r = _post(gw, secret, b'{"model": "chat", "messages": [{"role": "user", "content": "x\\u003ay"}]}')
    assert r.status_code == 200, r.text


def test_what_is_forwarded_is_what_was_parsed(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    secret, _ = mint()
    body = b'{ "model" : "chat",\n "messages": [ {"role": "user", "content": "hi"} ] }'
    assert _post(gw, secret, body).status_code == 200
    assert upstream.chat_requests()[-1] == {"model": "chat", "messages": hi()}


def test_a_chat_template_of_the_clients_own_is_refused(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    secret, _ = mint()
    before = len(upstream.requests)
    template = "{% for i in range(100000) %}x{% endfor %}"
    r = _post(gw, secret, orjson.dumps({"model": "chat", "messages": hi(), "chat_template": template}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"
    assert len(upstream.requests) == before


def test_documents_and_template_arguments_count_toward_the_prompt(gw: Gateway, mint: Mint,
                                                                  upstream: FakeUpstream) -> None:
    # vLLM renders documents and chat_template_kwargs into the prompt: 120,292 prompt tokens were once
    # charged as 78. They count now, so a budget too small for them refuses the request outright.
    secret, _ = mint(token_limit=2_000, token_limit_period="day")
    before = len(upstream.requests)
    documents = [{"title": f"doc {i}", "text": "lorem ipsum dolor sit amet " * 20} for i in range(10)]
    r = _post(gw, secret, orjson.dumps({"model": "chat", "messages": hi(), "max_tokens": 5,
                                        "documents": documents}))
    assert r.status_code == 429 and r.json()["error"]["code"] == "token_limit_exceeded"
    assert r.headers["x-should-retry"] == "false" and "never be admitted" in r.json()["error"]["message"]
    r = _post(gw, secret, orjson.dumps({"model": "chat", "messages": hi(), "max_tokens": 5,
                                        "chat_template_kwargs": {"system": "be brief " * 300}}))
    assert r.status_code == 429 and "never be admitted" in r.json()["error"]["message"]
    assert len(upstream.requests) == before
