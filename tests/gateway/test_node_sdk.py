"""The official openai-node SDK (tests/gateway/node, pinned in its package-lock.json and installed by
``./scripts/install test``) through the gateway: chat, completions and embeddings, streamed and not, the
usage it reads, and the error class it raises on a refusal."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.conftest import Mint
from tests.support import Gateway

NODE_DIR = Path(__file__).resolve().parent / "node"


def node(gw: Gateway, secret: str, *calls: str) -> dict[str, dict[str, Any]]:
    executable = shutil.which("node")
    if executable is None or not (NODE_DIR / "node_modules" / "openai").is_dir():
        pytest.fail("openai-node is not installed: ./scripts/install test installs it (needs node and npm)",
                    pytrace=False)
    done = subprocess.run([executable, str(NODE_DIR / "calls.mjs"), gw.llm_url, secret, *calls],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    return {r["call"]: r for r in results}


def test_the_node_sdk_chats_completes_and_embeds(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(token_limit=100_000, token_limit_period="day")
    got = node(gw, secret, "chat", "chat-stream", "completion", "completion-stream", "embedding", "models")
    assert all(r["ok"] for r in got.values()), got
    assert got["chat"]["text"] == " tok" * 3 and got["chat"]["usage"]["completion_tokens"] == 3
    assert got["chat-stream"]["text"] == " tok" * 3 and got["chat-stream"]["usage"]["completion_tokens"] == 3
    assert got["completion"]["text"] == " tok" * 3 and got["completion"]["usage"]["completion_tokens"] == 3
    assert got["completion-stream"]["text"] == " tok" * 3
    assert got["completion-stream"]["usage"]["completion_tokens"] == 3
    assert got["embedding"]["count"] == 2 and got["embedding"]["usage"]["prompt_tokens"] > 0
    assert "chat" in got["models"]["ids"]


def test_the_node_sdk_raises_its_rate_limit_error(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(rpm=1)
    got = node(gw, secret, "chat", "completion")
    assert got["chat"]["ok"]
    refused = got["completion"]
    assert not refused["ok"]
    assert (refused["error"], refused["status"], refused["code"]) == ("RateLimitError", 429, "rate_limit_exceeded")
    assert refused["requestId"].startswith("req_") and int(refused["retryAfter"]) >= 1


def test_the_node_sdk_calls_the_responses_api(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(token_limit=100_000, token_limit_period="day")
    got = node(gw, secret, "response", "response-stream")
    assert all(r["ok"] for r in got.values()), got
    prompt = len("hi from node") // 2  # the fake upstream's count
    assert got["response"]["text"] == " tok" * 3 and got["response"]["status"] == "incomplete"
    usage = got["response"]["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (prompt, 3, prompt + 3)
    assert got["response-stream"]["text"] == " tok" * 3
    assert {"response.created", "response.output_text.delta"} <= set(got["response-stream"]["types"])
    # Cut short by max_output_tokens, the fake (as OpenAI) ends with response.incomplete, carrying the usage.
    assert "response.incomplete" in got["response-stream"]["types"]
    assert got["response-stream"]["usage"]["output_tokens"] == 3
