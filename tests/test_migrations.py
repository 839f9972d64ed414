"""Alembic migrations: from an empty database to head on both stores, repeatable, matching the tables,
and safe when several processes migrate one PostgreSQL database at once."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from quotagate.store.engine import alembic_config, make_engine, migrate
from quotagate.store.tables import metadata
from tests.conftest import BACKEND, PG_ADMIN_URL
from tests.support import qg_env

CONTROL_PLANE_TABLES = {"users", "access_tokens", "projects", "memberships", "inference_keys", "audit_log"}


@pytest.fixture
def empty_database_url(tmp_path: Path) -> Iterator[str]:
    """A database with nothing in it (not even the migrated template the other tests copy)."""
    if BACKEND != "postgres":
        yield f"sqlite:///{tmp_path / 'empty' / 'quotagate.db'}"
        return
    name = f"qg_empty_{secrets.token_hex(6)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def head() -> str:
    rev = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert rev is not None
    return rev


def current(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def test_upgrade_from_empty_is_complete_and_repeatable(empty_database_url: str) -> None:
    url = empty_database_url
    assert current(url) is None
    migrate(url)
    assert current(url) == head()
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) >= CONTROL_PLANE_TABLES
            # the migrations create exactly what tables.py describes
            diffs = compare_metadata(MigrationContext.configure(conn), metadata)
            assert diffs == [], diffs
    finally:
        engine.dispose()
    migrate(url)  # again: nothing to do, no error
    assert current(url) == head()


def test_pending_memberships_upgrade_and_downgrade(empty_database_url: str) -> None:
    """0005 adds pending_memberships (members added by an email without an account); downgrading to 0004
    drops it and leaves the rest; upgrading again brings it back exactly as tables.py describes it."""
    url = empty_database_url
    command.upgrade(alembic_config(url), "0004")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert "pending_memberships" not in inspect(conn).get_table_names()
        command.upgrade(alembic_config(url), "0005")
        assert current(url) == "0005"
        with engine.begin() as conn:
            assert "pending_memberships" in inspect(conn).get_table_names()
            conn.execute(text("INSERT INTO projects (id, name, created_at, updated_at) "
                              "VALUES ('proj_m', 'm', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
            conn.execute(text("INSERT INTO pending_memberships (project_id, email, user_id, role, created_at) "
                              "VALUES ('proj_m', 'x@example.com', 'usr_x', 'viewer', CURRENT_TIMESTAMP)"))
        command.downgrade(alembic_config(url), "0004")
        assert current(url) == "0004"
        with engine.connect() as conn:
            assert "pending_memberships" not in inspect(conn).get_table_names()
            assert conn.execute(text("SELECT count(*) FROM projects")).scalar_one() == 1
        migrate(url)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM pending_memberships")).scalar_one() == 0
            diffs = compare_metadata(MigrationContext.configure(conn), metadata)
            assert diffs == [], diffs
    finally:
        engine.dispose()


def test_webhooks_upgrade_and_downgrade(empty_database_url: str) -> None:
    """0010 adds webhooks and webhook_deliveries; downgrading to the revision before drops both and leaves
    the rest; upgrading again brings them back exactly as tables.py describes them."""
    url = empty_database_url
    before = ScriptDirectory.from_config(alembic_config(url)).get_revision("0010").down_revision
    assert isinstance(before, str)
    migrate(url)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO projects (id, name, created_at, updated_at) "
                              "VALUES ('proj_w', 'w', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
        command.downgrade(alembic_config(url), before)
        with engine.connect() as conn:
            names = set(inspect(conn).get_table_names())
            assert not {"webhooks", "webhook_deliveries"} & names
            assert conn.execute(text("SELECT count(*) FROM projects")).scalar_one() == 1
        migrate(url)
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), metadata)
            assert diffs == [], diffs
    finally:
        engine.dispose()


def test_one_migration_chain() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1
    revisions = list(script.walk_revisions())
    assert revisions[-1].revision == "0001" and revisions[-1].down_revision is None


def test_migrate_command_from_empty(tmp_path: Path, empty_database_url: str) -> None:
    env = qg_env(tmp_path / "data", empty_database_url, None)
    for _ in range(2):
        result = subprocess.run([sys.executable, "-m", "quotagate", "migrate"], env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    assert current(empty_database_url) == head()


def test_concurrent_migrations_of_one_database_both_succeed(tmp_path: Path, empty_database_url: str) -> None:
    """Several instances starting at once against one (PostgreSQL, or SQLite) database each migrate it:
    all succeed, and the schema ends at head once."""
    env = qg_env(tmp_path / "data", empty_database_url, None)
    procs = [subprocess.Popen([sys.executable, "-m", "quotagate", "migrate"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outcomes = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
    for p in procs:
        for stream in (p.stdout, p.stderr):
            if stream:
                stream.close()
    assert [code for code, _ in outcomes] == [0, 0, 0], outcomes
    assert current(empty_database_url) == head()
