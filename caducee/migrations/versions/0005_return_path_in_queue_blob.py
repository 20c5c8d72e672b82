"""queue entries carry their Return-Path: the queued blob is the mailbox copy

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 07:40:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('queue_messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('trace_length', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('queue_messages', schema=None) as batch_op:
        batch_op.drop_column('trace_length')
