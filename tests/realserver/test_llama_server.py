"""Token accounting against a real llama.cpp ``llama-server`` (conftest.py) loaded with a tiny model
made at test time (model.py).

First the harness itself: llama-server renders the chat template and counts prompt tokens exactly as
transformers + ``tokenizers`` do with the model's tokenizer.json, and how it counts completions and
treats the length fields, ``n``, and a prompt too long for its context. Then the gateway in front of
it, called with the official ``openai`` SDK: what the client is told it used is what llama-server
itself reported, and it is what the key's usage adds up to.

All requests are greedy (``temperature 0``) with a fixed seed, and the model never emits an
end-of-turn token (model.py), so every reply runs to its length limit and the same request gives the
same tokens every time (checked in ``test_replies_are_deterministic``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
from openai import OpenAI, Stream
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from tokenizers import Tokenizer

from tests.conftest import fresh_database
from tests.realserver.conftest import MODEL_ALIAS, LlamaServer
from tests.realserver.model import CONTEXT_LENGTH, TinyModel
from tests.support import Console, Gateway, start_gateway

SAMPLING = {"temperature": 0, "seed": 7}

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather",
    "description": "The weather in a city — “now”, in °C",  # non-ASCII: tojson must keep it as it is
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                   "required": ["city"]}}}

# Prompts that exercise the template and each class of the pre-tokenizer's regex.
CONVERSATIONS: dict[str, dict[str, Any]] = {
    "plain": {"messages": [{"role": "user", "content": "Hello! How are you today?"}]},
    "system-multi-turn": {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello. What do you need?"},
        {"role": "user", "content": "The weather in Paris, please."}]},
    "spaces-digits-unicode": {"messages": [{"role": "user", "content": "  Multiple   spaces\n\n\ttabs\t, café "
                                            "naïve 日本語 Привет 👋🙂 1234567 3.14 don't it's WE'RE\r\n  end  \n\n"}]},
    # Text spelling a control token IS that token, to llama-server (it parses special tokens in the
    # rendered prompt) and to tokenizers alike: the counts agree, and such a user message can close its
    # own turn. <tool_call> is an added, non-special token: one token either way.
    "control-token-text": {"messages": [{"role": "user", "content": "Say <|im_end|> and <tool_call> please"}]},
    "tools": {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": [WEATHER_TOOL]},
    "tool-round-trip": {"tools": [WEATHER_TOOL], "messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
        {"role": "user", "content": "And in Berlin?"}]},
}


def post(server: LlamaServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def chat(server: LlamaServer, **body: Any) -> dict[str, Any]:
    """A non-streamed chat completion straight from llama-server."""
    r = post(server, "/v1/chat/completions", {"model": MODEL_ALIAS, **SAMPLING, **body})
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def stream_chunks(server: LlamaServer, **body: Any) -> list[dict[str, Any]]:
    chunks = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=120,
                      json={"model": MODEL_ALIAS, **SAMPLING, **body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line.removeprefix("data: ")))
    return chunks


def ids(tok: Tokenizer, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False).ids)


def prompt_of_length(model: TinyModel, tokens: int) -> list[dict[str, Any]]:
    """A one-message conversation whose rendered prompt is exactly ``tokens`` long ("x" and "\\n" are
    one token each and never merge with each other)."""
    base = model.count(model.render([{"role": "user", "content": ""}]))
    content = "x\n" * ((tokens - base) // 2) + "x" * ((tokens - base) % 2)
    messages = [{"role": "user", "content": content}]
    assert model.count(model.render(messages)) == tokens
    return messages


# -- the harness: llama-server agrees with transformers + tokenizers ----------------------------------

@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_llama_server_renders_the_template_as_transformers_does(llama_server: LlamaServer, name: str) -> None:
    conversation = CONVERSATIONS[name]
    # /apply-template: the prompt llama-server would tokenize for this request (add_generation_prompt).
    rendered = post(llama_server, "/apply-template", conversation).json()["prompt"]
    assert rendered == llama_server.model.render(conversation["messages"], conversation.get("tools"))


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_prompt_tokens_equal_the_tokenizers_count(llama_server: LlamaServer, name: str) -> None:
    conversation = CONVERSATIONS[name]
    model = llama_server.model
    text = model.render(conversation["messages"], conversation.get("tools"))
    expected = ids(model.tokenizer(), text)
    # Token for token, not just the count: llama.cpp's "gpt-2" pre-tokenizer and BPE are HF's ByteLevel.
    assert post(llama_server, "/tokenize", {"content": text, "parse_special": True}).json()["tokens"] == expected
    usage = chat(llama_server, **conversation, max_tokens=1)["usage"]
    assert usage["prompt_tokens"] == len(expected)


def test_no_bos_token_is_added(llama_server: LlamaServer) -> None:
    # The GGUF says add_bos_token = false (as ChatML models do), so even when asked to add special
    # tokens llama-server adds none: the rendered template is the whole prompt, as with transformers.
    tok = llama_server.model.tokenizer()
    tokens = post(llama_server, "/tokenize", {"content": "Hi", "add_special": True}).json()["tokens"]
    assert tokens == ids(tok, "Hi")
    assert tok.token_to_id("<|endoftext|>") not in tokens


def tool_call_conversation(arguments: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]


# Tool-call arguments as clients may send them, none in Python's json.dumps form, with the tokens of the
# prompt rendered from them verbatim and as llama-server renders them (measured).
TOOL_ARGUMENTS = {
    "compact": ('{"city":"Paris","days":[1,2,3]}', 357, 358),
    "spaced": ('{"city" : "Paris"}', 347, 345),
    "indented": ('{\n  "city": "Paris",\n  "unit": "celsius"\n}', 364, 356),
}


@pytest.mark.parametrize("name", list(TOOL_ARGUMENTS))
def test_tool_call_arguments_are_parsed_before_rendering(llama_server: LlamaServer, name: str) -> None:
    """llama-server parses an assistant tool call's ``arguments`` string as JSON and hands the template
    the object, which ``tojson`` writes back with Python's separators; transformers hands the template
    the string as the client sent it. So the prompt is the one transformers renders from the parsed
    object, and a gateway counting with the tokenizer must parse the arguments the same way to agree
    (here off by -2 to +8 tokens otherwise)."""
    model = llama_server.model
    sent, verbatim_tokens, server_tokens = TOOL_ARGUMENTS[name]
    body = {"messages": tool_call_conversation(sent), "tools": [WEATHER_TOOL]}
    as_object = model.render(tool_call_conversation(json.loads(sent)), [WEATHER_TOOL])
    assert post(llama_server, "/apply-template", body).json()["prompt"] == as_object
    assert chat(llama_server, **body, max_tokens=1)["usage"]["prompt_tokens"] == model.count(as_object) == server_tokens
    assert model.count(model.render(body["messages"], [WEATHER_TOOL])) == verbatim_tokens


def test_tool_call_arguments_quirks(llama_server: LlamaServer) -> None:
    """Where llama-server's ``tojson`` is not Python's: a float with an integral value is written as an
    integer (1.0 -> 1, 1e2 -> 100). Arguments that are not JSON are a 500."""
    body = {"messages": tool_call_conversation('{"x": 1.0, "y": 1e2, "z": 1.5e-7}'), "tools": [WEATHER_TOOL]}
    prompt = post(llama_server, "/apply-template", body).json()["prompt"]
    assert '"arguments": {"x": 1, "y": 100, "z": 1.5e-07}}' in prompt
    body = {"messages": tool_call_conversation("not json"), "tools": [WEATHER_TOOL]}
    r = post(llama_server, "/v1/chat/completions", {"model": MODEL_ALIAS, **body, "max_tokens": 1})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    assert r.json()["error"]["message"].startswith("Failed to parse tool call arguments as JSON")


def test_completion_tokens_are_the_tokens_generated(llama_server: LlamaServer) -> None:
    """``completion_tokens`` counts the tokens generated, and the content is exactly those tokens decoded
    with tokenizers; but re-encoding the content does NOT give them back. The random model emits lone
    bytes of multi-byte characters, which both decoders replace with U+FFFD (3 bytes, re-encoded as
    other tokens), and any model may emit a non-canonical split ("a"+"b" where "ab" is one token). So a
    completion cannot be counted by re-encoding its text; only the server's count is exact."""
    model = llama_server.model
    tok = model.tokenizer()
    messages = CONVERSATIONS["plain"]["messages"]
    reply = chat(llama_server, messages=messages, max_tokens=20)
    content = reply["choices"][0]["message"]["content"]
    assert reply["usage"]["completion_tokens"] == 20
    assert reply["choices"][0]["finish_reason"] == "length"
    raw = post(llama_server, "/completion", {"prompt": model.render(messages), "n_predict": 20,
                                             "return_tokens": True, **SAMPLING}).json()
    generated = raw["tokens"]
    assert len(generated) == 20
    assert tok.decode(generated, skip_special_tokens=False) == content == raw["content"]
    assert "\ufffd" in content
    assert ids(tok, content) != generated
    assert len(ids(tok, content)) == 24  # measured: the 20 tokens re-encode as 24
    # Streamed, the same text arrives in at most as many chunks as tokens (llama-server holds back an
    # incomplete UTF-8 sequence until it can send a whole character), so counting chunks is a lower bound.
    chunks = stream_chunks(llama_server, messages=messages, max_tokens=20,
                           stream_options={"include_usage": True})
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks
              if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert "".join(pieces) == content
    assert len(pieces) <= 20
    assert chunks[-1]["usage"]["completion_tokens"] == 20


