"""trust space and delivery reports

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 01:09:12.009618
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('delivery_reports',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('original_message_id', sa.String(length=998), nullable=False),
    sa.Column('sender', sa.String(length=320), nullable=True),
    sa.Column('recipient', sa.String(length=320), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('status', sa.String(length=64), nullable=False),
    sa.Column('detail', sa.String(length=500), nullable=True),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_delivery_reports'))
    )
    with op.batch_alter_table('delivery_reports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_delivery_reports_original_message_id'), ['original_message_id'], unique=False)

    op.create_table('trust_domains',
    sa.Column('domain', sa.String(length=255), nullable=False),
    sa.Column('operator_dn', sa.String(length=1000), nullable=False),
    sa.Column('description', sa.String(length=500), nullable=True),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('domain', name=op.f('pk_trust_domains'))
    )
    op.create_table('trust_imports',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('imported_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('generated_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('source', sa.String(length=1000), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('domains', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_trust_imports'))
    )
    with op.batch_alter_table('queue_messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('hops', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('report_kind', sa.String(length=8), nullable=True))

    with op.batch_alter_table('queue_recipients', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_attempt_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('uncertain', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('delay_reported', sa.Boolean(), server_default=sa.false(), nullable=False))



def downgrade() -> None:
    with op.batch_alter_table('queue_recipients', schema=None) as batch_op:
        batch_op.drop_column('delay_reported')
        batch_op.drop_column('uncertain')
        batch_op.drop_column('last_attempt_at')

    with op.batch_alter_table('queue_messages', schema=None) as batch_op:
        batch_op.drop_column('report_kind')
        batch_op.drop_column('hops')

    op.drop_table('trust_imports')
    op.drop_table('trust_domains')
    with op.batch_alter_table('delivery_reports', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_delivery_reports_original_message_id'))

    op.drop_table('delivery_reports')
