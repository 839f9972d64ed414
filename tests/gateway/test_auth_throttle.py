"""Forged well-formed keys (the checksum is public) cost a store lookup each: 923 a second from one client
once slowed a new key's first request from 2 ms to 10-28 ms. Past QUOTAGATE_LLM_AUTH_FAILURES_PER_MINUTE
unknown keys, an address's lookups stop until its minute ends; keys already cached keep working."""

from __future__ import annotations

from pathlib import Path

import httpx

from quotagate.keys.secrets import INFERENCE_KEY_KIND, generate
from tests.fakes.upstream import FakeUpstream
from tests.support import start_gateway

CONFIG = """
[[models]]
id = "chat"
type = "chat"
upstreams = ["{main}"]
"""


def test_an_address_sending_unknown_keys_is_stopped_before_the_store(tmp_path: Path, database_url: str) -> None:
    upstream = FakeUpstream().start()
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG.format(main=upstream.base_url))
    gw = start_gateway(tmp_path / "data", database_url, config,
                       extra_env={"QUOTAGATE_LLM_AUTH_FAILURES_PER_MINUTE": "20"})
    try:
        owner = gw.user("throttle@example.com", admin=True)
        project = owner.project("throttle")["id"]
        known = owner.mint(project)["secret"]
        later = owner.mint(project)["secret"]  # minted now, first used after the address is stopped
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}

        def ask(secret: str) -> httpx.Response:
            return httpx.post(f"{gw.llm_url}/chat/completions", json=body,
                              headers={"Authorization": f"Bearer {secret}"}, timeout=10)

        assert ask(known).status_code == 200  # cached from now on
        codes = [ask(generate(INFERENCE_KEY_KIND)).status_code for _ in range(25)]
        assert codes == [401] * 20 + [429] * 5
        stopped = ask(generate(INFERENCE_KEY_KIND))
        assert stopped.json()["error"]["code"] == "too_many_failed_authentications"
        assert 0 < int(stopped.headers["retry-after"]) <= 60 and stopped.headers["x-should-retry"] == "false"
        # A key the gateway knows still works from that address; one it would have to look up waits.
        assert ask(known).status_code == 200
        assert ask(later).status_code == 429
    finally:
        gw.stop()
        upstream.stop()
