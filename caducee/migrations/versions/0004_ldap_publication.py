"""publication of the directory to OpenLDAP: targets and what was published to each

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 05:10:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('ldap_targets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('target', sa.String(length=600), nullable=False),
    sa.Column('url', sa.String(length=300), nullable=False),
    sa.Column('base', sa.String(length=300), nullable=False),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('full_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ldap_targets')),
    sa.UniqueConstraint('target', name=op.f('uq_ldap_targets_target'))
    )
    op.create_table('ldap_published',
    sa.Column('target_id', sa.Integer(), nullable=False),
    sa.Column('dn_key', sa.String(length=64), nullable=False),
    sa.Column('dn', sa.String(length=1000), nullable=False),
    sa.Column('depth', sa.Integer(), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['target_id'], ['ldap_targets.id'], name=op.f('fk_ldap_published_target_id_ldap_targets'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('target_id', 'dn_key', name=op.f('pk_ldap_published'))
    )


def downgrade() -> None:
    op.drop_table('ldap_published')
    op.drop_table('ldap_targets')
