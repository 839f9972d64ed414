"""pending_memberships: members added by an email that has no account yet (issue 13)

Adding a member answers the same whether or not the email has an account; for an email without one the
membership waits here until a user with that email is created. Downgrading drops the table, and with it
every membership still waiting.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 18:45:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from quotagate.store.tables import UTCDateTime

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'pending_memberships',
        sa.Column('project_id', sa.String(length=40), nullable=False),
        sa.Column('email', sa.String(length=320), nullable=False),
        sa.Column('user_id', sa.String(length=40), nullable=False),
        sa.Column('role', sa.String(length=16), nullable=False),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['project_id'], ['projects.id'],
                                name=op.f('fk_pending_memberships_project_id_projects'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('project_id', 'email', name=op.f('pk_pending_memberships')),
    )
    with op.batch_alter_table('pending_memberships', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_pending_memberships_email'), ['email'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('pending_memberships', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_pending_memberships_email'))
    op.drop_table('pending_memberships')
