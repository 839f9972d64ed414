"""What real model servers do that the gateway must read right: tool-call streams, usage on the finish
chunk, other error shapes, context overflows, and an X-Request-Id that must be a UUID."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import openai
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.gateway.conftest import Mint
from tests.gateway.helpers import budget_remaining, hi, raw, sdk
from tests.support import Gateway

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def test_a_tool_call_stream_is_counted_by_its_argument_tokens(gw: Gateway, mint: Mint) -> None:
    # Its first delta (id and name, no arguments) is no token: counted as one, the stream was once cut
    # a token early, finish_reason turned from tool_calls to length and the last fragment was lost.
    limit = 2_000
    secret, _ = mint(token_limit=limit, token_limit_period="day")
    stream = sdk(gw, secret).chat.completions.create(
        model="chat", messages=hi(), max_tokens=5, tools=TOOLS, tool_choice="required", stream=True,
        stream_options={"include_usage": True}, extra_body={"fake": {"tokens": 5, "tool_call": True}})
    arguments, finish, usage = "", None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                arguments += (call.function.arguments or "") if call.function else ""
    assert finish == "tool_calls"
    assert arguments == '{"q": "xxx"}'
    assert usage is not None and usage.completion_tokens == 5
    assert budget_remaining(gw, secret) == limit - usage.total_tokens


@pytest.mark.parametrize("include_usage", [True, False])
def test_usage_on_the_finish_chunk_reaches_the_client_once(gw: Gateway, mint: Mint, include_usage: bool) -> None:
    secret, _ = mint(token_limit=2_000, token_limit_period="day")
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = sdk(gw, secret).chat.completions.create(
        model="chat", messages=hi(), max_tokens=4, stream=True, **options,  # type: ignore[arg-type]
        extra_body={"fake": {"tokens": 4, "usage_on_finish": True}})
    usages = [chunk.usage for chunk in stream if chunk.usage is not None]
    if include_usage:
        assert len(usages) == 1 and usages[0].completion_tokens == 4
    else:
        assert usages == []


def test_vllm_and_sglang_error_shape_keeps_its_message(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint()
    body = {"object": "error", "message": "temperature must be non-negative, got -3.", "type": "BadRequestError",
            "param": None, "code": 400}
    with pytest.raises(openai.BadRequestError) as err:
        sdk(gw, secret).chat.completions.create(model="chat", messages=hi(),
                                                extra_body={"fake": {"status": 400, "error_body": body}})
    assert "temperature must be non-negative, got -3." in err.value.message
    body = {"object": "error", "message": "model overloaded", "type": "ServiceUnavailableError", "code": 503}
    with pytest.raises(openai.APIStatusError) as failed:
        sdk(gw, secret).chat.completions.create(model="chat", messages=hi(),
                                                extra_body={"fake": {"status": 503, "error_body": body}})
    assert failed.value.status_code == 502 and "model overloaded" in failed.value.message


CONTEXT_ERRORS = [
    # vLLM
    {"object": "error", "message": "This model's maximum context length is 2048 tokens. However, you requested "
     "2100 tokens (2000 in the messages, 100 in the completion). Please reduce the length of the messages or "
     "completion.", "type": "BadRequestError", "code": 400},
    # llama.cpp
    {"error": {"code": 400, "message": "the request exceeds the available context size, try increasing it",
               "type": "exceed_context_size_error", "n_prompt_tokens": 3000, "n_ctx": 2048}},
    # llama-cpp-python
    {"detail": "Requested tokens (3000) exceed context window of 2048"},
]


@pytest.mark.parametrize("error", CONTEXT_ERRORS)
def test_context_overflow_is_context_length_exceeded(gw: Gateway, mint: Mint, error: dict[str, object]) -> None:
    secret, _ = mint()
    with pytest.raises(openai.BadRequestError) as err:
        sdk(gw, secret).chat.completions.create(model="chat", messages=hi(),
                                                extra_body={"fake": {"status": 400, "error_body": error}})
    assert err.value.code == "context_length_exceeded"
    assert "context" in err.value.message


def test_a_streamed_context_overflow_is_a_400_not_a_retried_502(gw: Gateway, mint: Mint) -> None:
    # llama-cpp-python opens the stream, then sends the overflow as its first event.
    secret, _ = mint(token_limit=2_000, token_limit_period="day")
    event = {"error": {"message": "Requested tokens (3000) exceed context window of 2048",
                       "type": "invalid_request_error", "code": 400}}
    with raw(gw, secret) as client:
        r = client.post("/chat/completions", json={"model": "chat", "messages": hi(), "stream": True,
                                                   "fake": {"stream_error": event}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert budget_remaining(gw, secret) == 2_000  # nothing charged


@pytest.fixture
def uuid_only(upstream: FakeUpstream) -> Iterator[FakeUpstream]:
    upstream.require_uuid_request_id = True
    yield upstream
    upstream.require_uuid_request_id = False


def test_the_request_id_goes_upstream_as_a_uuid(gw: Gateway, mint: Mint, uuid_only: FakeUpstream) -> None:
    # Stock llama-cpp-python answered every request with a 400 and an empty body for "req_...".
    secret, _ = mint()
    r = sdk(gw, secret).chat.completions.with_raw_response.create(model="chat", messages=hi())
    assert r.parse().choices[0].message.content
    sent = uuid_only.request_ids[-1]
    assert sent is not None
    # The same 128 bits as the id the client sees, so the two logs can be matched.
    assert uuid.UUID(sent).hex == r.headers["x-request-id"].removeprefix("req_")


def test_a_non_streamed_answer_put_together_from_a_stream(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    # A non-streamed request of a budgeted key with no max_tokens is forwarded as a stream (reserved as it
    # is generated) and answered as one chat.completion: the client sees no difference.
    limit = 2_000
    secret, _ = mint(token_limit=limit, token_limit_period="day")
    client = sdk(gw, secret)
    r = client.chat.completions.create(model="chat", messages=hi(), tools=TOOLS, tool_choice="required",
                                       extra_body={"fake": {"tokens": 5, "tool_call": True}})
    assert upstream.chat_requests()[-1]["stream"] is True
    assert r.object == "chat.completion" and r.choices[0].finish_reason == "tool_calls"
    calls = r.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1
    assert (calls[0].id, calls[0].function.name, calls[0].function.arguments) == ("call_fake", "lookup",
                                                                                  '{"q": "xxx"}')
    assert r.usage is not None and r.usage.completion_tokens == 5
    first = r.usage.total_tokens
    r = client.chat.completions.create(model="chat", messages=hi(), n=2, extra_body={"fake": {"tokens": 3}})
    assert [c.message.content for c in r.choices] == [" tok" * 3] * 2 and r.usage is not None
    assert budget_remaining(gw, secret) == limit - first - r.usage.total_tokens  # charged what the answers said
    with pytest.raises(openai.APIStatusError) as broke:
        client.chat.completions.create(model="chat", messages=hi(), extra_body={"fake": {"tokens": 5, "die_after": 2}})
    assert broke.value.status_code == 502
