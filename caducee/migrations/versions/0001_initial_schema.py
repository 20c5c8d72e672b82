"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-30 00:41:04.662429
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_log',
    sa.Column('seq', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('event', sa.String(length=32), nullable=False),
    sa.Column('actor', sa.String(length=64), nullable=False),
    sa.Column('protocol', sa.String(length=16), nullable=True),
    sa.Column('mailbox', sa.String(length=320), nullable=True),
    sa.Column('message_id', sa.String(length=998), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('prev_hash', sa.String(length=64), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_audit_log'))
    )
    op.create_table('principals',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('national_id', sa.String(length=32), nullable=False),
    sa.Column('display_name', sa.String(length=200), nullable=False),
    sa.Column('organisation', sa.String(length=200), nullable=True),
    sa.Column('active', sa.Boolean(), server_default=sa.true(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_principals')),
    sa.UniqueConstraint('national_id', name=op.f('uq_principals_national_id'))
    )
    op.create_table('queue_messages',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('blob', sa.String(length=64), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('mail_from', sa.String(length=320), nullable=False),
    sa.Column('envid', sa.String(length=100), nullable=True),
    sa.Column('ret', sa.String(length=4), nullable=True),
    sa.Column('principal', sa.String(length=32), nullable=True),
    sa.Column('header_message_id', sa.String(length=998), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_queue_messages'))
    )
    op.create_table('mailboxes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('mailbox_type', sa.String(length=3), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('description', sa.String(length=200), nullable=True),
    sa.Column('liste_rouge', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('preference', sa.Integer(), server_default='0', nullable=False),
    sa.Column('active', sa.Boolean(), server_default=sa.true(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_login_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("mailbox_type IN ('PER', 'ORG', 'APP', 'CAB')", name=op.f('ck_mailboxes_mailbox_type')),
    sa.ForeignKeyConstraint(['owner_id'], ['principals.id'], name=op.f('fk_mailboxes_owner_id_principals')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_mailboxes')),
    sa.UniqueConstraint('address', name=op.f('uq_mailboxes_address'))
    )
    op.create_table('queue_recipients',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('message_id', sa.String(length=32), nullable=False),
    sa.Column('rcpt', sa.String(length=320), nullable=False),
    sa.Column('notify', sa.String(length=40), nullable=True),
    sa.Column('orcpt', sa.String(length=500), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('lease_owner', sa.String(length=64), nullable=True),
    sa.Column('lease_expires', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.String(length=500), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['message_id'], ['queue_messages.id'], name=op.f('fk_queue_recipients_message_id_queue_messages')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_queue_recipients'))
    )
    with op.batch_alter_table('queue_recipients', schema=None) as batch_op:
        batch_op.create_index('ix_queue_recipients_due', ['state', 'next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_queue_recipients_message_id'), ['message_id'], unique=False)

    op.create_table('folders',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('mailbox_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('uidvalidity', sa.BigInteger(), nullable=False),
    sa.Column('uidnext', sa.BigInteger(), server_default='1', nullable=False),
    sa.Column('subscribed', sa.Boolean(), server_default=sa.true(), nullable=False),
    sa.ForeignKeyConstraint(['mailbox_id'], ['mailboxes.id'], name=op.f('fk_folders_mailbox_id_mailboxes')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_folders')),
    sa.UniqueConstraint('mailbox_id', 'name', name='uq_folders_mailbox_name')
    )
    op.create_table('mailbox_access',
    sa.Column('mailbox_id', sa.Integer(), nullable=False),
    sa.Column('principal_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['mailbox_id'], ['mailboxes.id'], name=op.f('fk_mailbox_access_mailbox_id_mailboxes')),
    sa.ForeignKeyConstraint(['principal_id'], ['principals.id'], name=op.f('fk_mailbox_access_principal_id_principals')),
    sa.PrimaryKeyConstraint('mailbox_id', 'principal_id', name=op.f('pk_mailbox_access'))
    )
    op.create_table('messages',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('folder_id', sa.Integer(), nullable=False),
    sa.Column('uid', sa.BigInteger(), nullable=False),
    sa.Column('blob', sa.String(length=64), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('internaldate', sa.DateTime(timezone=True), nullable=False),
    sa.Column('flags', sa.String(length=1000), server_default='', nullable=False),
    sa.Column('header_message_id', sa.String(length=998), nullable=True),
    sa.Column('queue_recipient_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['folder_id'], ['folders.id'], name=op.f('fk_messages_folder_id_folders')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_messages')),
    sa.UniqueConstraint('folder_id', 'uid', name='uq_messages_folder_uid'),
    sa.UniqueConstraint('queue_recipient_id', name=op.f('uq_messages_queue_recipient_id'))
    )


def downgrade() -> None:
    op.drop_table('messages')
    op.drop_table('mailbox_access')
    op.drop_table('folders')
    with op.batch_alter_table('queue_recipients', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_queue_recipients_message_id'))
        batch_op.drop_index('ix_queue_recipients_due')

    op.drop_table('queue_recipients')
    op.drop_table('mailboxes')
    op.drop_table('queue_messages')
    op.drop_table('principals')
    op.drop_table('audit_log')
