"""``POST /v1/inference/keys/leaked`` (no authentication): the secret-scanning report revokes each live key
in it at once, records where it was found, leaves every other key alone, and is no oracle."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from quotagate.keys import secrets as key_secrets
from tests.fakes.upstream import FakeUpstream
from tests.gateway.conftest import CONFIG, Mint
from tests.gateway.helpers import hi, sdk
from tests.support import Console, Gateway, free_port, start_gateway

FAKE = "qgk_" + "A" * 38  # the right shape, a wrong checksum


def report(gw: Gateway, tokens: list[dict[str, Any]]) -> httpx.Response:
    return httpx.post(f"{gw.console_url}/v1/inference/keys/leaked", json=tokens, timeout=30)


def found(secret: str, where: str = "https://github.com/someone/repo/blob/main/.env") -> dict[str, str]:
    return {"token": secret, "type": "quotagate_inference_key", "url": where, "source": "content"}


def test_a_leaked_key_is_revoked_at_once_and_others_keep_working(gw: Gateway, mint: Mint, admin: Console,
                                                                 project: dict[str, Any]) -> None:
    leaked, key = mint()
    other, _ = mint()
    client = sdk(gw, leaked)
    client.chat.completions.create(model="chat", messages=hi(), max_tokens=1)  # in the gateway's cache now
    r = report(gw, [found(leaked), found(FAKE), found("not a key at all")])
    assert r.status_code == 200, r.text
    assert r.json() == [
        {"token_raw": leaked, "token_type": "quotagate_inference_key", "label": "true_positive"},
        {"token_raw": FAKE, "token_type": "quotagate_inference_key", "label": "false_positive"},
        {"token_raw": "not a key at all", "token_type": "quotagate_inference_key", "label": "false_positive"}]
    with pytest.raises(openai.AuthenticationError) as refused:  # the very next request
        client.chat.completions.create(model="chat", messages=hi(), max_tokens=1)
    assert refused.value.code == "key_revoked"
    sdk(gw, other).chat.completions.create(model="chat", messages=hi(), max_tokens=1)
    assert admin.ok("GET", f"/v1/inference/keys/{key['id']}")["status"] == "revoked"
    events = admin.ok("GET", f"/v1/projects/{project['id']}/audit-log")["data"]
    event = next(e for e in events if e["action"] == "key.leaked")
    assert event["target_id"] == key["id"] and event["actor"] == {"id": None, "email": "leak report"}
    assert event["details"]["url"] == "https://github.com/someone/repo/blob/main/.env"
    assert event["details"]["revoked"] is True
    # Reported again: it was one of ours (true_positive), already revoked, recorded again.
    again = report(gw, [found(leaked, "https://paste.example/x")])
    assert again.json()[0]["label"] == "true_positive"


def test_a_report_of_unknown_keys_changes_nothing(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint()
    # A well-formed key that is not one (the checksum is public: anyone can make one).
    made_up = key_secrets.generate(key_secrets.INFERENCE_KEY_KIND)
    r = report(gw, [found(made_up)])
    assert r.json()[0]["label"] == "false_positive"
    sdk(gw, secret).chat.completions.create(model="chat", messages=hi(), max_tokens=1)


@pytest.mark.parametrize(("body", "field"), [
    ({"token": "x"}, "body"),                       # not a list
    ([{"type": "x"}], "0.token"),                   # no token
    ([{"token": ""}], "0.token"),
    ([{"token": 5}], "0.token"),
    ([found("x")] * 1001, "body"),
])
def test_bad_reports_are_refused(gw: Gateway, body: Any, field: str) -> None:
    r = report(gw, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field


@pytest.fixture(scope="module")
def strict_gw(module_dir: Path, module_database_url: str, upstream: FakeUpstream) -> Iterator[Gateway]:
    """A gateway that takes 3 leak reports a minute from one address."""
    config = module_dir / "strict.toml"
    dead = f"http://127.0.0.1:{free_port()}/v1"
    config.write_text(CONFIG.format(main=upstream.base_url, second=dead, failing=dead, dead=dead))
    gateway = start_gateway(module_dir / "strict-data", module_database_url, config,
                            extra_env={"QUOTAGATE_LEAK_REPORTS_PER_MINUTE": "3"})
    yield gateway
    gateway.stop()


def test_reports_are_limited_per_address(strict_gw: Gateway) -> None:
    started = time.monotonic()
    statuses = [report(strict_gw, [found(FAKE)]).status_code for _ in range(5)]
    if time.monotonic() - started < 50:  # all within one window
        assert statuses == [200, 200, 200, 429, 429]
    r = report(strict_gw, [found(FAKE)])
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_reports"
