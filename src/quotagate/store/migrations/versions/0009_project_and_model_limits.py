"""projects.rpm, .tpm, .token_limit, .token_limit_period and inference_keys.model_limits (CONTRACT §6, issue 17)

A project's own limits, shared by all of its keys (null: none), and a key's limits per model:
``{"<model id>": {"rpm", "tpm", "token_limit", "token_limit_period"}}`` (null: none).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 23:40:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rpm', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('tpm', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('token_limit', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('token_limit_period', sa.String(length=8), nullable=True))
    with op.batch_alter_table('inference_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('model_limits', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('inference_keys', schema=None) as batch_op:
        batch_op.drop_column('model_limits')
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.drop_column('token_limit_period')
        batch_op.drop_column('token_limit')
        batch_op.drop_column('tpm')
        batch_op.drop_column('rpm')
