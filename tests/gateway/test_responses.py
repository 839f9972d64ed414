"""``POST /v1/responses`` through the gateway, with the official ``openai`` SDK (``responses.create``,
streamed and not, and the ``responses.stream`` helper) against the fake upstream's vLLM-like Responses
endpoint: usage charged as reported (with cached and reasoning details), ``max_output_tokens`` rewritten
to the grant, streams cut off honestly where the budget ends, stateful requests refused, every key limit
applied, and hundreds of simultaneous requests never overspending a budget."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import openai
import orjson
import pytest

from quotagate.gateway.responses.parsing import parse_responses
from tests.fakes.upstream import FakeUpstream
from tests.gateway.conftest import Mint
from tests.gateway.helpers import async_sdk, budget_remaining, raw, sdk
from tests.support import Console, Gateway


def bound(**body: Any) -> int:
    """The prompt bound the gateway reserves for this body (no tokenizer in this catalog)."""
    return parse_responses(orjson.dumps({"model": "chat", **body})).prompt_bound


def activity(admin: Console, key_id: str) -> list[dict[str, Any]]:
    """The key's requests but model listings (budget_remaining makes those), newest first."""
    rows = admin.ok("GET", f"/v1/inference/keys/{key_id}/activity")["data"]
    return [r for r in rows if r["endpoint"] != "models"]


def test_non_streamed_usage_is_the_servers_with_its_details(gw: Gateway, mint: Mint, admin: Console,
                                                            upstream: FakeUpstream) -> None:
    secret, key = mint(token_limit=100_000, token_limit_period="day")
    r = sdk(gw, secret).responses.create(model="chat", input="hello there", instructions="Be brief.",
                                         max_output_tokens=7,
                                         extra_body={"fake": {"tokens": 5, "reasoning": 2, "cached": 3}})
    assert r.status == "completed"
    assert r.output_text == " tok" * 5
    assert r.usage is not None
    prompt = (len("hello there") + len("Be brief.")) // 2
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (prompt, 7, prompt + 7)
    assert r.usage.input_tokens_details.cached_tokens == 3
    assert r.usage.output_tokens_details.reasoning_tokens == 2
    sent = upstream.responses_requests()[-1]
    # The gateway keeps no responses: store is forwarded as false; the length says the client's 7.
    assert sent["store"] is False and sent["max_output_tokens"] == 7
    assert budget_remaining(gw, secret) == 100_000 - prompt - 7
    row = activity(admin, key["id"])[0]
    assert (row["endpoint"], row["status_code"], row["stream"]) == ("responses", 200, False)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, 7)


def test_streamed_with_create_and_with_the_stream_helper(gw: Gateway, mint: Mint, admin: Console) -> None:
    secret, key = mint(token_limit=100_000, token_limit_period="day")
    client = sdk(gw, secret)
    events = list(client.responses.create(model="chat", input="hello", stream=True,
                                          extra_body={"fake": {"tokens": 6}}))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 6
    final = events[-1].response  # type: ignore[union-attr]
    assert final.usage is not None and (final.usage.input_tokens, final.usage.output_tokens) == (2, 6)
    with client.responses.stream(model="chat", input="hello", extra_body={"fake": {"tokens": 4}}) as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        done = stream.get_final_response()
    assert "".join(texts) == done.output_text == " tok" * 4
    assert done.usage is not None and (done.usage.input_tokens, done.usage.output_tokens) == (2, 4)
    assert budget_remaining(gw, secret) == 100_000 - 8 - 6
    rows = activity(admin, key["id"])
    assert [(r["endpoint"], r["stream"], r["completion_tokens"]) for r in rows] == [
        ("responses", True, 4), ("responses", True, 6)]