def test_replies_are_deterministic(llama_server: LlamaServer) -> None:
    """Greedy decoding gives the same tokens for the same request, also when the requests run at once
    in different slots (batched together), and so does sampling with a fixed seed."""
    messages = CONVERSATIONS["plain"]["messages"]

    async def together(body: dict[str, Any], n: int) -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            rs = await asyncio.gather(*[client.post(f"{llama_server.url}/v1/chat/completions", json=body)
                                        for _ in range(n)])
        return [r.json()["choices"][0]["message"]["content"] for r in rs]

    greedy = {"model": MODEL_ALIAS, "messages": messages, "max_tokens": 40, **SAMPLING}
    alone = chat(llama_server, messages=messages, max_tokens=40)["choices"][0]["message"]["content"]
    assert asyncio.run(together(greedy, 4)) == [alone] * 4
    sampled = {**greedy, "temperature": 0.8, "seed": 42}
    assert len(set(asyncio.run(together(sampled, 3)))) == 1


# -- what llama-server does with length fields, n, and a context overflow (for the gateway's sake) -----

@pytest.mark.parametrize(("fields", "generated"), [
    ({"max_tokens": 5}, 5),
    ({"max_completion_tokens": 7}, 7),
    ({"n_predict": 6}, 6),
    ({"max_tokens": 5, "max_completion_tokens": 7}, 7),   # max_completion_tokens wins over max_tokens
    ({"max_tokens": 5, "n_predict": 3}, 3),               # n_predict wins over both
    ({"max_completion_tokens": 7, "n_predict": 9}, 9),
    ({"max_tokens": 0}, 1),                               # 0 is not "none": one token is generated
    ({"max_tokens": -1}, CONTEXT_LENGTH - 16),            # -1 is "no limit": up to the context's end
])
def test_which_length_field_llama_server_obeys(llama_server: LlamaServer, fields: dict[str, int],
                                               generated: int) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    assert llama_server.model.count(llama_server.model.render(messages)) == 16
    reply = chat(llama_server, messages=messages, **fields)
    assert reply["usage"]["completion_tokens"] == generated
    assert reply["choices"][0]["finish_reason"] == "length"


