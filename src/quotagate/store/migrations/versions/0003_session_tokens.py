"""web sessions apart from API access tokens: access_tokens.kind

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08 10:00:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('access_tokens', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), server_default='api', nullable=False))
    # The web console named its sessions "web session": they stay signed in, and stop working on the API.
    op.execute("UPDATE access_tokens SET kind = 'session' WHERE name = 'web session'")


def downgrade() -> None:
    with op.batch_alter_table('access_tokens', schema=None) as batch_op:
        batch_op.drop_column('kind')
