"""The stream relay's shortcut: token deltas counted without a full parse, relayed as they came (issue 14).

The relay learns the bytes of a plain token delta around its text and counts the events that differ from
it only in that text without parsing them, some of them written from the upstream connection's callback.
These tests send it byte streams a JSON encoder would not (events cut anywhere, CRLF line ends, text that
looks like the fields accounting reads, an event dressed as a delta that is not one) and check that what
the client gets and what the key is charged are what a full parse of every event gives.
"""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.gateway.conftest import Mint
from tests.gateway.helpers import budget_remaining, hi, sdk
from tests.gateway.helpers import raw as raw_client
from tests.support import Gateway

CHUNK = {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1, "model": "chat"}


def event(choices: list[dict[str, Any]], **fields: Any) -> str:
    return "data: " + json.dumps({**CHUNK, "choices": choices, **fields}, separators=(",", ":"),
                                 ensure_ascii=False) + "\n\n"


def delta(text: str, index: int = 0) -> str:
    return event([{"index": index, "delta": {"content": text}, "finish_reason": None}])


FIRST = event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
FINISH = event([{"index": 0, "delta": {}, "finish_reason": "stop"}])
DONE = "data: [DONE]\n\n"


def usage(completion: int) -> str:
    return event([], usage={"prompt_tokens": 2, "completion_tokens": completion, "total_tokens": 2 + completion})


def cut(body: str, sizes: tuple[int, ...] = (1, 5, 37, 2, 90, 13, 3)) -> list[str]:
    """``body`` in pieces of these sizes, over and over: events cut in their prefix, their text, their
    blank line, and several in one piece."""
    pieces, at, i = [], 0, 0
    while at < len(body):
        pieces.append(body[at:at + sizes[i % len(sizes)]])
        at += sizes[i % len(sizes)]
        i += 1
    return pieces


def stream(gw: Gateway, secret: str, raw: list[str], delay: float = 0.002, **body: Any) -> tuple[str, Any, list[Any]]:
    """(text, usage, finish reasons) of a stream whose upstream sends ``raw``, as the SDK reads it."""
    chunks = list(sdk(gw, secret).chat.completions.create(
        model="chat", messages=hi(), stream=True, stream_options={"include_usage": True},
        extra_body={"fake": {"raw": raw, "token_delay": delay}}, **body))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usages = [c.usage for c in chunks if c.usage is not None]
    assert len(usages) == 1
    return text, usages[0], finishes


TEXTS = [" Hel", "lo", ",", " world", "!", " é🙂", " \\", ' say "hi"', "\t", " tab\\n", " end"]


@pytest.mark.parametrize("line_end", ["\n", "\r\n"])
@pytest.mark.parametrize("pieces", ["whole", "cut"])
def test_events_cut_anywhere_are_relayed_and_counted(gw: Gateway, mint: Mint, line_end: str, pieces: str) -> None:
    # No usage from the server: the charge is the token-carrying deltas the relay counted, so a delta the
    # shortcut missed or counted twice shows in the usage the client gets.
    secret, _ = mint(token_limit=10_000, token_limit_period="day")
    events = [e.replace("\n", line_end) for e in [FIRST, *(delta(t) for t in TEXTS), FINISH, DONE]]
    raw = events if pieces == "whole" else cut("".join(events))  # (whole: each event in a write of its own)
    text, used, finishes = stream(gw, secret, raw)
    assert text == "".join(TEXTS)
    assert finishes == ["stop"]
    assert used.completion_tokens == len(TEXTS)
    assert budget_remaining(gw, secret) == 10_000 - used.total_tokens


