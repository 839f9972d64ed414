"""usage metering: activity events and usage buckets

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 10:00:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from quotagate.store.tables import UTCDateTime

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('usage_events',
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('created_at', UTCDateTime(), nullable=False),
    sa.Column('key_id', sa.String(length=40), nullable=True),
    sa.Column('project_id', sa.String(length=40), nullable=True),
    sa.Column('model', sa.String(length=200), nullable=True),
    sa.Column('endpoint', sa.String(length=32), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=False),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('stream', sa.Boolean(), nullable=False),
    sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
    sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
    sa.Column('latency_ms', sa.Float(), nullable=False),
    sa.Column('ttft_ms', sa.Float(), nullable=True),
    sa.Column('client_ip', sa.String(length=64), nullable=True),
    sa.Column('user_agent', sa.String(length=512), nullable=True),
    sa.PrimaryKeyConstraint('request_id', name=op.f('pk_usage_events'))
    )
    with op.batch_alter_table('usage_events', schema=None) as batch_op:
        batch_op.create_index('ix_usage_events_created', ['created_at'], unique=False)
        batch_op.create_index('ix_usage_events_key_created', ['key_id', 'created_at', 'request_id'], unique=False)

    op.create_table('usage_buckets',
    sa.Column('key_id', sa.String(length=40), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('bucket_start', sa.BigInteger(), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('project_id', sa.String(length=40), nullable=False),
    sa.Column('requests', sa.BigInteger(), nullable=False),
    sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
    sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
    sa.Column('errors', sa.BigInteger(), nullable=False),
    sa.Column('rate_limited', sa.BigInteger(), nullable=False),
    sa.Column('latency_ms_sum', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('key_id', 'width', 'bucket_start', 'model', name=op.f('pk_usage_buckets')),
    sqlite_with_rowid=False
    )
    with op.batch_alter_table('usage_buckets', schema=None) as batch_op:
        batch_op.create_index('ix_usage_buckets_project', ['project_id', 'width', 'bucket_start'], unique=False)
        batch_op.create_index('ix_usage_buckets_width_start', ['width', 'bucket_start'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('usage_buckets', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_buckets_width_start')
        batch_op.drop_index('ix_usage_buckets_project')
    op.drop_table('usage_buckets')
    with op.batch_alter_table('usage_events', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_events_key_created')
        batch_op.drop_index('ix_usage_events_created')
    op.drop_table('usage_events')
