"""Budgets survive restarts on the embedded default (memory limiter): after a kill -9 and a restart every
key's budget continues from what it had used, and the rpm/tpm windows from the last minute's requests.

Before, a 1500/day key that had used 1446 was admitted again after a restart and reached 1790 that day."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.fakes.upstream import FakeUpstream
from tests.support import Gateway, free_port, start_gateway

CONFIG = """
[[models]]
id = "chat"
type = "chat"
upstreams = ["{main}"]
"""


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


def _client(gw: Gateway, secret: str) -> OpenAI:
    return OpenAI(base_url=gw.llm_url, api_key=secret, max_retries=0, timeout=30)


def _spend(gw: Gateway, secret: str, tokens: int, *, stream: bool = False) -> int:
    """One request generating ``tokens``; the total tokens the client was told it was charged."""
    client = _client(gw, secret)
    if stream:
        chunks = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=tokens, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"fake": {"tokens": tokens}})
        usage = [c.usage for c in chunks if c.usage][-1]
    else:
        usage = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=tokens, extra_body={"fake": {"tokens": tokens}}).usage
    assert usage is not None
    return usage.total_tokens


def _remaining(gw: Gateway, secret: str) -> int:
    r = httpx.get(f"{gw.llm_url}/models", headers={"Authorization": f"Bearer {secret}"}, timeout=10)
    return int(r.headers["x-ratelimit-remaining-tokens"])


def test_budgets_and_windows_survive_kill_9(tmp_path: Path, database_url: str, upstream: FakeUpstream) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG.format(main=upstream.base_url))
    data = tmp_path / "data"
    ports = {"console_port": free_port(), "llm_port": free_port()}
    gw = start_gateway(data, database_url, config, **ports)
    try:
        admin = gw.user("owner@example.com", admin=True)
        project = admin.project("restarts")
        limit = 1_500
        budget = admin.mint(project["id"], name="budget", token_limit=limit, token_limit_period="day")
        rated = admin.mint(project["id"], name="rated", rpm=4, tpm=100_000)
        charged = sum(_spend(gw, budget["secret"], 100, stream=i % 2 == 1) for i in range(13))
        assert 1_300 < charged < limit
        assert _remaining(gw, budget["secret"]) == limit - charged
        for _ in range(4):
            _spend(gw, rated["secret"], 5)
        gw.proc.send_signal(signal.SIGKILL)
        gw.proc.wait()

        gw = start_gateway(data, database_url, config, **ports)
        # The budget goes on from what was used, not from zero.
        assert _remaining(gw, budget["secret"]) == limit - charged
        while True:
            try:
                charged += _spend(gw, budget["secret"], 100)
            except openai.RateLimitError as exc:
                assert exc.code == "token_limit_exceeded"
                break
        assert charged <= limit
        # The rpm window still holds the four requests of the last minute.
        with pytest.raises(openai.RateLimitError) as refused:
            _spend(gw, rated["secret"], 5)
        assert refused.value.body["param"] == "rpm"  # type: ignore[index]
    finally:
        gw.stop()


def test_project_and_model_limits_survive_kill_9(tmp_path: Path, database_url: str, upstream: FakeUpstream) -> None:
    """A project's budget (shared by its keys) and a key's per-model rpm window are rebuilt from the store."""
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG.format(main=upstream.base_url))
    data = tmp_path / "data"
    ports = {"console_port": free_port(), "llm_port": free_port()}
    gw = start_gateway(data, database_url, config, **ports)
    try:
        admin = gw.user("owner@example.com", admin=True)
        project = admin.project("restarts")
        limit = 1_500
        admin.ok("PATCH", f"/v1/projects/{project['id']}", json={"token_limit": limit, "token_limit_period": "day"})
        plain = admin.mint(project["id"], name="plain")
        per_model = admin.mint(project["id"], name="per-model", model_limits={"chat": {"rpm": 4}})
        charged = sum(_spend(gw, per_model["secret"], 5) for _ in range(4))
        charged += sum(_spend(gw, plain["secret"], 100, stream=i % 2 == 1) for i in range(12))
        assert 1_200 < charged < limit
        assert _remaining(gw, plain["secret"]) == limit - charged  # the project's budget binds the key
        gw.proc.send_signal(signal.SIGKILL)
        gw.proc.wait()

        gw = start_gateway(data, database_url, config, **ports)
        assert _remaining(gw, plain["secret"]) == limit - charged
        with pytest.raises(openai.RateLimitError) as refused:
            _spend(gw, per_model["secret"], 5)
        assert refused.value.body["param"] == "model_limits"  # type: ignore[index]
        while True:
            try:
                charged += _spend(gw, plain["secret"], 100)
            except openai.RateLimitError as exc:
                assert exc.code == "token_limit_exceeded"
                assert exc.body["param"] == "project"  # type: ignore[index]
                break
        assert charged <= limit
    finally:
        gw.stop()
