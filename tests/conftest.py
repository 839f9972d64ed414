"""Shared fixtures: a fresh database per test (SQLite, or PostgreSQL when QUOTAGATE_TEST_DATABASE=postgres),
and real quotagate servers started as subprocesses on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.support import Gateway, free_port, start_gateway

PG_ADMIN_URL = os.environ.get("QUOTAGATE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKEND = os.environ.get("QUOTAGATE_TEST_DATABASE", "sqlite")


def pytest_report_header() -> str:
    return f"quotagate store backend under test: {BACKEND}"


@pytest.fixture(scope="session")
def _pg_template() -> Iterator[str | None]:
    """A migrated template database, copied for each test (much faster than migrating each time)."""
    if BACKEND != "postgres":
        yield None
        return
    from quotagate.store.engine import migrate

    name = f"qg_tpl_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    migrate(f"{base}/{name}")
    yield name
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@contextlib.contextmanager
def fresh_database(directory: Path, template: str | None, tag: str = "t") -> Iterator[str]:
    """The URL of a fresh, migrated database: SQLite in ``directory``, or (PostgreSQL run) a copy of the
    migrated template, dropped afterwards."""
    if template is None:
        yield f"sqlite:///{directory / 'data' / 'quotagate.db'}"
        return
    name = f"qg_{tag}_{secrets.token_hex(6)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def database_url(tmp_path: Path, _pg_template: str | None) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    with fresh_database(tmp_path, _pg_template) as url:
        yield url


DEFAULT_CONFIG = """
[[models]]
id = "qwen3.6-27b"
type = "chat"
upstreams = ["http://127.0.0.1:{upstream_port}/v1"]

[[models]]
id = "bge-m3"
type = "embedding"
upstreams = ["http://127.0.0.1:{upstream_port}/v1"]

[[models]]
id = "llama-3.1-8b"
type = "chat"
upstreams = ["http://127.0.0.1:{upstream_port}/v1"]
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A catalog of three models pointing at a port where nothing listens (console tests need no upstream)."""
    path = tmp_path / "quotagate.toml"
    path.write_text(DEFAULT_CONFIG.format(upstream_port=free_port()))
    return path


@pytest.fixture
def gateway(tmp_path: Path, database_url: str, config_file: Path) -> Iterator[Gateway]:
    """A real `quotagate serve` process on free ports, with its own data dir and database."""
    gw = start_gateway(tmp_path / "data", database_url, config_file)
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def gateway_console(tmp_path: Path, database_url: str, config_file: Path) -> Iterator[Gateway]:
    """A real `quotagate serve --role console` process (no LLM listener)."""
    gw = start_gateway(tmp_path / "data", database_url, config_file, role="console")
    try:
        yield gw
    finally:
        gw.stop()