def test_streamed_tool_call_and_reasoning_deltas_are_counted(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(token_limit=100_000, token_limit_period="day")
    events = list(sdk(gw, secret).responses.create(
        model="chat", input="weather?", stream=True, tools=[{"type": "function", "name": "lookup", "parameters": {}}],
        extra_body={"fake": {"tokens": 5, "reasoning": 3, "tool_call": True, "no_usage": True}}))
    kinds = [e.type for e in events]
    assert kinds.count("response.function_call_arguments.delta") == 5
    assert kinds.count("response.reasoning_text.delta") == 3
    # No usage from the server: charged its prompt bound and the deltas relayed, and told so.
    usage = events[-1].response.usage  # type: ignore[union-attr]
    assert usage is not None and usage.output_tokens == 8
    assert usage.input_tokens == bound(input="weather?", stream=True,
                                       tools=[{"type": "function", "name": "lookup", "parameters": {}}],
                                       fake={"tokens": 5, "reasoning": 3, "tool_call": True, "no_usage": True})


def test_max_output_tokens_is_rewritten_to_the_grant(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    body = {"input": "hello", "fake": {"tokens": 500}}
    prompt = bound(**body)
    secret, _ = mint(token_limit=prompt + 30, token_limit_period="day")
    r = sdk(gw, secret).responses.create(model="chat", input="hello", max_output_tokens=100,
                                         extra_body={"fake": {"tokens": 500}, "max_tokens": 200, "n_predict": 300})
    sent = upstream.responses_requests()[-1]
    # Every length field a server may read says the grant: llama-server reads chat's too.
    assert (sent["max_output_tokens"], sent["max_tokens"], sent["n_predict"]) == (30, 30, 30)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.usage is not None and r.usage.output_tokens == 30
    # No length of the client's own, non-streamed: one is added, the grant.
    secret, _ = mint(token_limit=prompt + 12, token_limit_period="day")
    sdk(gw, secret).responses.create(model="chat", input="hello", extra_body={"fake": {"tokens": 500}})
    assert upstream.responses_requests()[-1]["max_output_tokens"] == 12


def test_a_stream_is_cut_off_where_the_budget_ends(gw: Gateway, mint: Mint) -> None:
    body = {"input": "hello", "stream": True, "fake": {"tokens": 200}}
    prompt = bound(**body)
    secret, _ = mint(token_limit=prompt + 40, token_limit_period="day")
    with sdk(gw, secret).responses.stream(model="chat", input="hello",
                                          extra_body={"fake": {"tokens": 200}}) as stream:
        events = list(stream)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == 40
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details is not None
    assert last.response.incomplete_details.reason == "max_output_tokens"
    usage = last.response.usage
    assert usage is not None and (usage.input_tokens, usage.output_tokens) == (prompt, 40)
    # The output relayed so far comes with it.
    assert last.response.output[0].content[0].text == " tok" * 40  # type: ignore[union-attr]
    assert budget_remaining(gw, secret) == 0


def test_a_server_over_reporting_is_charged_the_reservation(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(token_limit=100_000, token_limit_period="day")
    lie = {"input_tokens": 5_000, "output_tokens": 9_000, "total_tokens": 14_000}
    r = sdk(gw, secret).responses.create(model="chat", input="hello", max_output_tokens=5,
                                         extra_body={"fake": {"tokens": 5, "usage": lie}})
    prompt = bound(input="hello", max_output_tokens=5, fake={"tokens": 5, "usage": lie})
    assert r.usage is not None and (r.usage.input_tokens, r.usage.output_tokens) == (prompt, 5)
    assert budget_remaining(gw, secret) == 100_000 - prompt - 5


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "hi", "conversation": "conv_1"}, "conversation"),
    ({"input": "hi", "store": True}, "store"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": "hi", "prompt": {"id": "pmpt_1"}}, "prompt"),
    ({}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": "5"}, "max_output_tokens"),
    ({"input": "hi", "stream": "yes"}, "stream"),
    ({"input": "hi", "tools": [{"name": "f"}]}, "tools[0]"),
    ({"input": "hi", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f"}, {"type": "web_search_preview"}]}, "tools[1].type"),
    ({"input": "hi", "tools": [{"type": "mcp", "server_label": "x", "server_url": "http://x"}]}, "tools[0].type"),
    ({"input": "hi", "instructions": ["x"]}, "instructions"),
    ({"input": "hi", "n": 2}, "n"),
    ({"input": "hi", "chat_template": "{{ 'x' }}"}, "chat_template"),
])
def test_bad_or_stateful_bodies_are_refused_naming_the_param(gw: Gateway, mint: Mint, upstream: FakeUpstream,
                                                             body: dict[str, Any], param: str) -> None:
    secret, _ = mint()
    before = len(upstream.requests)
    with raw(gw, secret) as client:
        r = client.post("/responses", json={"model": "chat", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_request_error", param)
    assert len(upstream.requests) == before


def test_stateful_refusals_say_what_to_do_instead(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint()
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(gw, secret).responses.create(model="chat", input="hi", previous_response_id="resp_1")
    assert "send the whole conversation in 'input'" in refused.value.message


def test_upstream_errors_reach_the_client_uncharged(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(token_limit=10_000, token_limit_period="day")
    client = sdk(gw, secret)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="chat", input="hi", extra_body={"fake": {"status": 400, "error_body": {
            "error": {"message": "This model's maximum context length is 2048 tokens", "type": "BadRequestError",
                      "code": 400}}}})
    assert refused.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        list(client.responses.create(model="chat", input="hi", stream=True, extra_body={"fake": {
            "stream_error": {"error": {"message": "bad input", "type": "invalid_request_error", "code": 400}}}}))
    assert budget_remaining(gw, secret) == 10_000


def test_a_stream_breaking_off_ends_with_an_error_event_and_is_charged(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(token_limit=10_000, token_limit_period="day")
    seen = []
    with pytest.raises(openai.APIError):
        for event in sdk(gw, secret).responses.create(model="chat", input="hi", stream=True,
                                                      extra_body={"fake": {"tokens": 20, "die_after": 4}}):
            seen.append(event.type)
    assert seen.count("response.output_text.delta") == 4
    prompt = bound(input="hi", stream=True, fake={"tokens": 20, "die_after": 4})
    assert budget_remaining(gw, secret) == 10_000 - prompt - 4


def test_client_disconnecting_is_metered(gw: Gateway, mint: Mint, admin: Console) -> None:
    secret, key = mint(token_limit=100_000, token_limit_period="day")
    with raw(gw, secret) as client, client.stream("POST", "/responses", json={
            "model": "chat", "input": "hi", "stream": True, "fake": {"tokens": 500, "token_delay": 0.01}}) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("event: response.output_text.delta"):
                seen += 1
            if seen == 5:
                break
    deadline = time.monotonic() + 10
    while not (rows := activity(admin, key["id"])) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rows[0]["error_code"] == "client_disconnected" and rows[0]["endpoint"] == "responses"
    assert 5 <= rows[0]["completion_tokens"] < 200
    assert budget_remaining(gw, secret) == 100_000 - rows[0]["prompt_tokens"] - rows[0]["completion_tokens"]


def test_every_key_limit_refuses_responses(gw: Gateway, mint: Mint, admin: Console, upstream: FakeUpstream) -> None:
    def ask(secret: str, model: str = "chat") -> Any:
        with raw(gw, secret) as client:
            return client.post("/responses", json={"model": model, "input": "hi", "max_output_tokens": 5})

    before = len(upstream.responses_requests())
    secret, _ = mint(rpm=2)
    assert [ask(secret).status_code for _ in range(3)] == [200, 200, 429]
    secret, _ = mint(tpm=bound(input="hi", max_output_tokens=5) + 5)
    first, second = ask(secret), ask(secret)
    assert (first.status_code, second.status_code) == (200, 429)
    assert second.json()["error"]["code"] == "rate_limit_exceeded"
    secret, _ = mint(token_limit=bound(input="hi", max_output_tokens=5) + 5, token_limit_period="month")
    first, second = ask(secret), ask(secret)
    assert (first.status_code, second.status_code) == (200, 429)
    assert second.json()["error"]["code"] == "token_limit_exceeded"
    secret, _ = mint(allowed_models=["chat-b"])
    assert (ask(secret).status_code, ask(secret, "chat-b").status_code, ask(secret, "nope").status_code) == (403, 200,
                                                                                                             404)
    assert ask(secret, "embed").status_code == 403
    secret, key = mint()
    assert ask(secret).status_code == 200
    admin.ok("DELETE", f"/v1/inference/keys/{key['id']}")
    revoked = ask(secret)
    assert (revoked.status_code, revoked.json()["error"]["code"]) == (401, "key_revoked")
    expires = datetime.now(UTC) + timedelta(seconds=2)
    secret, _ = mint(expires_at=expires.isoformat())
    assert ask(secret).status_code == 200
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.2)
    expired = ask(secret)
    assert (expired.status_code, expired.json()["error"]["code"]) == (401, "key_expired")
    # Refused requests never reached the model server: 2 + 1 + 1 + 1 (chat-b) + 1 + 1 admitted.
    assert len(upstream.responses_requests()) - before == 7


def test_embedding_models_cannot_serve_responses(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint()
    with raw(gw, secret) as client:
        r = client.post("/responses", json={"model": "embed", "input": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_hundreds_of_simultaneous_requests_never_overspend_a_budget(gw: Gateway, mint: Mint) -> None:
    limit = 3_000
    secret, _ = mint(token_limit=limit, token_limit_period="day")

    async def go() -> tuple[int, int]:
        client = async_sdk(gw, secret)

        async def streamed() -> int:
            usage = None
            async for event in await client.responses.create(model="chat", input="hi", stream=True,
                                                             extra_body={"fake": {"tokens": 30}}):
                if event.type in ("response.completed", "response.incomplete"):
                    usage = event.response.usage
            assert usage is not None
            return usage.total_tokens

        async def plain() -> int:
            r = await client.responses.create(model="chat", input="hi", max_output_tokens=30,
                                              extra_body={"fake": {"tokens": 30}})
            assert r.usage is not None
            return r.usage.total_tokens

        results = await asyncio.gather(*([streamed() for _ in range(150)] + [plain() for _ in range(150)]),
                                       return_exceptions=True)
        await client.close()
        refused = [r for r in results if isinstance(r, BaseException)]
        for r in refused:
            assert isinstance(r, openai.RateLimitError) and r.code == "token_limit_exceeded", repr(r)
        return sum(r for r in results if isinstance(r, int)), len(refused)

    charged, refused = asyncio.run(go())
    assert charged <= limit
    assert refused, "300 requests of ~100 tokens must run into a 3,000-token budget"
    assert budget_remaining(gw, secret) == limit - charged


def test_the_body_policy_is_chats(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    """A repeated key is a 400 (servers differ on which value counts); a field the gateway does not know
    counts into the prompt bound (a server may put it into the prompt), and is forwarded."""
    secret, _ = mint(token_limit=100_000, token_limit_period="day")
    before = len(upstream.requests)
    with raw(gw, secret) as client:
        r = client.post("/responses", content=b'{"model": "chat", "input": "hi", "max_output_tokens": 1, '
                                              b'"max_output_tokens": 500}')
        assert r.status_code == 400 and "repeats a key" in r.json()["error"]["message"]
        assert len(upstream.requests) == before
        documents = [{"title": "a", "text": "x" * 300}]
        assert bound(input="hi", documents=documents) >= bound(input="hi") + 300
        r = client.post("/responses", json={"model": "chat", "input": "hi", "documents": documents,
                                            "fake": {"no_usage": True, "tokens": 1}})
    assert r.status_code == 200
    assert r.json()["usage"]["input_tokens"] == bound(input="hi", documents=documents,
                                                      fake={"no_usage": True, "tokens": 1})
    assert upstream.responses_requests()[-1]["documents"] == documents


def test_the_upstream_model_name_and_processing_time(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    """A catalog entry's upstream_model is the name sent upstream; the client keeps the public id. Both
    answers carry openai-processing-ms, as chat's do."""
    secret, _ = mint()
    with raw(gw, secret) as client:
        r = client.post("/responses", json={"model": "mapped", "input": "hi"})
        assert r.status_code == 200 and int(r.headers["openai-processing-ms"]) >= 0
        assert upstream.responses_requests()[-1]["model"] == "Org/Mapped-Model-7B"
        with client.stream("POST", "/responses", json={"model": "mapped", "input": "hi", "stream": True}) as s:
            assert s.status_code == 200 and int(s.headers["openai-processing-ms"]) >= 0
            s.read()
    assert upstream.responses_requests()[-1]["model"] == "Org/Mapped-Model-7B"
