"""The schema, as SQLAlchemy Core tables. Alembic migrations in ``migrations/`` create exactly this."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, whatever the database keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        # SQLite has no time zones: keep naive UTC there so that comparisons sort correctly.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


users = Table(
    "users",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("email", String(320), nullable=False, unique=True),
    Column("password_hash", Text, nullable=True),
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("disabled_at", UTCDateTime, nullable=True),  # set: no sign-in, no token works
)

access_tokens = Table(
    "access_tokens",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("user_id", String(40), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(40), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("last_used_at", UTCDateTime, nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
    # "api": a console API access token; "session": a web console session (never accepted by the API).
    Column("kind", String(16), nullable=False, server_default="api"),
)

projects = Table(
    "projects",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(200), nullable=False),
    # None: every model of the catalog; a list narrows the project to those ids.
    Column("models", JSON, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # Who created it (None before migration 0004 found no record): counted by the per-user project quota.
    Column("created_by", String(40), nullable=True, index=True),
    # The project's own limits, shared by all of its keys (migration 0009); null: none.
    Column("rpm", BigInteger, nullable=True),
    Column("tpm", BigInteger, nullable=True),
    Column("token_limit", BigInteger, nullable=True),
    Column("token_limit_period", String(8), nullable=True),
    Index("ix_projects_created", "created_at", "id"),
)

memberships = Table(
    "memberships",
    metadata,
    Column("project_id", String(40), ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True),
    Column("user_id", String(40), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True),
    Column("role", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

# A membership for an email that has no account yet (migration 0005). Adding a member answers the same
# whether or not the email has an account, so an email without one gets a row here and, already now, the
# user id it will have: ``user_id`` is the same in every row of one email, and ``create_user`` gives the
# new user that id and turns the rows into ``memberships`` in the transaction that creates the user.
pending_memberships = Table(
    "pending_memberships",
    metadata,
    Column("project_id", String(40), ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True),
    Column("email", String(320), primary_key=True, index=True),  # normalised: trimmed, lower case
    Column("user_id", String(40), nullable=False),
    Column("role", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

inference_keys = Table(
    "inference_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("project_id", String(40), ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(40), nullable=False),
    Column("rpm", BigInteger, nullable=True),
    Column("tpm", BigInteger, nullable=True),
    Column("token_limit", BigInteger, nullable=True),
    Column("token_limit_period", String(8), nullable=True),
    Column("allowed_models", JSON, nullable=True),
    Column("allowed_networks", JSON, nullable=True),  # CIDR strings; null: from anywhere
    Column("metadata", JSON, nullable=True),          # the operator's tags, string -> string
    # {"<model id>": {"rpm", "tpm", "token_limit", "token_limit_period"}} (migration 0009); null: none.
    Column("model_limits", JSON, nullable=True),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("archived", Boolean, nullable=False, default=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("last_used_at", UTCDateTime, nullable=True),
    Column("created_by", String(40), nullable=True),
    Column("rotated_from", String(40), nullable=True),
    # Bumped on every change, so that caches can tell a stale record from a fresh one.
    Column("version", Integer, nullable=False, default=1),
    Index("ix_inference_keys_project_created", "project_id", "created_at"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("project_id", String(40), nullable=False),
    Column("actor_id", String(40), nullable=True),
    Column("actor_email", String(320), nullable=True),
    Column("action", String(64), nullable=False),
    Column("target_type", String(32), nullable=False),
    Column("target_id", String(64), nullable=False),
    Column("details", JSON, nullable=True),
    Column("client_ip", String(64), nullable=True),
    Column("user_agent", String(512), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_audit_log_project_created", "project_id", "created_at"),
)

# -- metering (metering/) ----------------------------------------------------------------------------

# One row per request that reached the LLM API, keyed by the x-request-id the client saw: the activity
# log, and the shipper's idempotency guard (a re-shipped event conflicts here and is counted no more).
usage_events = Table(
    "usage_events",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("key_id", String(40), nullable=True),
    Column("project_id", String(40), nullable=True),
    Column("model", String(200), nullable=True),
    Column("endpoint", String(32), nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("error_code", String(64), nullable=True),
    Column("stream", Boolean, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("ttft_ms", Float, nullable=True),
    Column("client_ip", String(64), nullable=True),
    Column("user_agent", String(512), nullable=True),
    Index("ix_usage_events_key_created", "key_id", "created_at", "request_id"),
    Index("ix_usage_events_created", "created_at"),
    Index("ix_usage_events_project_created", "project_id", "created_at", "request_id"),
)

# Aggregates per key, model and time bucket, at three levels: ``width`` is the bucket's length in seconds
# (60, 3600 or 86400). Every event is added to all three levels when it is shipped; minute rows are
# dropped after 48 h and hour rows after 60 days, so a query reads one level per stretch of time and a
# month at hour or day granularity reads 720 or 30 rows. Bucket starts are Unix seconds.
# ``model`` is '' for requests that named no model.
usage_buckets = Table(
    "usage_buckets",
    metadata,
    Column("key_id", String(40), primary_key=True),
    Column("width", Integer, primary_key=True),
    Column("bucket_start", BigInteger, primary_key=True),
    Column("model", String(200), primary_key=True),
    Column("project_id", String(40), nullable=False),
    Column("requests", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("rate_limited", BigInteger, nullable=False),
    Column("latency_ms_sum", Float, nullable=False),
    Index("ix_usage_buckets_project", "project_id", "width", "bucket_start"),
    Index("ix_usage_buckets_width_start", "width", "bucket_start"),
    # On SQLite, cluster the rows by key, level and time: a query reads one contiguous range per level.
    sqlite_with_rowid=False,
)

# -- webhooks (webhooks/) ----------------------------------------------------------------------------

# A project's endpoint for event notifications (migration 0010). The signing secret is not stored: it is
# derived from the instance's signing key and ``secret_nonce`` (webhooks/signing.py says why), and
# ``key_fingerprint`` names the signing key it was derived with, so that only instances holding that key
# deliver to it.
webhooks = Table(
    "webhooks",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("project_id", String(40), ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
    Column("url", Text, nullable=False),
    Column("events", JSON, nullable=False),             # event types, a list
    Column("budget_thresholds", JSON, nullable=False),  # fractions of a budget, ascending
    Column("enabled", Boolean, nullable=False),
    Column("secret_nonce", String(64), nullable=False),
    Column("secret_prefix", String(40), nullable=False),  # the first characters, to tell secrets apart
    Column("key_fingerprint", String(16), nullable=False),
    Column("created_by", String(40), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index("ix_webhooks_project_created", "project_id", "created_at"),
)

# One event for one webhook, and the state of its delivery. ``dedupe_key`` is the event's natural identity
# (a threshold of a key's budget in one period, say): unique per webhook, so however many instances see
# the crossing, one row exists, and its ``id`` is the event id the receiver sees on every attempt.
# An instance delivers a row only while it holds its lease (``lease_until``).
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("webhook_id", String(40), ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False),
    Column("project_id", String(40), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("dedupe_key", String(255), nullable=False),
    Column("data", JSON, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("status", String(16), nullable=False),       # pending, delivered, failed
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("lease_until", UTCDateTime, nullable=True),
    Column("response_code", Integer, nullable=True),    # of the last attempt that got an answer
    Column("last_error", String(500), nullable=True),
    Column("attempt_log", JSON, nullable=False),        # the last attempts: at, response_code, error, ms
    Column("delivered_at", UTCDateTime, nullable=True),
    UniqueConstraint("webhook_id", "dedupe_key", name="uq_webhook_deliveries_webhook_dedupe"),
    Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    Index("ix_webhook_deliveries_webhook_created", "webhook_id", "created_at", "id"),
)
