"""Engine construction and schema migration for SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.pool import NullPool

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def private_dir(path: Path) -> None:
    """Create ``path`` (and its missing parents) readable by this user only (0700); an existing directory
    is left as the operator made it."""
    if not path.exists():
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask


def private_sqlite_file(url: str) -> None:
    """Create the SQLite database file of ``url`` empty and 0600 (in a 0700 directory) before SQLite does,
    which would make it 0644: the store holds password and secret hashes and the audit log. SQLite gives its
    -wal and -shm files the database file's mode. An existing file is left as it is."""
    path = url.removeprefix("sqlite:///")
    if not url.startswith("sqlite:///") or not path or path == ":memory:":
        return
    file = Path(path)
    private_dir(file.parent)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def make_engine(url: str, *, pool_size: int = 10, keep_sqlite_open: bool = False) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout on every connection.

    SQLite connections are opened per use by default (no pool), so nothing holds the file between uses.
    ``keep_sqlite_open`` keeps one connection instead, for a single-threaded writer that commits all the
    time (the usage shipper): closing the last connection to a WAL database checkpoints the whole WAL into
    the database and deletes it, which every pass would otherwise pay for again.

    Statement parameters are never rendered into error messages (``hide_parameters``), so that no
    value from a request, hashed or not, can reach a log line through a database error."""
    if url.startswith("sqlite"):
        private_sqlite_file(url)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               hide_parameters=True,
                               **({"pool_size": 1, "max_overflow": 0} if keep_sqlite_open else {"poolclass": NullPool}))

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # Take the write lock at BEGIN: read-then-write transactions never deadlock on upgrade.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        # pysqlite's own transaction handling would defeat BEGIN IMMEDIATE.
        @event.listens_for(engine, "connect", insert=True)
        def _no_pysqlite_begin(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True,
                         hide_parameters=True)


def alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str) -> None:
    """Bring the schema at ``url`` up to date. Safe to run from several processes at once."""
    command.upgrade(alembic_config(url), "head")
