"""Module-scoped console servers: one real `quotagate serve --role console` per test module, on its own
database (SQLite, or PostgreSQL when QUOTAGATE_TEST_DATABASE=postgres). Tests that share a server keep
out of each other's way by creating their own projects; users are made once per module."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_CONFIG, fresh_database
from tests.support import Console, Gateway, free_port, start_gateway


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("console")


@pytest.fixture(scope="module")
def module_database_url(module_dir: Path, _pg_template: str | None) -> Iterator[str]:
    """A fresh, migrated database shared by one test module."""
    with fresh_database(module_dir, _pg_template, "m") as url:
        yield url


@pytest.fixture(scope="module")
def module_config(module_dir: Path) -> Path:
    path = module_dir / "quotagate.toml"
    path.write_text(DEFAULT_CONFIG.format(upstream_port=free_port()))
    return path


@pytest.fixture(scope="module")
def server(module_dir: Path, module_database_url: str, module_config: Path) -> Iterator[Gateway]:
    """One console server for the whole module."""
    gw = start_gateway(module_dir / "data", module_database_url, module_config, role="console")
    try:
        yield gw
    finally:
        gw.stop()


UserFactory = Callable[..., Console]


@pytest.fixture(scope="module")
def make_user(server: Gateway) -> UserFactory:
    """``make_user("alice")`` creates a user with a unique email through the CLI and returns their client."""

    def make(name: str, *, admin: bool = False) -> Console:
        return server.user(f"{name}-{secrets.token_hex(4)}@example.com", admin=admin)

    return make


@pytest.fixture(scope="module")
def alice(make_user: UserFactory) -> Console:
    return make_user("alice")


@pytest.fixture(scope="module")
def bob(make_user: UserFactory) -> Console:
    return make_user("bob")


def email_of(user: Console) -> str:
    me: dict[str, str] = user.ok("GET", "/v1/me")
    return me["email"]
