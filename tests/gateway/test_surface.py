"""The smaller parts of the API surface real clients rely on: CORS (``QUOTAGATE_CORS_ORIGINS``), compressed
request bodies, ``openai-processing-ms`` and the budget's own ``x-ratelimit-*-budget`` headers."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.gateway.conftest import CONFIG, Mint
from tests.gateway.helpers import hi, raw, sdk
from tests.support import Gateway, free_port, start_gateway

APP = "https://chat.example.com"


@pytest.fixture(scope="module")
def cors_gw(module_dir: Path, module_database_url: str, upstream: FakeUpstream) -> Iterator[Gateway]:
    """A second gateway on the module's database, whose LLM API lets pages of ``APP`` call it."""
    config = module_dir / "cors.toml"
    dead = f"http://127.0.0.1:{free_port()}/v1"
    config.write_text(CONFIG.format(main=upstream.base_url, second=upstream.base_url, failing=dead, dead=dead))
    gateway = start_gateway(module_dir / "cors-data", module_database_url, config,
                            extra_env={"QUOTAGATE_CORS_ORIGINS": f"{APP}/, http://localhost:3000"})
    yield gateway
    gateway.stop()


def _preflight(gateway: Gateway, origin: str, headers: str = "authorization, content-type") -> httpx.Response:
    return httpx.options(f"{gateway.llm_url}/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": headers})


def test_a_preflight_from_an_allowed_origin_is_answered(cors_gw: Gateway) -> None:
    asked = "authorization, content-type, x-stainless-os, x-stainless-retry-count"
    r = _preflight(cors_gw, APP, asked)
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == APP
    assert r.headers["access-control-allow-headers"] == asked
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in r.headers  # keys travel in a header, never cookies
    assert r.headers["vary"] == "origin"


def test_a_preflight_from_another_origin_is_refused(cors_gw: Gateway, gw: Gateway) -> None:
    r = _preflight(cors_gw, "https://evil.example.com")
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in r.headers
    # Off by default: a gateway with no origins set answers preflights as any other OPTIONS.
    assert _preflight(gw, APP).status_code == 405


def test_answers_to_an_allowed_origin_carry_the_cors_headers(cors_gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(rpm=100)
    for origin, allowed in ((APP, True), ("http://localhost:3000", True), ("https://evil.example.com", False)):
        r = httpx.post(f"{cors_gw.llm_url}/chat/completions", json={"model": "chat", "messages": hi()},
                       headers={"Authorization": f"Bearer {secret}", "Origin": origin})
        assert r.status_code == 200, r.text
        assert (r.headers.get("access-control-allow-origin") == origin) is allowed
        if allowed:
            exposed = r.headers["access-control-expose-headers"]
            assert "x-request-id" in exposed and "x-ratelimit-remaining-requests" in exposed
    # Errors too (a browser page must be able to read why it was refused).
    r = httpx.post(f"{cors_gw.llm_url}/chat/completions", json={"model": "chat", "messages": hi()},
                   headers={"Authorization": "Bearer nope", "Origin": APP})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == APP


def test_gzip_and_deflate_bodies_are_read(gw: Gateway, mint: Mint, upstream: FakeUpstream) -> None:
    secret, _ = mint()
    body = orjson.dumps({"model": "chat", "messages": hi("compressed"), "max_tokens": 3})
    with raw(gw, secret) as client:
        for encoding, data in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
            r = client.post("/chat/completions", content=data, headers={"Content-Encoding": encoding,
                                                                        "Content-Type": "application/json"})
            assert r.status_code == 200, r.text
            assert upstream.requests[-1]["messages"] == hi("compressed")


@pytest.mark.parametrize(("encoding", "data", "status"), [
    ("gzip", b"not gzip at all", 400),
    ("gzip", gzip.compress(b'{"model": "chat", "messages": []}')[:-8], 400),   # cut short
    ("br", b"\x0b\x02\x80{}\x03", 415),
    ("gzip", gzip.compress(b" " * (9 * 1024 * 1024)), 413),   # 9 KB that inflate past the 8 MiB limit
])
def test_bad_compressed_bodies_are_refused(gw: Gateway, mint: Mint, encoding: str, data: bytes, status: int) -> None:
    secret, _ = mint()
    with raw(gw, secret) as client:
        r = client.post("/chat/completions", content=data, headers={"Content-Encoding": encoding})
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


def test_openai_processing_ms_and_budget_headers(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint(tpm=50_000, token_limit=20_000, token_limit_period="day")
    r = sdk(gw, secret).chat.completions.with_raw_response.create(model="chat", messages=hi(), max_tokens=4)
    assert int(r.headers["openai-processing-ms"]) >= 0
    assert r.headers["x-ratelimit-limit-tokens"] == "50000"  # per minute, as OpenAI's header means
    assert r.headers["x-ratelimit-limit-budget"] == "20000"
    reserved = 20_000 - int(r.headers["x-ratelimit-remaining-budget"])
    assert 4 < reserved < 200
    assert r.headers["x-ratelimit-reset-budget"].endswith("s")
    with httpx.stream("POST", f"{gw.llm_url}/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                      json={"model": "chat", "messages": hi(), "stream": True}) as streamed:
        assert int(streamed.headers["openai-processing-ms"]) >= 0
        streamed.read()
