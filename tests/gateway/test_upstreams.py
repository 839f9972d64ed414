"""Model servers that fail, hang and lie: failover, 502/504, reservations released, budgets intact,
and usage that clients see always equal to what is charged."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import orjson
import pytest

from quotagate.gateway.parsing import parse_chat
from tests.fakes.upstream import FakeUpstream
from tests.gateway.conftest import Mint
from tests.gateway.helpers import budget_remaining, hi, raw, sdk
from tests.support import Gateway

LIMIT = 10_000


@pytest.fixture
def budget_key(mint: Mint) -> str:
    secret, _ = mint(token_limit=LIMIT, token_limit_period="day")
    return secret


def test_failover_past_a_dead_upstream(gw: Gateway, budget_key: str, second_upstream: FakeUpstream) -> None:
    before = len(second_upstream.requests)
    for _ in range(3):
        r = sdk(gw, budget_key).chat.completions.create(model="failover", messages=hi(), max_tokens=4)
        assert r.choices[0].message.content == " tok" * 4
    assert len(second_upstream.requests) - before == 3


def test_failover_past_a_5xx_upstream(gw: Gateway, budget_key: str, failing_upstream: FakeUpstream) -> None:
    for _ in range(3):
        assert sdk(gw, budget_key).chat.completions.create(model="flaky", messages=hi()).choices


def test_all_upstreams_down_is_502_and_nothing_charged(gw: Gateway, budget_key: str) -> None:
    with pytest.raises(openai.InternalServerError) as e:
        sdk(gw, budget_key).chat.completions.create(model="dead", messages=hi())
    assert e.value.status_code == 502
    assert e.value.code == "upstream_error"
    assert budget_remaining(gw, budget_key) == LIMIT


@pytest.mark.parametrize("fake", [{"status": 500}, {"status": 503}, {"garbage": True}])
def test_failing_or_garbage_upstream_is_502(gw: Gateway, budget_key: str, fake: dict[str, Any]) -> None:
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as e:
            r = sdk(gw, budget_key).chat.completions.create(model="chat", messages=hi(), stream=stream,
                                                            extra_body={"fake": fake})
            if stream:
                list(r)  # type: ignore[call-overload]
        assert e.value.status_code == 502
    assert budget_remaining(gw, budget_key) == LIMIT


def test_hanging_upstream_is_504_and_released(gw: Gateway, budget_key: str) -> None:
    with pytest.raises(openai.APIStatusError) as e:
        sdk(gw, budget_key).chat.completions.create(model="chat", messages=hi(), extra_body={"fake": {"hang": True}})
    assert e.value.status_code == 504
    assert e.value.code == "upstream_timeout"
    assert budget_remaining(gw, budget_key) == LIMIT
    # The key still works.
    assert sdk(gw, budget_key).chat.completions.create(model="chat", messages=hi()).choices


def test_upstream_refusing_the_request_is_the_clients_400(gw: Gateway, budget_key: str) -> None:
    with pytest.raises(openai.BadRequestError):
        sdk(gw, budget_key).chat.completions.create(model="chat", messages=hi(), extra_body={"fake": {"status": 400}})
    assert budget_remaining(gw, budget_key) == LIMIT


def test_stream_hanging_midway_ends_with_an_error_and_charges_what_was_sent(gw: Gateway, budget_key: str) -> None:
    chunks: list[Any] = []
    with pytest.raises(openai.APIError):
        stream = sdk(gw, budget_key).chat.completions.create(
            model="chat", messages=hi(), stream=True, stream_options={"include_usage": True},
            extra_body={"fake": {"tokens": 10, "hang_after": 4}})
        for chunk in stream:
            chunks.append(chunk)
    usage = [c.usage for c in chunks if c.usage]
    assert len(usage) == 1  # the client is told what it is charged before the error
    assert usage[0].completion_tokens == 4
    assert budget_remaining(gw, budget_key) == LIMIT - usage[0].total_tokens


def test_stream_dying_midway(gw: Gateway, budget_key: str) -> None:
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        stream = sdk(gw, budget_key).chat.completions.create(
            model="chat", messages=hi(), stream=True, extra_body={"fake": {"tokens": 10, "die_after": 3}})
        list(stream)
    used = LIMIT - budget_remaining(gw, budget_key)
    assert 3 <= used <= 64 + 8 + 6 + 64  # three tokens at least; never more than the reservation


def test_over_reported_usage_is_capped_at_the_reservation(gw: Gateway, budget_key: str) -> None:
    lie = {"prompt_tokens": 1_000_000, "completion_tokens": 5, "total_tokens": 1_000_005}
    r = sdk(gw, budget_key).chat.completions.create(model="chat", messages=hi(), max_tokens=5,
                                                    extra_body={"fake": {"usage": lie}})
    assert r.usage is not None
    # Charged (and told) the reservation's prompt bound: the bound of this very body.
    bound = parse_chat(orjson.dumps({"model": "chat", "messages": hi(), "max_tokens": 5,
                                     "fake": {"usage": lie}})).prompt_bound
    assert r.usage.prompt_tokens == bound and r.usage.completion_tokens == 5
    assert budget_remaining(gw, budget_key) == LIMIT - r.usage.total_tokens


def test_upstream_ignoring_max_tokens_is_charged_no_more_than_granted(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(token_limit=200, token_limit_period="day")
    r = sdk(gw, secret).chat.completions.create(model="chat", messages=hi(), max_tokens=10,
                                                extra_body={"fake": {"tokens": 150, "ignore_max": True}})
    assert r.usage is not None and r.usage.completion_tokens == 10
    assert budget_remaining(gw, secret) == 200 - r.usage.total_tokens


def test_stream_overrunning_its_reservation_is_cut_off(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(token_limit=1_000, token_limit_period="day")
    chunks = list(sdk(gw, secret).chat.completions.create(
        model="chat", messages=hi(), max_tokens=7, stream=True, stream_options={"include_usage": True},
        extra_body={"fake": {"tokens": 50, "ignore_max": True}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " tok" * 7
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 7
    assert budget_remaining(gw, secret) == 1_000 - usage.total_tokens


def test_under_reported_stream_usage_is_corrected(gw: Gateway, budget_key: str) -> None:
    lie = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    chunks = list(sdk(gw, budget_key).chat.completions.create(
        model="chat", messages=hi(), stream=True, stream_options={"include_usage": True},
        extra_body={"fake": {"tokens": 9, "usage": lie}}))
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 9
    assert budget_remaining(gw, budget_key) == LIMIT - usage.total_tokens


def test_missing_usage_is_filled_in_conservatively(gw: Gateway, budget_key: str) -> None:
    r = sdk(gw, budget_key).chat.completions.create(model="chat", messages=hi(), max_tokens=6,
                                                    extra_body={"fake": {"no_usage": True}})
    assert r.usage is not None and r.usage.completion_tokens >= 6
    spent = r.usage.total_tokens
    chunks = list(sdk(gw, budget_key).chat.completions.create(
        model="chat", messages=hi(), max_tokens=6, stream=True, stream_options={"include_usage": True},
        extra_body={"fake": {"no_usage": True}}))
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 6
    assert budget_remaining(gw, budget_key) == LIMIT - spent - usage.total_tokens


def test_client_disconnecting_mid_stream_is_charged_for_what_was_generated(gw: Gateway, budget_key: str) -> None:
    with raw(gw, budget_key) as client, client.stream("POST", "/chat/completions", json={
            "model": "chat", "messages": hi(), "stream": True, "max_tokens": 500,
            "fake": {"tokens": 500, "token_delay": 0.01}}) as r:
        seen = 0
        for line in r.iter_lines():
            if '"content":" tok"' in line:
                seen += 1
            if seen == 5:
                break
    # The gateway notices, stops the model server, and settles what was generated so far.
    deadline = time.monotonic() + 10
    while (used := LIMIT - budget_remaining(gw, budget_key)) > 72 + 6 + 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 5 <= used < 72 + 6 + 200, used
