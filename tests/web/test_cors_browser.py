"""A real browser page calls the LLM API across origins, as openai-node with ``dangerouslyAllowBrowser``
does (fetch, an Authorization header and the SDK's x-stainless-* headers, so a preflight first): allowed
from an origin in ``QUOTAGATE_CORS_ORIGINS``, blocked by the browser from any other."""

from __future__ import annotations

import http.server
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import fresh_database
from tests.fakes.upstream import FakeUpstream
from tests.support import Console, Gateway, free_port, start_gateway

PAGE = b"<!doctype html><title>chat app</title><p>a browser app</p>"

# What the page runs: a streamed chat completion the way openai-node sends one.
CALL = """async ([url, key]) => {
  try {
    const r = await fetch(url + "/chat/completions", {method: "POST", headers: {
      "Authorization": "Bearer " + key, "Content-Type": "application/json",
      "X-Stainless-Lang": "js", "X-Stainless-Retry-Count": "0"},
      body: JSON.stringify({model: "chat", messages: [{role: "user", content: "hi"}], stream: true,
                            max_tokens: 3})});
    const text = await r.text();
    return {status: r.status, requestId: r.headers.get("x-request-id"),
            remaining: r.headers.get("x-ratelimit-remaining-requests"), text};
  } catch (e) {
    return {error: String(e)};
  }
}"""


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def sites() -> Iterator[tuple[str, str]]:
    """Two page servers: the app's origin (allowed) and another one."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Page) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{servers[0].server_port}", f"http://127.0.0.1:{servers[1].server_port}"
    for server in servers:
        server.shutdown()


@pytest.fixture(scope="module")
def cors_gateway(tmp_path_factory: pytest.TempPathFactory, _pg_template: str | None,
                 sites: tuple[str, str]) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("cors")
    upstream = FakeUpstream().start()
    config = directory / "gateway.toml"
    config.write_text(f'[[models]]\nid = "chat"\ntype = "chat"\nupstreams = ["{upstream.base_url}"]\n')
    with fresh_database(directory, _pg_template, "cors") as url:
        gw = start_gateway(directory / "data", url, config, extra_env={"QUOTAGATE_CORS_ORIGINS": sites[0]})
        try:
            yield gw
        finally:
            gw.stop()
            upstream.stop()


@pytest.fixture(scope="module")
def admin(cors_gateway: Gateway) -> Console:
    return cors_gateway.user("admin@example.com", admin=True)


def _secret(admin: Console) -> str:
    key = admin.mint(admin.project(f"browser-{secrets.token_hex(3)}")["id"], rpm=50)
    return str(key["secret"])


def test_a_page_of_an_allowed_origin_streams_a_chat_completion(browser: Any, cors_gateway: Gateway, admin: Console,
                                                               sites: tuple[str, str]) -> None:
    secret = _secret(admin)
    page = browser.new_page()
    try:
        page.goto(sites[0])
        result = page.evaluate(CALL, [cors_gateway.llm_url, secret])
    finally:
        page.close()
    assert result.get("status") == 200, result
    assert result["requestId"].startswith("req_")  # an exposed header the page can read
    assert result["remaining"] == "49"
    assert result["text"].count("data: {") >= 3 and result["text"].rstrip().endswith("data: [DONE]")


def test_a_page_of_another_origin_is_blocked_by_the_browser(browser: Any, cors_gateway: Gateway, admin: Console,
                                                            sites: tuple[str, str]) -> None:
    secret = _secret(admin)
    page = browser.new_page()
    try:
        page.goto(sites[1])
        result = page.evaluate(CALL, [cors_gateway.llm_url, secret])
    finally:
        page.close()
    assert "error" in result and "Failed to fetch" in result["error"], result
