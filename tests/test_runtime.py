"""The runtime built from the settings: the store's connection pool is sized as configured."""

from __future__ import annotations

from pathlib import Path

import pytest

from quotagate.app import Runtime
from quotagate.settings import Settings
from tests.conftest import BACKEND


@pytest.mark.skipif(BACKEND != "postgres", reason="SQLite opens a connection per use: there is no pool to size")
def test_the_postgresql_pool_is_as_large_as_the_setting(tmp_path: Path, database_url: str) -> None:
    for size in (3, 10):
        env = {"QUOTAGATE_DATABASE_URL": database_url, "QUOTAGATE_DATA_DIR": str(tmp_path)}
        if size != 10:
            env["QUOTAGATE_DATABASE_POOL_SIZE"] = str(size)
        rt = Runtime.build(Settings.load(env=env), run_migrations=False)
        try:
            assert rt.engine.pool.size() == size  # type: ignore[attr-defined]
        finally:
            rt.close()
