"""Refusals say the truth: a budget used up, a budget held by requests in flight, and a request that can
never fit are three different answers, and clients act on Retry-After and x-should-retry."""

from __future__ import annotations

import threading
import time

import orjson

from quotagate.gateway.parsing import parse_chat
from tests.gateway.conftest import Mint
from tests.gateway.helpers import budget_remaining, hi, raw
from tests.support import Gateway

MAX_TOKENS = 100


FULL = {"fake": {"tokens": MAX_TOKENS}}  # a request that uses all of its max_tokens


def _bound(**extra: object) -> int:
    return parse_chat(orjson.dumps({"model": "chat", "messages": hi(), "max_tokens": MAX_TOKENS,
                                    **extra})).prompt_bound


def _ask(gw: Gateway, secret: str, **extra: object) -> tuple[int, dict[str, str], dict[str, object]]:
    with raw(gw, secret) as client:
        r = client.post("/chat/completions", json={"model": "chat", "messages": hi(), "max_tokens": MAX_TOKENS,
                                                    **extra})
    return r.status_code, dict(r.headers), r.json()


def test_budget_held_by_requests_in_flight_is_a_short_retryable_wait(gw: Gateway, mint: Mint) -> None:
    # Room for one reservation: while it is in flight a second request is refused, but told to retry soon.
    # (A non-streamed request reserves its whole max_tokens up front; this one hangs until the model's
    # 1.5 s timeout, then is settled at nothing.)
    limit = _bound(fake={"hang": True}) + MAX_TOKENS + 50
    secret, _ = mint(token_limit=limit, token_limit_period="day")
    slow = threading.Thread(target=_ask, args=(gw, secret), kwargs={"fake": {"hang": True}})
    slow.start()
    deadline = time.monotonic() + 5
    while budget_remaining(gw, secret) == limit:  # until it is admitted
        assert time.monotonic() < deadline
        time.sleep(0.01)
    status, headers, body = _ask(gw, secret)
    assert status == 429 and body["error"]["code"] == "token_limit_exceeded"  # type: ignore[index]
    assert "in flight" in body["error"]["message"]  # type: ignore[index]
    assert headers["retry-after"] == "1" and headers["x-should-retry"] == "true"
    slow.join()
    # Settled at nothing (it timed out): the same request now fits.
    status, _, body = _ask(gw, secret)
    assert status == 200, body


def test_budget_used_up_waits_for_the_period_and_says_so(gw: Gateway, mint: Mint) -> None:
    # Room for one request: once it has been charged, not even the next one's prompt fits.
    secret, _ = mint(token_limit=_bound(**FULL) + MAX_TOKENS, token_limit_period="day")
    assert _ask(gw, secret, **FULL)[0] == 200
    status, headers, body = _ask(gw, secret, **FULL)
    assert status == 429 and body["error"]["code"] == "token_limit_exceeded"  # type: ignore[index]
    assert "used up" in body["error"]["message"]  # type: ignore[index]
    to_midnight = 86_400 - time.time() % 86_400
    assert abs(int(headers["retry-after"]) - to_midnight) <= 2
    assert headers["x-should-retry"] == "false"


def test_used_up_minute_budget_is_retryable(gw: Gateway, mint: Mint) -> None:
    if time.time() % 60 > 58:
        time.sleep(2.5)  # both requests in one calendar minute
    secret, _ = mint(token_limit=_bound(**FULL) + MAX_TOKENS, token_limit_period="minute")
    assert _ask(gw, secret, **FULL)[0] == 200
    status, headers, _ = _ask(gw, secret, **FULL)
    assert status == 429 and int(headers["retry-after"]) <= 60 and headers["x-should-retry"] == "true"


def test_a_request_larger_than_the_budget_can_never_fit(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(token_limit=_bound() // 2, token_limit_period="month")
    status, headers, body = _ask(gw, secret)
    assert status == 429 and body["error"]["code"] == "token_limit_exceeded"  # type: ignore[index]
    message = body["error"]["message"]  # type: ignore[index]
    assert "never be admitted" in message and f"{_bound() + 1 - _bound() // 2} more than" in message
    assert headers["x-should-retry"] == "false"
    assert budget_remaining(gw, secret) == _bound() // 2  # nothing reserved or charged


def test_a_request_larger_than_tpm_can_never_fit(gw: Gateway, mint: Mint) -> None:
    # Once a retryable 429 with Retry-After: 60, so SDKs stalled for minutes on a request that cannot pass.
    secret, _ = mint(tpm=_bound() // 2)
    status, headers, body = _ask(gw, secret)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"  # type: ignore[index]
    assert body["error"]["param"] == "tpm" and "never be admitted" in body["error"]["message"]  # type: ignore[index]
    assert headers["x-should-retry"] == "false"


def test_rpm_refusal_names_the_limit_and_is_retryable(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(rpm=1)
    assert _ask(gw, secret)[0] == 200
    status, headers, body = _ask(gw, secret)
    assert status == 429 and body["error"]["param"] == "rpm"  # type: ignore[index]
    assert 1 <= int(headers["retry-after"]) <= 60 and headers["x-should-retry"] == "true"
