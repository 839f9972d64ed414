"""One real ``quotagate serve`` (console and LLM API) per module, on its own database (SQLite, or
PostgreSQL when QUOTAGATE_TEST_DATABASE=postgres), its webhook loop polling fast, in front of the fake
model server; and a webhook receiver on loopback."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import fresh_database
from tests.fakes.upstream import FakeUpstream
from tests.support import Console, Gateway, start_gateway
from tests.webhooks.receiver import Receiver

CONFIG = """
[gateway]
default_max_tokens = 8

[[models]]
id = "chat"
type = "chat"
upstreams = ["{upstream}"]
"""

# Fast enough for tests: a pass every 0.2 s, retries after 0.2, 0.4, 0.8 s; four attempts at most.
FAST = {"QUOTAGATE_WEBHOOK_POLL_SECONDS": "0.2", "QUOTAGATE_WEBHOOK_RETRY_BASE_SECONDS": "0.2",
        "QUOTAGATE_WEBHOOK_MAX_ATTEMPTS": "4", "QUOTAGATE_WEBHOOK_TIMEOUT_SECONDS": "2"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, _pg_template: str | None, upstream: FakeUpstream) -> Iterator[Gateway]:
    directory: Path = tmp_path_factory.mktemp("webhooks")
    config = directory / "gateway.toml"
    config.write_text(CONFIG.format(upstream=upstream.base_url))
    with fresh_database(directory, _pg_template, "w") as url:
        gateway = start_gateway(directory / "data", url, config, extra_env=FAST)
        try:
            yield gateway
        finally:
            gateway.stop()


@pytest.fixture(scope="module")
def make_user(gw: Gateway) -> Callable[[str], Console]:
    return lambda name: gw.user(f"{name}-{secrets.token_hex(4)}@example.com")


@pytest.fixture(scope="module")
def owner(make_user: Callable[[str], Console]) -> Console:
    return make_user("owner")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()
