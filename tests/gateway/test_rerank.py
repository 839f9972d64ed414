"""``/v1/rerank`` (Cohere/Jina shape) and ``/v1/score`` (vLLM's): prompt tokens only, one prompt per
(query, document) pair, metered and limited like embeddings, behind ``allowed_models``. And the catalog's
``upstream_model`` (the name the model servers know a model by) and ``created``."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest

from quotagate.gateway.parsing import parse_rerank
from tests.fakes.upstream import FakeUpstream
from tests.gateway.conftest import Mint
from tests.gateway.helpers import budget_remaining, hi, raw, sdk
from tests.support import Gateway

DOCS = ["Paris is the capital of France.", "Berlin is in Germany.", "Bananas are yellow."]


def test_rerank_is_forwarded_and_charged_what_the_server_reports(gw: Gateway, mint: Mint,
                                                                  upstream: FakeUpstream) -> None:
    secret, _ = mint(token_limit=10_000, token_limit_period="day")
    body = {"model": "rerank", "query": "capital of France", "documents": DOCS, "top_n": 2,
            "return_documents": True}
    with raw(gw, secret) as client:
        r = client.post("/rerank", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert [x["index"] for x in answer["results"]] == [0, 1]
    assert answer["results"][0]["document"] == {"text": DOCS[0]}
    # vLLM's rerank usage has only total_tokens: it is all prompt, charged and passed on as it is.
    tokens = sum(max(1, (len(body["query"]) + len(d)) // 2) for d in DOCS)
    assert answer["usage"] == {"total_tokens": tokens}
    assert upstream.requests[-1] == body
    assert budget_remaining(gw, secret) == 10_000 - tokens


def test_score_is_forwarded_and_charged(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(token_limit=10_000, token_limit_period="day")
    with raw(gw, secret) as client:
        r = client.post("/score", json={"model": "rerank", "text_1": "capital of France", "text_2": DOCS})
    assert r.status_code == 200, r.text
    assert [d["index"] for d in r.json()["data"]] == [0, 1, 2]
    tokens = r.json()["usage"]["prompt_tokens"]
    assert tokens > 0 and budget_remaining(gw, secret) == 10_000 - tokens


def test_rerank_reserves_every_pair(gw: Gateway, mint: Mint) -> None:
    # The budget holds the bound of two documents' pairs, not three: refused as one that never fits.
    two = parse_rerank(orjson.dumps({"model": "rerank", "query": "q", "documents": DOCS[:2]})).prompt_bound
    secret, _ = mint(token_limit=two, token_limit_period="day")
    with raw(gw, secret) as client:
        r = client.post("/rerank", json={"model": "rerank", "query": "q", "documents": DOCS})
        assert r.status_code == 429 and r.json()["error"]["code"] == "token_limit_exceeded"
        assert client.post("/rerank", json={"model": "rerank", "query": "q", "documents": DOCS[:2]}).status_code == 200


def test_concurrent_reranks_never_overspend_a_budget(gw: Gateway, mint: Mint) -> None:
    limit = 1_000
    secret, _ = mint(token_limit=limit, token_limit_period="day")

    async def go() -> tuple[int, int]:
        async with httpx.AsyncClient(base_url=gw.llm_url, headers={"Authorization": f"Bearer {secret}"},
                                     timeout=60) as client:
            async def one(i: int) -> httpx.Response:
                if i % 2:
                    return await client.post("/score", json={"model": "rerank", "text_1": "q", "text_2": DOCS})
                return await client.post("/rerank", json={"model": "rerank", "query": "q", "documents": DOCS})

            answers = await asyncio.gather(*(one(i) for i in range(200)))
        assert {a.status_code for a in answers} == {200, 429}
        ok = [a.json()["usage"]["total_tokens"] for a in answers if a.status_code == 200]
        return sum(ok), len(ok)

    charged, served = asyncio.run(go())
    assert charged <= limit and served > 0
    assert budget_remaining(gw, secret) == limit - charged


def test_rerank_limits_and_models(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(rpm=2, allowed_models=["rerank", "chat"])
    with raw(gw, secret) as client:
        assert client.post("/rerank", json={"model": "chat", "query": "q", "documents": DOCS}).status_code == 400
        assert client.post("/rerank", json={"model": "embed", "query": "q", "documents": DOCS}).status_code == 403
        assert client.post("/rerank", json={"model": "rerank", "query": "q", "documents": DOCS}).status_code == 429
    other, _ = mint()
    with raw(gw, other) as client:
        r = client.post("/chat/completions", json={"model": "rerank", "messages": hi()})
        assert r.status_code == 400 and "rerank model" in r.json()["error"]["message"]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/rerank", {"model": "rerank", "documents": DOCS}, "query"),
    ("/rerank", {"model": "rerank", "query": "q"}, "documents"),
    ("/rerank", {"model": "rerank", "query": "q", "documents": []}, "documents"),
    ("/rerank", {"model": "rerank", "query": "q", "documents": ["a", 3]}, "documents[1]"),
    ("/rerank", {"model": "rerank", "query": "q", "documents": DOCS, "top_n": 0}, "top_n"),
    ("/rerank", {"model": "rerank", "query": "q", "documents": DOCS, "return_documents": "yes"}, "return_documents"),
    ("/score", {"model": "rerank", "text_1": "q"}, "text_2"),
    ("/score", {"model": "rerank", "text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_2"),
    ("/score", {"model": "rerank", "text_1": [], "text_2": "x"}, "text_1"),
])
def test_bad_rerank_and_score_bodies_are_refused(gw: Gateway, mint: Mint, path: str, body: dict[str, Any],
                                                 param: str) -> None:
    secret, _ = mint()
    with raw(gw, secret) as client:
        r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_upstream_model_is_the_name_sent_upstream(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    secret, _ = mint(allowed_models=["mapped"])
    client = sdk(gw, secret)
    answer = client.chat.completions.create(model="mapped", messages=hi(), max_tokens=2)
    assert upstream.requests[-1]["model"] == "Org/Mapped-Model-7B"
    assert answer.choices[0].message.content == " tok" * 2
    chunks = list(client.completions.create(model="mapped", prompt="x", max_tokens=2, stream=True))
    assert upstream.requests[-1]["model"] == "Org/Mapped-Model-7B" and chunks
    # Clients name the public id, and only it: the upstream's name is not a model of the catalog.
    with raw(gw, secret) as http:
        r = http.post("/chat/completions", json={"model": "Org/Mapped-Model-7B", "messages": hi()})
    assert r.status_code == 404


def test_models_list_has_the_catalogs_created_time_and_a_trailing_slash_works(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(allowed_models=["mapped", "chat"])
    with raw(gw, secret) as client:
        listed = client.get("/models/")
        assert listed.status_code == 200
        by_id = {m["id"]: m for m in listed.json()["data"]}
    assert set(by_id) == {"mapped", "chat"}
    assert by_id["mapped"]["created"] == int(datetime(2026, 11, 30, 12, tzinfo=UTC).timestamp())
    assert by_id["chat"]["created"] > 1_700_000_000  # the config file's time
