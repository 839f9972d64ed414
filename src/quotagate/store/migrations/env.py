"""Alembic environment: runs migrations on the URL the caller configured.

On PostgreSQL the whole upgrade runs under an advisory lock, so that several instances starting at once
migrate one after the other instead of racing to create the same tables.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from quotagate.store.engine import make_engine
from quotagate.store.tables import metadata

MIGRATION_LOCK_ID = 0x5147_4D49  # "QGMI"


def run_migrations_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = make_engine(url, pool_size=1)
    try:
        with engine.connect() as connection:
            postgres = connection.dialect.name == "postgresql"
            if postgres:
                connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
                connection.commit()
            try:
                context.configure(connection=connection, target_metadata=metadata,
                                  render_as_batch=connection.dialect.name == "sqlite")
                with context.begin_transaction():
                    context.run_migrations()
                connection.commit()
            finally:
                if postgres:
                    connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
                    connection.commit()
    finally:
        engine.dispose()


run_migrations_online()
