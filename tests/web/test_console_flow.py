"""The product page's whole story in a real browser against a real gateway (console + LLM API +
the built-in simulated model server): sign in, pick a project, create a key, copy the secret, call the
LLM API with it, watch the call in usage and activity, revoke, see the next call refused, archive,
find it again under "Show archived"."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support import Gateway, free_port, start_gateway
from tests.web.test_console_browser import PASSWORD, sign_in

pytestmark = pytest.mark.browser


@pytest.fixture
def demo_gateway(tmp_path: Path, database_url: str) -> Iterator[Gateway]:
    """quotagate with a demo-style config: two models served by the built-in simulator."""
    sim = free_port()
    config = tmp_path / "demo.toml"
    config.write_text(f"""
[simulator]
port = {sim}
tokens_per_second = 2000

[[models]]
id = "qwen3.6-27b"
type = "chat"
upstreams = ["http://127.0.0.1:{sim}/v1"]

[[models]]
id = "bge-m3"
type = "embedding"
upstreams = ["http://127.0.0.1:{sim}/v1"]
""")
    gw = start_gateway(tmp_path / "data", database_url, config)
    try:
        yield gw
    finally:
        gw.stop()


def test_product_page_story(demo_gateway: Gateway, browser: Any, shot: Any) -> None:
    gw = demo_gateway
    owner = gw.user("owner@example.com", password=PASSWORD)
    owner.project("acme")
    beta = owner.project("beta")
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=gw.console_url)
    page = context.new_page()
    sign_in(page, gw, "owner@example.com")
    page.wait_for_url(re.compile(r"/projects/.+/keys"))

    # Pick the project with the picker.
    page.get_by_label("Project").select_option(label="beta")
    page.wait_for_url(re.compile(rf"/projects/{beta['id']}/keys"))

    page.get_by_label("Name", exact=True).fill("production-backend")
    page.get_by_label("Requests per minute").fill("600")
    page.get_by_label("qwen3.6-27b").check()
    page.get_by_role("button", name="Create key").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_role("button", name="Copy").click()
    page.wait_for_function("document.querySelector('[data-copied]').textContent.length > 0")
    secret = page.evaluate("navigator.clipboard.readText()")
    dialog.get_by_role("link", name="Done").click()

    client = openai.OpenAI(base_url=gw.llm_url, api_key=secret, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="qwen3.6-27b", messages=[{"role": "user", "content": "Hi"}], max_tokens=12)
    reply = raw.parse()
    request_id = raw.headers["x-request-id"]
    assert reply.usage is not None and reply.usage.total_tokens > 0

    page.get_by_role("link", name="production-backend").click()
    page.wait_for_url(re.compile(r"/keys/key_"))
    deadline = time.monotonic() + 15
    while request_id not in page.content() and time.monotonic() < deadline:
        time.sleep(0.3)
        page.reload()
    assert request_id in page.content(), "the call did not appear in the key's activity"
    stats = page.locator("dl.stats").inner_text()
    assert re.search(r"Requests\s+1\b", stats), stats
    assert re.search(rf"Tokens\s+{reply.usage.total_tokens}\b", stats), stats
    assert page.locator("svg.chart").count() == 2
    shot(page, "key-usage")

    page.get_by_role("button", name="Revoke").click()
    with page.expect_navigation():
        page.get_by_role("dialog").get_by_role("button", name="Revoke").click()
    with pytest.raises(openai.AuthenticationError) as refused:
        client.chat.completions.create(model="qwen3.6-27b", messages=[{"role": "user", "content": "Hi"}])
    assert refused.value.code == "key_revoked"

    with page.expect_navigation():
        page.get_by_role("button", name="Archive").click()
    page.goto(f"{gw.console_url}/projects/{beta['id']}/keys")
    assert page.locator("tr", has_text="production-backend").count() == 0
    page.get_by_label("Show archived").check()
    page.wait_for_url(re.compile(r"archived=1"))
    assert "archived" in page.locator("tr", has_text="production-backend").inner_text()
    shot(page, "archived")
    context.close()
