"""One real gateway per test module (its own database), in front of fake model servers in this process.

Models of the catalog:
    chat, chat-b     the fake upstream (chat carries an upstream API key from an env var)
    embed            the fake upstream, embeddings
    rerank           the fake upstream, rerank and score
    mapped           the fake upstream, which knows it as "Org/Mapped-Model-7B"
    failover         a dead port first, then the second fake upstream
    flaky            an upstream answering 500, then the fake upstream
    dead             a dead port only
Tests keep out of each other's way by minting their own keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import fresh_database
from tests.fakes.upstream import FakeUpstream
from tests.support import Console, Gateway, free_port, start_gateway

UPSTREAM_KEY = "sk-upstream-test-secret"

CONFIG = """
[gateway]
default_max_tokens = 64
connect_timeout_seconds = 2

[[models]]
id = "chat"
type = "chat"
upstreams = ["{main}"]
upstream_api_key_env = "QG_TEST_UPSTREAM_KEY"
timeout_seconds = 1.5

[[models]]
id = "chat-b"
type = "chat"
upstreams = ["{main}"]

[[models]]
id = "embed"
type = "embedding"
upstreams = ["{main}"]

[[models]]
id = "rerank"
type = "rerank"
upstreams = ["{main}"]

[[models]]
id = "mapped"
type = "chat"
upstreams = ["{main}"]
upstream_model = "Org/Mapped-Model-7B"
created = 2026-11-30T12:00:00Z

[[models]]
id = "failover"
type = "chat"
upstreams = ["{dead}", "{second}"]

[[models]]
id = "flaky"
type = "chat"
upstreams = ["{failing}", "{main}"]

[[models]]
id = "dead"
type = "chat"
upstreams = ["{dead}"]
"""


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway")


@pytest.fixture(scope="module")
def module_database_url(module_dir: Path, _pg_template: str | None) -> Iterator[str]:
    """A fresh, migrated database shared by one test module."""
    with fresh_database(module_dir, _pg_template, "g") as url:
        yield url


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def second_upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def failing_upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    fake.mode = "error500"
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def gw(module_dir: Path, module_database_url: str, upstream: FakeUpstream, second_upstream: FakeUpstream,
       failing_upstream: FakeUpstream) -> Iterator[Gateway]:
    config = module_dir / "gateway.toml"
    config.write_text(CONFIG.format(main=upstream.base_url, second=second_upstream.base_url,
                                    failing=failing_upstream.base_url, dead=f"http://127.0.0.1:{free_port()}/v1"))
    gateway = start_gateway(module_dir / "data", module_database_url, config,
                            extra_env={"QG_TEST_UPSTREAM_KEY": UPSTREAM_KEY})
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def admin(gw: Gateway) -> Console:
    return gw.user("admin@example.com", admin=True)


@pytest.fixture(scope="module")
def project(admin: Console) -> dict[str, Any]:
    return admin.project("gateway-tests")


Mint = Callable[..., tuple[str, dict[str, Any]]]


@pytest.fixture
def mint(admin: Console, project: dict[str, Any]) -> Mint:
    """mint(**limits) -> (secret, key object)."""

    def _mint(**body: Any) -> tuple[str, dict[str, Any]]:
        key = admin.mint(project["id"], **body)
        return key.pop("secret"), key

    return _mint
