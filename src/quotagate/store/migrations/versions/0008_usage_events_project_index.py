"""An index on usage_events (project_id, created_at): a project's activity over a range (issue 16's export)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 20:50:00.000000
"""
from __future__ import annotations

from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('usage_events', schema=None) as batch_op:
        batch_op.create_index('ix_usage_events_project_created', ['project_id', 'created_at', 'request_id'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('usage_events', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_events_project_created')