def test_text_that_looks_like_accounting_fields_is_only_text(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(token_limit=10_000, token_limit_period="day")
    texts = [" a", '"usage":{"prompt_tokens":1,"completion_tokens":1000,"total_tokens":1001}',
             '"},"finish_reason":"stop"}]}', '\\"}]}\n\ndata: [DONE]', '"error":{"message":"no"}', " b"]
    raw = [FIRST, *(delta(t) for t in texts), FINISH, DONE]
    text, used, finishes = stream(gw, secret, raw)
    assert text == "".join(texts)
    assert finishes == ["stop"]
    assert used.completion_tokens == len(texts)


def test_an_event_dressed_as_a_token_delta_is_read_in_full(gw: Gateway, mint: Mint) -> None:
    # Its bytes begin like the deltas before it and end like them, but what lies between is no single
    # string: a finish and the server's usage. Taken for a delta, the usage (5, more than the 4 deltas)
    # would be missed and the stream charged 4.
    secret, _ = mint(token_limit=10_000, token_limit_period="day")
    shaped = delta("d")
    head, tail = shaped.split('"d"')
    dressed = (head + '"d"},"finish_reason":"stop"}],"usage":{"prompt_tokens":2,"completion_tokens":5,'
               '"total_tokens":7},"x":[{"y":{"z":"w"' + tail)
    json.loads(dressed[len("data: "):])  # (valid JSON)
    raw = [FIRST, delta("a"), delta("b"), delta("c"), dressed, DONE]
    text, used, finishes = stream(gw, secret, raw)
    assert text == "abcd"
    assert finishes == ["stop"]
    assert used.completion_tokens == 5
    assert budget_remaining(gw, secret) == 10_000 - used.total_tokens


@pytest.mark.parametrize("bad", ["bad \\x escape", "raw \x01 control", "ends in a backslash \\"])
def test_a_malformed_delta_of_a_known_shape_is_an_error_not_a_token(gw: Gateway, mint: Mint, bad: str) -> None:
    secret, _ = mint(token_limit=10_000, token_limit_period="day")
    shaped = delta("x")
    head, tail = shaped.split('"x"')
    raw = [FIRST, delta("a"), delta("b"), head + '"' + bad + '"' + tail, delta("c"), FINISH, DONE]
    chunks = []
    with pytest.raises(openai.APIError) as failed:  # (the error event the stream ends with)
        for chunk in sdk(gw, secret).chat.completions.create(
                model="chat", messages=hi(), stream=True, stream_options={"include_usage": True},
                extra_body={"fake": {"raw": raw, "token_delay": 0.002}}):
            chunks.append(chunk)
    assert "malformed stream event" in str(failed.value)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ab"
    usages = [c.usage for c in chunks if c.usage is not None]
    assert usages and usages[0].completion_tokens == 2


def test_a_slow_stream_past_its_reservation_is_cut_off_at_it(gw: Gateway, mint: Mint) -> None:
    # The deltas come one by one (written from the upstream's callback), and the one past max_tokens is
    # not relayed.
    secret, _ = mint(token_limit=1_000, token_limit_period="day")
    chunks = list(sdk(gw, secret).chat.completions.create(
        model="chat", messages=hi(), max_tokens=7, stream=True, stream_options={"include_usage": True},
        extra_body={"fake": {"tokens": 50, "ignore_max": True, "token_delay": 0.005}}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " tok" * 7
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    used = chunks[-1].usage
    assert used is not None and used.completion_tokens == 7
    assert budget_remaining(gw, secret) == 1_000 - used.total_tokens


def test_a_slow_stream_reserves_block_after_block(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    # No max_tokens: the stream holds its completion in blocks (16, 32, 64, ...) reserved as the deltas come.
    secret, _ = mint(token_limit=100_000, token_limit_period="day")
    chunks = list(sdk(gw, secret).chat.completions.create(
        model="chat", messages=hi(), stream=True, stream_options={"include_usage": True},
        extra_body={"fake": {"tokens": 120, "token_delay": 0.002, "no_usage": True}}))
    assert "max_tokens" not in upstream.chat_requests()[-1]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " tok" * 120
    used = chunks[-1].usage
    assert used is not None and used.completion_tokens == 120
    assert budget_remaining(gw, secret) == 100_000 - used.total_tokens


def test_a_stream_of_two_choices_in_events_of_their_own(gw: Gateway, mint: Mint) -> None:
    # vLLM sends each choice's delta in an event of its own: a shape per choice.
    secret, _ = mint(token_limit=10_000, token_limit_period="day")
    raw = [FIRST, *(delta(t, i) for t in ("a", "b", "c", "d") for i in (0, 1)),
           event([{"index": i, "delta": {}, "finish_reason": "stop"} for i in (0, 1)]), DONE]
    chunks = list(sdk(gw, secret).chat.completions.create(
        model="chat", messages=hi(), n=2, stream=True, stream_options={"include_usage": True},
        extra_body={"fake": {"raw": raw, "token_delay": 0.002}}))
    texts = {i: "".join(c.delta.content or "" for ch in chunks for c in ch.choices if c.index == i) for i in (0, 1)}
    assert texts == {0: "abcd", 1: "abcd"}
    used = chunks[-1].usage
    assert used is not None and used.completion_tokens == 8


@pytest.mark.parametrize("ignore_max", [False, True])
def test_a_slow_completions_stream_is_counted_and_cut_off_alike(gw: Gateway, mint: Mint, ignore_max: bool) -> None:
    # /v1/completions: the text is on the choice itself ("text"), its shape learnt all the same. Without
    # usage from the server the charge is the deltas counted; past max_tokens, the stream is cut off.
    secret, _ = mint(token_limit=1_000, token_limit_period="day")
    chunks = list(sdk(gw, secret).completions.create(
        model="chat", prompt="tell", max_tokens=7, stream=True, stream_options={"include_usage": True},
        extra_body={"fake": {"tokens": 30 if ignore_max else 6, "ignore_max": ignore_max, "no_usage": True,
                             "token_delay": 0.005}}))
    count = 7 if ignore_max else 6
    assert "".join(c.choices[0].text for c in chunks if c.choices) == " tok" * count
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        ["length" if ignore_max else "stop"]
    used = chunks[-1].usage
    assert used is not None and used.completion_tokens == count
    assert budget_remaining(gw, secret) == 1_000 - used.total_tokens


def test_a_client_that_reads_late_gets_every_delta_in_order(gw: Gateway, mint: Mint) -> None:
    # Megabytes of deltas while the client reads nothing: the relay's writes fill the client's socket, it
    # stops writing from the upstream's callback and waits for the client, and nothing is lost or reordered.
    secret, _ = mint(token_limit=100_000_000, token_limit_period="day")  # (the fake's strings count as prompt)
    texts = [f"{i:05d}" + "x" * 20_000 for i in range(300)]  # (6 MB: the request body carries them)
    raw = [FIRST, *(delta(t) for t in texts), FINISH, DONE]
    with raw_client(gw, secret) as client, client.stream("POST", "/chat/completions", json={
            "model": "chat", "messages": hi(), "stream": True, "max_tokens": 1000,
            "stream_options": {"include_usage": True}, "fake": {"raw": raw, "token_delay": 0.0005}}) as r:
        assert r.status_code == 200
        time.sleep(2)
        body = r.read().decode()
    events = [json.loads(line[6:]) for line in body.split("\n\n") if line.startswith("data: {")]
    got = [c["delta"].get("content") for e in events for c in e["choices"] if c["delta"].get("content")]
    assert got == texts
    assert events[-1]["usage"]["completion_tokens"] == len(texts)


def test_a_shape_is_learnt_only_around_the_deltas_own_text(gw: Gateway, mint: Mint) -> None:
    # The delta's "content" written with a space (not found as the relay looks for it) and another
    # "content" of the same value elsewhere in the event: a shape around that other string would leave the
    # delta's text in its fixed bytes, and count the later deltas by the other string (empty: no token).
    secret, _ = mint(token_limit=10_000, token_limit_period="day")

    def spaced(other: str) -> str:
        return (delta("@").replace('"content":"@"', '"content": " tok"')[:-len("}\n\n")] +
                ',"meta":{"content":' + json.dumps(other) + "}}\n\n")

    json.loads(spaced("x")[len("data: "):])  # (valid JSON)
    raw = [FIRST, spaced(" tok"), *(spaced("") for _ in range(4)), FINISH, DONE]
    text, used, finishes = stream(gw, secret, raw)
    assert text == " tok" * 5
    assert finishes == ["stop"]
    assert used.completion_tokens == 5
