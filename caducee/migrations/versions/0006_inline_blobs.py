"""small message bodies live in the database, committed with the rows that name them

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 10:40:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('inline_blobs',
    sa.Column('address', sa.String(length=64), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('address', name=op.f('pk_inline_blobs'))
    )


def downgrade() -> None:
    # Bodies stored here have no file: a downgrade would lose them. Refuse rather than drop mail.
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT count(*) FROM inline_blobs")).scalar():
        raise RuntimeError("inline_blobs holds message bodies: write them out as files before downgrading")
    op.drop_table('inline_blobs')
