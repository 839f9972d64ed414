"""projects.created_by (the per-user project quota) and an index for listing projects newest first

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08 11:00:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.add_column(sa.Column('created_by', sa.String(length=40), nullable=True))
        batch_op.create_index(batch_op.f('ix_projects_created_by'), ['created_by'], unique=False)
        batch_op.create_index('ix_projects_created', ['created_at', 'id'], unique=False)
    # Existing projects: their creator is in the audit log, recorded with the creation itself.
    op.execute("UPDATE projects SET created_by = (SELECT MIN(audit_log.actor_id) FROM audit_log "
               "WHERE audit_log.target_id = projects.id AND audit_log.action = 'project.created')")


def downgrade() -> None:
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.drop_index('ix_projects_created')
        batch_op.drop_index(batch_op.f('ix_projects_created_by'))
        batch_op.drop_column('created_by')