def test_n_choices_usage_counts_one_choice(llama_server: LlamaServer) -> None:
    """With ``n`` > 1 llama-server generates every choice but its non-streamed ``usage`` counts the
    completion tokens of ONE choice; streamed, each choice ends with its own usage chunk (each with the
    whole prompt). A gateway charging the report of a non-streamed n=3 request charges a third of what
    was generated."""
    messages = CONVERSATIONS["plain"]["messages"]
    reply = chat(llama_server, messages=messages, max_tokens=5, n=3)
    assert len(reply["choices"]) == 3
    assert all(c["finish_reason"] == "length" for c in reply["choices"])  # 5 tokens each: 15 generated
    assert reply["usage"]["completion_tokens"] == 5
    assert reply["usage"]["prompt_tokens"] == 24
    chunks = stream_chunks(llama_server, messages=messages, max_tokens=5, n=2,
                           stream_options={"include_usage": True})
    usages = [c["usage"] for c in chunks if c.get("usage")]
    assert [(u["prompt_tokens"], u["completion_tokens"]) for u in usages] == [(24, 5), (24, 5)]


def test_context_overflow(llama_server: LlamaServer) -> None:
    """A prompt of n_ctx tokens or more is a 400 naming its exact length; a shorter one is served and the
    completion stops at the context's end (finish_reason "length"), whatever max_tokens says."""
    model = llama_server.model
    r = post(llama_server, "/v1/chat/completions",
             {"model": MODEL_ALIAS, "messages": prompt_of_length(model, CONTEXT_LENGTH), "max_tokens": 5})
    assert r.status_code == 400
    assert r.json() == {"error": {
        "code": 400, "type": "exceed_context_size_error", "n_prompt_tokens": CONTEXT_LENGTH, "n_ctx": CONTEXT_LENGTH,
        "message": f"request ({CONTEXT_LENGTH} tokens) exceeds the available context size ({CONTEXT_LENGTH} tokens), "
                   "try increasing it"}}
    reply = chat(llama_server, messages=prompt_of_length(model, CONTEXT_LENGTH - 10), max_tokens=500)
    usage = reply["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        CONTEXT_LENGTH - 10, 10, CONTEXT_LENGTH)
    assert reply["choices"][0]["finish_reason"] == "length"


# -- the gateway in front of llama-server -------------------------------------------------------------
#
# Two gateways: one whose catalog names only the upstream (the prompt is reserved as a bound from its
# UTF-8 bytes), and one that also names the model's tokenizer.json and context length (CONTRACT.md §6:
# the prompt is counted exactly). Both must tell clients exactly what llama-server reported.

@dataclass(frozen=True)
class Site:
    gateway: Gateway
    admin: Console
    project: dict[str, Any]
    exact: bool                       # the catalog gives the tokenizer: prompts are counted exactly

    def key(self, **limits: Any) -> tuple[OpenAI, str]:
        """(an SDK client with a fresh key, the key's id)."""
        key = self.admin.mint(self.project["id"], **limits)
        client = OpenAI(base_url=self.gateway.llm_url, api_key=key["secret"], max_retries=0, timeout=120)
        return client, key["id"]

    def totals(self, key_id: str) -> dict[str, int]:
        result: dict[str, int] = self.admin.ok("GET", f"/v1/inference/keys/{key_id}/usage")["totals"]
        return result


@contextlib.contextmanager
def tiny_gateway(directory: Path, pg_template: str | None, server: LlamaServer, *catalog: str) -> Iterator[Gateway]:
    """A real gateway whose catalog has the one model "tiny" served by ``server`` (``catalog``: more
    lines for its [[models]] entry)."""
    config = directory / "gateway.toml"
    lines = ["[[models]]", f'id = "{MODEL_ALIAS}"', 'type = "chat"', f'upstreams = ["{server.base_url}"]', *catalog]
    config.write_text("\n".join(lines) + "\n")
    with fresh_database(directory, pg_template, "rs") as url:
        gw = start_gateway(directory / "data", url, config)
        try:
            yield gw
        finally:
            gw.stop()


@pytest.fixture(scope="module", params=["byte-bound", "tokenizer"])
def site(request: pytest.FixtureRequest, llama_server: LlamaServer, tmp_path_factory: pytest.TempPathFactory,
         _pg_template: str | None) -> Iterator[Site]:
    exact = request.param == "tokenizer"
    catalog = [f'tokenizer = "{llama_server.model.tokenizer_path}"', f"context_length = {CONTEXT_LENGTH}"]
    if not exact:
        catalog = []
    directory = tmp_path_factory.mktemp(f"gateway-{request.param}")
    with tiny_gateway(directory, _pg_template, llama_server, *catalog) as gw:
        admin = gw.user("admin@example.com", admin=True)
        yield Site(gw, admin, admin.project("realserver"), exact)


def complete(client: OpenAI, **body: Any) -> ChatCompletion:
    """A non-streamed call with the SDK (the model and SAMPLING filled in)."""
    return cast(ChatCompletion, client.chat.completions.create(**{"model": MODEL_ALIAS, **SAMPLING, **body}))


def complete_streamed(client: OpenAI, **body: Any) -> list[ChatCompletionChunk]:
    """A streamed call with the SDK, asking for the usage chunk: all its chunks."""
    stream = client.chat.completions.create(**{"model": MODEL_ALIAS, **SAMPLING, **body, "stream": True,
                                               "stream_options": {"include_usage": True}})
    return list(cast(Stream[ChatCompletionChunk], stream))


def complete_reserving(client: OpenAI, budget: int, **body: Any) -> tuple[ChatCompletion, int]:
    """A non-streamed call, and the prompt tokens it reserved: the budget's remaining tokens in
    x-ratelimit-remaining-tokens are taken at admission, after the request's own reservation of prompt +
    max_tokens (the key must have had ``budget`` left)."""
    raw = client.chat.completions.with_raw_response.create(**{"model": MODEL_ALIAS, **SAMPLING, **body})
    reply = cast(ChatCompletion, raw.parse())
    return reply, budget - int(raw.headers["x-ratelimit-remaining-tokens"]) - body["max_tokens"]


def usage_of(reply: ChatCompletion | ChatCompletionChunk) -> tuple[int, int]:
    assert reply.usage is not None
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    return reply.usage.prompt_tokens, reply.usage.completion_tokens


def test_gateway_reports_llama_servers_usage(site: Site, llama_server: LlamaServer) -> None:
    """Through the gateway, non-streamed and streamed, with and without tools: the client gets the text
    and the usage llama-server reports for the same request, and the key's usage adds up to it."""
    client, key_id = site.key(token_limit=1_000_000, token_limit_period="month")
    seen = []
    for name in ("plain", "system-multi-turn", "tools"):
        conversation = CONVERSATIONS[name]
        direct = chat(llama_server, **conversation, max_tokens=20)
        want = (direct["usage"]["prompt_tokens"], direct["usage"]["completion_tokens"])
        assert want[1] == 20
        text = direct["choices"][0]["message"]["content"]

        reply = complete(client, max_tokens=20, **conversation)
        assert usage_of(reply) == want
        assert reply.choices[0].message.content == text

        chunks = complete_streamed(client, max_tokens=20, **conversation)
        assert usage_of(chunks[-1]) == want
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        seen += [want, want]
    got = site.totals(key_id)
    assert (got["requests"], got["prompt_tokens"], got["completion_tokens"]) == (
        len(seen), sum(p for p, _ in seen), sum(c for _, c in seen))


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_gateway_reserves_the_prompt(site: Site, llama_server: LlamaServer, name: str) -> None:
    """What a request reserves for its prompt is llama-server's count exactly with the tokenizer in the
    catalog, and at least that without (a bound); either way the client is told llama-server's count."""
    conversation = CONVERSATIONS[name]
    real = chat(llama_server, **conversation, max_tokens=1)["usage"]["prompt_tokens"]
    client, _ = site.key(token_limit=100_000, token_limit_period="month")
    reply, reserved = complete_reserving(client, 100_000, max_tokens=3, **conversation)
    assert usage_of(reply) == (real, 3)
    assert reserved == real if site.exact else reserved >= real


@pytest.mark.parametrize("name", list(TOOL_ARGUMENTS))
def test_gateway_reserves_tool_call_arguments_as_llama_server_counts_them(site: Site, name: str) -> None:
    """Tool-call arguments not in Python's json.dumps form, which llama-server parses before rendering
    (test_tool_call_arguments_are_parsed_before_rendering): the same as test_gateway_reserves_the_prompt."""
    sent, _, real = TOOL_ARGUMENTS[name]
    client, _ = site.key(token_limit=100_000, token_limit_period="month")
    reply, reserved = complete_reserving(client, 100_000, max_tokens=3, messages=tool_call_conversation(sent),
                                         tools=[WEATHER_TOOL])
    assert usage_of(reply) == (real, 3)
    assert reserved == real if site.exact else reserved >= real


@pytest.mark.parametrize("lengths", [
    {"max_tokens": 200},
    {"max_completion_tokens": 200},
    {"n_predict": 200},
    {"max_tokens": 5, "n_predict": 200},               # llama-server obeys n_predict over max_tokens
    {"max_tokens": 5, "max_completion_tokens": 200},   # ... and max_completion_tokens over max_tokens
], ids=lambda lengths: "+".join(lengths))
def test_gateway_relays_no_token_it_does_not_charge(site: Site, llama_server: LlamaServer,
                                                    lengths: dict[str, int]) -> None:
    """A budget too small for what the client asks: whichever length fields the request carries (the
    smallest is what the client asked for), the text the client gets is exactly llama-server's reply for
    ``max_tokens`` = the completion tokens it is charged (greedy decoding is deterministic), and the
    charge fits the budget: all of it with exact counting, less with the byte bound."""
    budget = 131
    client, key_id = site.key(token_limit=budget, token_limit_period="month")
    messages = CONVERSATIONS["plain"]["messages"]
    reply = complete(client, messages=messages, extra_body=lengths)
    prompt, charged = usage_of(reply)
    assert prompt == 24
    most = min(min(lengths.values()), budget - prompt)
    assert charged == most if site.exact else 0 < charged <= most
    assert reply.choices[0].message.content == chat(
        llama_server, messages=messages, max_tokens=charged)["choices"][0]["message"]["content"]
    assert site.totals(key_id)["completion_tokens"] == charged


def test_gateway_refuses_a_context_overflow_uncharged(site: Site, llama_server: LlamaServer) -> None:
    """A prompt of the context's length or more is a 400 context_length_exceeded (the gateway's own with
    the context length in the catalog, else llama-server's passed on), charged nothing; one token less
    is served, up to the context's end. The gateway and llama-server draw the line at the same token."""
    client, key_id = site.key(token_limit=1_000_000, token_limit_period="month")
    for length in (CONTEXT_LENGTH, CONTEXT_LENGTH + 100):
        with pytest.raises(openai.BadRequestError) as refused:
            complete(client, messages=prompt_of_length(llama_server.model, length), max_tokens=5)
        assert refused.value.code == "context_length_exceeded"
        assert f"{length} tokens" in refused.value.message
    reply = complete(client, messages=prompt_of_length(llama_server.model, CONTEXT_LENGTH - 1), max_tokens=5)
    assert usage_of(reply) == (CONTEXT_LENGTH - 1, 1)
    got = site.totals(key_id)
    assert (got["requests"], got["prompt_tokens"], got["completion_tokens"]) == (3, CONTEXT_LENGTH - 1, 1)


def test_gateway_charges_every_choice_of_n_streamed(site: Site) -> None:
    """Streamed, llama-server ends each of the n choices with its own usage chunk; the client gets one
    usage counting all n choices' tokens (the gateway counts what it relayed)."""
    client, key_id = site.key(token_limit=1_000_000, token_limit_period="month")
    chunks = complete_streamed(client, max_tokens=5, n=2, **CONVERSATIONS["plain"])
    assert [usage_of(c) for c in chunks if c.usage is not None] == [(24, 10)]
    assert site.totals(key_id)["completion_tokens"] == 10


def test_gateway_charges_every_choice_of_n(site: Site) -> None:
    """n=3 generates 3 x 5 tokens; the client's usage, and the key's charge, must count all of them."""
    # Without a tokenizer the gateway forwards it as a stream and counts each choice's deltas.
    client, key_id = site.key(token_limit=1_000_000, token_limit_period="month")
    reply = complete(client, max_tokens=5, n=3, **CONVERSATIONS["plain"])
    assert [c.finish_reason for c in reply.choices] == ["length"] * 3
    assert usage_of(reply) == (24, 15)
    assert site.totals(key_id)["completion_tokens"] == 15


def test_gateway_admits_a_request_that_fits_the_budget_exactly(site: Site) -> None:
    """A key whose budget is exactly one request's real cost (24 prompt + 20 completion tokens) gets that
    request in full when the gateway counts with the tokenizer; with the byte bound (101 tokens for this
    prompt) it is refused as one that can never fit."""
    client, _ = site.key(token_limit=24 + 20, token_limit_period="month")
    if site.exact:
        assert usage_of(complete(client, max_tokens=20, **CONVERSATIONS["plain"])) == (24, 20)
        return
    with pytest.raises(openai.RateLimitError) as refused:
        complete(client, max_tokens=20, **CONVERSATIONS["plain"])
    assert refused.value.code == "token_limit_exceeded"
    assert "needs at least 102 tokens" in refused.value.message


def test_gateway_spends_a_budget_exactly_with_no_max_tokens(site: Site) -> None:
    """No max_tokens, non-streamed and streamed, on a budget of the prompt and 40 tokens: the random model
    never stops by itself, so the gateway reserves as llama-server generates (the non-streamed request goes
    up as a stream) and cuts the answer off where the budget ends: charged exactly the budget, no more."""
    if not site.exact:
        pytest.skip("the byte bound of this prompt (101 tokens) is more than the whole 64-token budget")
    for stream in (False, True):
        client, key_id = site.key(token_limit=24 + 40, token_limit_period="month")
        if stream:
            chunks = complete_streamed(client, **CONVERSATIONS["plain"])
            usage = usage_of(chunks[-1])
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        else:
            reply = complete(client, **CONVERSATIONS["plain"])
            usage = usage_of(reply)
            assert reply.choices[0].finish_reason == "length"
        assert usage == (24, 40)
        assert site.totals(key_id)["total_tokens"] == 64
        with pytest.raises(openai.RateLimitError) as refused:  # and nothing is left
            complete(client, **CONVERSATIONS["plain"])
        assert refused.value.code == "token_limit_exceeded" and "used up" in refused.value.message


# -- /v1/completions ----------------------------------------------------------------------------------

PROMPT = "Once upon a time, in a café far away, 1234 naïve cats"


def text_completion(server: LlamaServer, **body: Any) -> dict[str, Any]:
    """A non-streamed completion straight from llama-server."""
    r = post(server, "/v1/completions", {"model": MODEL_ALIAS, **SAMPLING, **body})
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def test_gateway_reports_llama_servers_completion_usage(site: Site, llama_server: LlamaServer) -> None:
    """A text completion through the gateway, non-streamed and streamed: the text and usage llama-server
    reports for it, the prompt reserved exactly with the tokenizer, and the key charged that."""
    direct = text_completion(llama_server, prompt=PROMPT, max_tokens=12)
    want = (direct["usage"]["prompt_tokens"], direct["usage"]["completion_tokens"])
    assert want == (llama_server.model.tokenizer().encode(PROMPT).ids.__len__(), 12)
    client, key_id = site.key(token_limit=100_000, token_limit_period="month")
    raw = client.completions.with_raw_response.create(model=MODEL_ALIAS, prompt=PROMPT, max_tokens=12, **SAMPLING)
    reply = raw.parse()
    assert reply.usage is not None and (reply.usage.prompt_tokens, reply.usage.completion_tokens) == want
    assert reply.choices[0].text == direct["choices"][0]["text"]
    reserved = 100_000 - int(raw.headers["x-ratelimit-remaining-tokens"]) - 12
    assert reserved == want[0] if site.exact else reserved >= want[0]
    chunks = list(client.completions.create(model=MODEL_ALIAS, prompt=PROMPT, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **SAMPLING))
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == want
    assert "".join(c.choices[0].text for c in chunks if c.choices) == direct["choices"][0]["text"]
    got = site.totals(key_id)
    assert (got["requests"], got["prompt_tokens"], got["completion_tokens"]) == (2, 2 * want[0], 2 * want[1])


def test_gateway_spends_a_budget_exactly_with_a_completion_of_no_max_tokens(site: Site,
                                                                            llama_server: LlamaServer) -> None:
    """No max_tokens (llama-server's default: generate until the context is full), non-streamed and
    streamed, on a budget of the prompt and 40 tokens: cut off where the budget ends, charged exactly it."""
    prompt = len(llama_server.model.tokenizer().encode(PROMPT).ids)
    if not site.exact:
        pytest.skip("the byte bound of this prompt is more than the whole budget")
    for stream in (False, True):
        client, key_id = site.key(token_limit=prompt + 40, token_limit_period="month")
        if stream:
            chunks = list(client.completions.create(model=MODEL_ALIAS, prompt=PROMPT, stream=True,
                                                    stream_options={"include_usage": True}, **SAMPLING))
            usage = chunks[-1].usage
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        else:
            reply = client.completions.create(model=MODEL_ALIAS, prompt=PROMPT, **SAMPLING)
            usage = reply.usage
            assert reply.choices[0].finish_reason == "length"
        assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (prompt, 40)
        assert site.totals(key_id)["total_tokens"] == prompt + 40
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(model=MODEL_ALIAS, prompt=PROMPT, max_tokens=1, **SAMPLING)
        assert refused.value.code == "token_limit_exceeded"
