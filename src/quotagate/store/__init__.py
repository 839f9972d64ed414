"""The store: SQLAlchemy tables, engine setup and Alembic migrations (SQLite or PostgreSQL)."""
