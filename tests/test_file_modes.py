"""The data directory and the SQLite files quotagate creates are private to the user running it: the store
holds password and secret hashes and the audit log (issue 13)."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

from tests.support import cli, qg_env


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_data_dir_and_sqlite_database_are_private(tmp_path: Path) -> None:
    data = tmp_path / "fresh" / "data"
    env = qg_env(data, "", None)
    del env["QUOTAGATE_DATABASE_URL"]  # the default: SQLite inside the data dir
    cli(env, "migrate")
    db = data / "quotagate.db"
    assert mode(data) == 0o700
    assert mode(db) == 0o600
    # SQLite creates the -wal and -shm files while a connection is open, with the database file's mode.
    conn = sqlite3.connect(db)
    try:
        conn.execute("CREATE TABLE probe (x INTEGER)")
        conn.commit()
        for suffix in ("-wal", "-shm"):
            assert mode(db.with_name(db.name + suffix)) == 0o600, suffix
    finally:
        conn.close()


def test_an_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    data = tmp_path / "shared"
    data.mkdir(mode=0o750)
    data.chmod(0o750)
    env = qg_env(data, "", None)
    del env["QUOTAGATE_DATABASE_URL"]
    cli(env, "migrate")
    assert mode(data) == 0o750  # the operator's choice
    assert mode(data / "quotagate.db") == 0o600
