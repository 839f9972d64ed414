"""webhooks and webhook_deliveries: budget alerts and key events (CONTRACT §6, issue 17)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 23:30:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from quotagate.store.tables import UTCDateTime

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'webhooks',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('project_id', sa.String(length=40), nullable=False),
        sa.Column('url', sa.Text(), nullable=False),
        sa.Column('events', sa.JSON(), nullable=False),
        sa.Column('budget_thresholds', sa.JSON(), nullable=False),
        sa.Column('enabled', sa.Boolean(), nullable=False),
        sa.Column('secret_nonce', sa.String(length=64), nullable=False),
        sa.Column('secret_prefix', sa.String(length=40), nullable=False),
        sa.Column('key_fingerprint', sa.String(length=16), nullable=False),
        sa.Column('created_by', sa.String(length=40), nullable=True),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.Column('updated_at', UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name='fk_webhooks_project_id_projects',
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name='pk_webhooks'),
    )
    op.create_index('ix_webhooks_project_created', 'webhooks', ['project_id', 'created_at'], unique=False)
    op.create_table(
        'webhook_deliveries',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('webhook_id', sa.String(length=40), nullable=False),
        sa.Column('project_id', sa.String(length=40), nullable=False),
        sa.Column('event_type', sa.String(length=64), nullable=False),
        sa.Column('dedupe_key', sa.String(length=255), nullable=False),
        sa.Column('data', sa.JSON(), nullable=False),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('next_attempt_at', UTCDateTime(), nullable=False),
        sa.Column('lease_until', UTCDateTime(), nullable=True),
        sa.Column('response_code', sa.Integer(), nullable=True),
        sa.Column('last_error', sa.String(length=500), nullable=True),
        sa.Column('attempt_log', sa.JSON(), nullable=False),
        sa.Column('delivered_at', UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(['webhook_id'], ['webhooks.id'],
                                name='fk_webhook_deliveries_webhook_id_webhooks', ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name='pk_webhook_deliveries'),
        sa.UniqueConstraint('webhook_id', 'dedupe_key', name='uq_webhook_deliveries_webhook_dedupe'),
    )
    op.create_index('ix_webhook_deliveries_due', 'webhook_deliveries', ['status', 'next_attempt_at'], unique=False)
    op.create_index('ix_webhook_deliveries_webhook_created', 'webhook_deliveries',
                    ['webhook_id', 'created_at', 'id'], unique=False)


def downgrade() -> None:
    op.drop_table('webhook_deliveries')
    op.drop_table('webhooks')
