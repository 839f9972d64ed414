"""inference_keys.allowed_networks and .metadata (CONTRACT §6, issue 17)

``allowed_networks``: a list of CIDR networks the key may be used from (null: anywhere).
``metadata``: the operator's own tags, string to string (null: none).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 20:40:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('inference_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('allowed_networks', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('metadata', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('inference_keys', schema=None) as batch_op:
        batch_op.drop_column('metadata')
        batch_op.drop_column('allowed_networks')
