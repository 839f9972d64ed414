"""users.disabled_at: an instance admin can disable a user (``quotagate users disable``, issue 16)

A disabled user can no longer sign in, and every access token and web session of theirs stops working;
their projects, memberships and the projects' inference keys are left as they are.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 20:30:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from quotagate.store.tables import UTCDateTime

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('disabled_at', UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('disabled_at')
