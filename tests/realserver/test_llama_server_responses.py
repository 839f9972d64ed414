"""``POST /v1/responses`` against a real llama.cpp ``llama-server`` (conftest.py), which serves the
Responses API by turning the request into a chat request: first what llama-server itself does, then the
gateway in front of it (the two gateways of test_llama_server.py: byte bound and tokenizer), called with
the official ``openai`` SDK. What the client is told it used is what llama-server reported, streamed and
not; with the tokenizer in the catalog the gateway reserves llama-server's own prompt count; a budget is
spent exactly, a stream cut off where it ends.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import httpx
import openai
import orjson
import pytest
from openai import OpenAI
from openai.types.responses import Response

from quotagate.gateway.responses.parsing import parse_responses
from tests.realserver.conftest import MODEL_ALIAS, LlamaServer
from tests.realserver.model import CONTEXT_LENGTH
from tests.realserver.test_llama_server import WEATHER_TOOL, Site, prompt_of_length, site

__all__ = ["site"]  # the gateways in front of llama-server, a fixture of test_llama_server.py

# Greedy with a fixed seed (test_llama_server.SAMPLING); the SDK's responses.create takes no seed of its own.
SAMPLING: dict[str, Any] = {"temperature": 0, "extra_body": {"seed": 7}}
FLAT_WEATHER_TOOL = {"type": "function", **WEATHER_TOOL["function"]}  # type: ignore[dict-item]

# Requests in the Responses shapes clients send: a string input; instructions; message items (an
# assistant's earlier turn too); flat function tools; a tool call and its output as items.
REQUESTS: dict[str, dict[str, Any]] = {
    "plain": {"input": "Hello! How are you today?"},
    "instructions": {"instructions": "You are terse.", "input": "The weather in Paris, please."},
    "items": {"input": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi there"}]},
        {"type": "message", "role": "assistant", "content": "Hello. What do you need?"},
        {"role": "user", "content": "The weather in Paris, please."}]},
    "tools": {"input": "What is the weather in Paris?", "tools": [FLAT_WEATHER_TOOL]},
    "tool-round-trip": {"tools": [FLAT_WEATHER_TOOL], "input": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": '{"temp_c": 21}'},
        {"role": "user", "content": "And in Berlin?"}]},
}


def direct(server: LlamaServer, **body: Any) -> dict[str, Any]:
    """A non-streamed response straight from llama-server."""
    r = httpx.post(f"{server.url}/v1/responses", json={"model": MODEL_ALIAS, "temperature": 0, "seed": 7, **body},
                   timeout=120)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def text_of(response: dict[str, Any]) -> str:
    return "".join(part["text"] for item in response["output"] if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")


def respond(client: OpenAI, **body: Any) -> Response:
    return cast(Response, client.responses.create(**{"model": MODEL_ALIAS, **SAMPLING, **body}))


def respond_streamed(client: OpenAI, **body: Any) -> list[Any]:
    """A streamed call with the SDK: all its events."""
    return list(client.responses.create(**{"model": MODEL_ALIAS, **SAMPLING, **body, "stream": True}))


def usage_of(response: Any) -> tuple[int, int]:
    usage = response.usage
    assert usage is not None
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    return usage.input_tokens, usage.output_tokens


# -- llama-server itself ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(REQUESTS))
def test_llama_server_counts_a_response_as_the_chat_request_it_becomes(llama_server: LlamaServer,
                                                                      name: str) -> None:
    """The prompt of a Responses request is the chat template rendered with the chat request it is turned
    into (gateway/responses/prompt.py): llama-server's input_tokens equal its prompt_tokens for that chat
    request, and the tokenizer's count of the rendered template."""
    from quotagate.gateway.responses.prompt import as_chat
    model = llama_server.model
    chat = as_chat({"model": MODEL_ALIAS, **REQUESTS[name]})
    assert chat is not None
    messages = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(
        c["function"]["arguments"])}} for c in m["tool_calls"]]} if m.get("tool_calls") else m
        for m in chat["messages"]]
    expected = model.count(model.render(messages, chat.get("tools")))
    usage = direct(llama_server, **REQUESTS[name], max_output_tokens=3)["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (expected, 3)


def test_llama_servers_events_are_not_numbered(llama_server: LlamaServer) -> None:
    """llama-server's stream events carry no sequence_number, and no output_index or content_index, which
    the SDKs' stream helpers need to put the output together (the openai SDK's ``responses.stream`` fails
    on them): the gateway numbers them (test_gateway_numbers_llama_servers_events)."""
    events = []
    with httpx.stream("POST", f"{llama_server.url}/v1/responses", timeout=120, json={
            "model": MODEL_ALIAS, "input": "Hi", "max_output_tokens": 3, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line.removeprefix("data: ")))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert not any("sequence_number" in e or "output_index" in e or "content_index" in e for e in events)


# -- the gateway in front of it ------------------------------------------------------------------------


def test_gateway_numbers_llama_servers_events(site: Site, llama_server: LlamaServer) -> None:
    """Through the gateway the SDK's ``responses.stream`` helper puts llama-server's stream together: the
    events are numbered in order, each item event has its item's index, each part event its part's."""
    client, _ = site.key(token_limit=1_000_000, token_limit_period="month")
    reply = direct(llama_server, **REQUESTS["instructions"], max_output_tokens=12)
    with client.responses.stream(model=MODEL_ALIAS, max_output_tokens=12, **SAMPLING,
                                 **REQUESTS["instructions"]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == text_of(reply)
    assert usage_of(final) == (reply["usage"]["input_tokens"], 12)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas and {(e.output_index, e.content_index) for e in deltas} == {(0, 0)}
    assert deltas[-1].snapshot == text_of(reply)  # the helper's running text


def test_gateway_reports_llama_servers_usage(site: Site, llama_server: LlamaServer) -> None:
    """Non-streamed and streamed, for every request shape: the client gets llama-server's text and usage
    for the same request, and the key's usage adds up to it."""
    client, key_id = site.key(token_limit=1_000_000, token_limit_period="month")
    seen = []
    for name, body in REQUESTS.items():
        reply = direct(llama_server, **body, max_output_tokens=20)
        want = (reply["usage"]["input_tokens"], reply["usage"]["output_tokens"])
        assert want[1] == 20, name

        answer = respond(client, max_output_tokens=20, **body)
        assert usage_of(answer) == want, name
        assert answer.output_text == text_of(reply)

        events = respond_streamed(client, max_output_tokens=20, **body)
        assert events[-1].type == "response.completed"
        assert usage_of(events[-1].response) == want, name
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text_of(reply)
        seen += [want, want]
    got = site.totals(key_id)
    assert (got["requests"], got["prompt_tokens"], got["completion_tokens"]) == (
        len(seen), sum(p for p, _ in seen), sum(c for _, c in seen))


@pytest.mark.parametrize("name", list(REQUESTS))
def test_gateway_reserves_the_prompt(site: Site, llama_server: LlamaServer, name: str) -> None:
    """What a request reserves for its prompt is llama-server's count exactly with the tokenizer in the
    catalog, and at least that without."""
    real = direct(llama_server, **REQUESTS[name], max_output_tokens=1)["usage"]["input_tokens"]
    budget = 100_000
    client, _ = site.key(token_limit=budget, token_limit_period="month")
    raw = client.responses.with_raw_response.create(model=MODEL_ALIAS, max_output_tokens=3, **SAMPLING,
                                                    **REQUESTS[name])
    answer = raw.parse()
    reserved = budget - int(raw.headers["x-ratelimit-remaining-tokens"]) - 3
    assert usage_of(answer) == (real, 3)
    assert reserved == real if site.exact else reserved >= real


def test_gateway_lowers_max_output_tokens_to_the_budget(site: Site, llama_server: LlamaServer) -> None:
    """A budget too small for the max_output_tokens asked: it is lowered to the 11 tokens the budget has
    after the prompt's reservation (llama-server's count with the tokenizer, the byte bound without), and
    the response is llama-server's own reply for 11 tokens, charged exactly that."""
    body = {"model": MODEL_ALIAS, "input": REQUESTS["plain"]["input"], "max_output_tokens": 300, "temperature": 0,
            "seed": 7}
    reserved = 24 if site.exact else parse_responses(orjson.dumps(body)).prompt_bound
    budget = reserved + 11
    client, key_id = site.key(token_limit=budget, token_limit_period="month")
    answer = respond(client, input=REQUESTS["plain"]["input"], max_output_tokens=300)
    prompt, charged = usage_of(answer)
    assert (prompt, charged) == (24, 11)
    reply = direct(llama_server, input=REQUESTS["plain"]["input"], max_output_tokens=charged)
    assert answer.output_text == text_of(reply)
    assert site.totals(key_id)["total_tokens"] == 24 + charged


def test_gateway_spends_a_budget_exactly_with_no_max_output_tokens(site: Site) -> None:
    """No max_output_tokens on a budget of the prompt and 40 tokens: non-streamed, the 40 are reserved up
    front and sent as max_output_tokens; streamed, they are reserved as llama-server generates and the
    stream is cut off where the budget ends, with a response.incomplete. Charged exactly the budget."""
    if not site.exact:
        pytest.skip("the byte bound of this prompt is more than the whole 64-token budget")
    for stream in (False, True):
        client, key_id = site.key(token_limit=24 + 40, token_limit_period="month")
        if stream:
            events = respond_streamed(client, input=REQUESTS["plain"]["input"])
            last = events[-1]
            assert last.type == "response.incomplete"
            assert last.response.incomplete_details.reason == "max_output_tokens"
            usage = usage_of(last.response)
        else:
            usage = usage_of(respond(client, input=REQUESTS["plain"]["input"]))
        assert usage == (24, 40)
        assert site.totals(key_id)["total_tokens"] == 64
        with pytest.raises(openai.RateLimitError) as refused:  # and nothing is left
            respond(client, input=REQUESTS["plain"]["input"])
        assert refused.value.code == "token_limit_exceeded" and "used up" in refused.value.message


def test_gateway_refuses_a_context_overflow_uncharged(site: Site, llama_server: LlamaServer) -> None:
    """A prompt of the context's length is a 400 context_length_exceeded (the gateway's own with the
    tokenizer, llama-server's passed on without), charged nothing."""
    client, key_id = site.key(token_limit=1_000_000, token_limit_period="month")
    content = prompt_of_length(llama_server.model, CONTEXT_LENGTH)[0]["content"]
    with pytest.raises(openai.BadRequestError) as refused:
        respond(client, input=content, max_output_tokens=5)
    assert refused.value.code == "context_length_exceeded"
    assert f"{CONTEXT_LENGTH} tokens" in refused.value.message
    got = site.totals(key_id)
    assert (got["prompt_tokens"], got["completion_tokens"]) == (0, 0)


def test_gateway_refuses_what_llama_server_cannot_do_either(site: Site) -> None:
    """previous_response_id is refused by the gateway before anything is reserved (llama-server refuses it
    too, but only the gateway says what to do instead)."""
    client, key_id = site.key(token_limit=1_000_000, token_limit_period="month")
    with pytest.raises(openai.BadRequestError) as refused:
        respond(client, input="Hi", previous_response_id="resp_1")
    assert refused.value.param == "previous_response_id"
    got = site.totals(key_id)
    assert (got["requests"], got["prompt_tokens"], got["completion_tokens"]) == (1, 0, 0)


def test_gateway_never_overspends_a_budget_under_concurrent_responses(site: Site, llama_server: LlamaServer) -> None:
    """Waves of 40 simultaneous requests, half streamed, against a budget of 1,000 tokens: never more is
    charged, each client is told llama-server's prompt count and at most its 20 output tokens (fewer where
    the budget's end cut it short), the key's usage adds up to what the clients were told, and the waves
    end only when not even one more request's prompt fits."""
    budget = 1_000
    client, key_id = site.key(token_limit=budget, token_limit_period="month")
    body = {"model": MODEL_ALIAS, "input": REQUESTS["plain"]["input"], "max_output_tokens": 20, "temperature": 0,
            "seed": 7}
    reserve = 24 if site.exact else parse_responses(orjson.dumps({**body, "stream": True})).prompt_bound

    async def waves() -> tuple[int, int]:
        sdk = openai.AsyncOpenAI(base_url=site.gateway.llm_url, api_key=client.api_key, max_retries=0, timeout=120)

        async def one(i: int) -> tuple[int, int] | None:
            try:
                if i % 2:
                    events = [e async for e in await sdk.responses.create(
                        model=MODEL_ALIAS, input=body["input"], max_output_tokens=20, temperature=0,
                        extra_body={"seed": 7}, stream=True)]
                    assert events[-1].type in ("response.completed", "response.incomplete")
                    return usage_of(events[-1].response)
                return usage_of(await sdk.responses.create(model=MODEL_ALIAS, input=body["input"],
                                                           max_output_tokens=20, temperature=0,
                                                           extra_body={"seed": 7}))
            except openai.RateLimitError as exc:
                assert exc.code == "token_limit_exceeded"
                return None

        charged = served = 0
        for _ in range(30):
            wave = [u for u in await asyncio.gather(*(one(i) for i in range(40))) if u is not None]
            for prompt, output in wave:
                assert prompt == 24 and 0 < output <= 20
            charged += sum(p + c for p, c in wave)
            served += len(wave)
            if not wave:
                break
        await sdk.close()
        return charged, served

    charged, served = asyncio.run(waves())
    assert budget - reserve - 1 < charged <= budget
    got = site.totals(key_id)
    assert got["total_tokens"] == charged
    assert got["requests"] > served  # the refusals are counted too
