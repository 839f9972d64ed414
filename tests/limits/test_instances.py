"""Two real gateway processes sharing one database and one Redis: limits hold across them, and a key
revoked through one is refused by the other within 100 ms."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.limits.conftest import REDIS_URL
from tests.support import Gateway, start_gateway

pytestmark = pytest.mark.skipif(not REDIS_URL, reason="QUOTAGATE_TEST_REDIS_URL=''")

CONFIG = """
[[models]]
id = "chat"
type = "chat"
upstreams = ["{upstream}"]
"""


@pytest.fixture
def instances(tmp_path: Path, database_url: str) -> Iterator[tuple[Gateway, Gateway]]:
    upstream = FakeUpstream().start()
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG.format(upstream=upstream.base_url))
    env = {"QUOTAGATE_REDIS_URL": REDIS_URL}
    a = start_gateway(tmp_path / "a", database_url, config, extra_env=env)
    b = start_gateway(tmp_path / "b", database_url, config, extra_env=env)
    yield a, b
    a.stop()
    b.stop()
    upstream.stop()


def chat(client: httpx.Client, secret: str) -> httpx.Response:
    return client.post("/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                       json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})


def test_limits_hold_across_instances(instances: tuple[Gateway, Gateway]) -> None:
    a, b = instances
    admin = a.user("admin@example.com", admin=True)
    project = admin.project("shared")
    key = admin.mint(project["id"], rpm=12)
    secret = key["secret"]

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=a.llm_url, timeout=30) as ca, \
                httpx.AsyncClient(base_url=b.llm_url, timeout=30) as cb:
            async def one(client: httpx.AsyncClient) -> int:
                r = await client.post("/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                                      json={"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                                            "max_tokens": 5})
                return r.status_code
            return list(await asyncio.gather(*(one(ca if i % 2 else cb) for i in range(60))))

    statuses = asyncio.run(burst())
    assert statuses.count(200) == 12 and statuses.count(429) == 48


def test_a_revocation_reaches_the_other_instance_within_100ms(instances: tuple[Gateway, Gateway]) -> None:
    a, b = instances
    admin = a.user("admin@example.com", admin=True)
    project = admin.project("shared")
    secret = admin.mint(project["id"], rpm=1000)["secret"]
    key_id: Any
    with httpx.Client(base_url=a.llm_url, timeout=10) as ca, httpx.Client(base_url=b.llm_url, timeout=10) as cb:
        assert chat(ca, secret).status_code == 200
        assert chat(cb, secret).status_code == 200  # b has the key cached now
        key_id = next(k["id"] for k in admin.ok("GET", f"/v1/projects/{project['id']}/inference/keys")["data"])
        admin.ok("DELETE", f"/v1/inference/keys/{key_id}")
        revoked = time.monotonic()
        refused = chat(ca, secret)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "key_revoked"
        while True:
            r = chat(cb, secret)
            if r.status_code != 200:
                break
            assert time.monotonic() - revoked < 0.1, "instance b still admits the revoked key after 100 ms"
        assert r.status_code == 401 and r.json()["error"]["code"] == "key_revoked"
