"""national directory: practitioners, skills, organisations, activities, MSSanté mailbox columns,
certificates, import log

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 01:55:17.214582
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('directory_imports',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('file_name', sa.String(length=255), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('lines', sa.Integer(), server_default='0', nullable=False),
    sa.Column('added', sa.Integer(), server_default='0', nullable=False),
    sa.Column('changed', sa.Integer(), server_default='0', nullable=False),
    sa.Column('removed', sa.Integer(), server_default='0', nullable=False),
    sa.Column('rejected', sa.Integer(), server_default='0', nullable=False),
    sa.Column('warnings', sa.Integer(), server_default='0', nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_directory_imports'))
    )
    op.create_table('organisations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('principal_id', sa.Integer(), nullable=False),
    sa.Column('structure_id', sa.String(length=32), nullable=False),
    sa.Column('technical_id', sa.String(length=32), nullable=True),
    sa.Column('finess', sa.String(length=9), nullable=True),
    sa.Column('finess_legal', sa.String(length=9), nullable=True),
    sa.Column('siret', sa.String(length=14), nullable=True),
    sa.Column('siren', sa.String(length=9), nullable=True),
    sa.Column('name', sa.String(length=300), nullable=True),
    sa.Column('trade_name', sa.String(length=300), nullable=True),
    sa.Column('name_norm', sa.String(length=300).with_variant(sa.String(length=300, collation='C'), 'postgresql'), nullable=True),
    sa.Column('address', sa.String(length=1000), nullable=True),
    sa.Column('postcode', sa.String(length=16).with_variant(sa.String(length=16, collation='C'), 'postgresql'), nullable=True),
    sa.Column('commune_code', sa.String(length=8), nullable=True),
    sa.Column('city', sa.String(length=200), nullable=True),
    sa.Column('city_norm', sa.String(length=200).with_variant(sa.String(length=200, collation='C'), 'postgresql'), nullable=True),
    sa.Column('country_code', sa.String(length=8), nullable=True),
    sa.Column('country_label', sa.String(length=100), nullable=True),
    sa.Column('department_code', sa.String(length=8), nullable=True),
    sa.Column('department_label', sa.String(length=100), nullable=True),
    sa.Column('phone', sa.String(length=40), nullable=True),
    sa.Column('phone2', sa.String(length=40), nullable=True),
    sa.Column('fax', sa.String(length=40), nullable=True),
    sa.Column('email', sa.String(length=320), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['principal_id'], ['principals.id'], name=op.f('fk_organisations_principal_id_principals')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_organisations')),
    sa.UniqueConstraint('principal_id', name=op.f('uq_organisations_principal_id')),
    sa.UniqueConstraint('structure_id', name=op.f('uq_organisations_structure_id'))
    )
    with op.batch_alter_table('organisations', schema=None) as batch_op:
        batch_op.create_index('ix_organisations_city_norm', ['city_norm'], unique=False)
        batch_op.create_index('ix_organisations_name_norm', ['name_norm'], unique=False)
        batch_op.create_index('ix_organisations_postcode', ['postcode'], unique=False)

    op.create_table('practitioners',
    sa.Column('principal_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('national_id', sa.String(length=32), nullable=False),
    sa.Column('id_type', sa.String(length=2), nullable=False),
    sa.Column('identifier', sa.String(length=20), nullable=False),
    sa.Column('civility_code', sa.String(length=8), nullable=True),
    sa.Column('civility_label', sa.String(length=60), nullable=True),
    sa.Column('exercise_civility_code', sa.String(length=8), nullable=True),
    sa.Column('exercise_civility_label', sa.String(length=60), nullable=True),
    sa.Column('last_name', sa.String(length=200), nullable=False),
    sa.Column('first_names', sa.String(length=200), nullable=True),
    sa.Column('name_norm', sa.String(length=400).with_variant(sa.String(length=400, collation='C'), 'postgresql'), nullable=False),
    sa.Column('given_name_norm', sa.String(length=400).with_variant(sa.String(length=400, collation='C'), 'postgresql'), nullable=False),
    sa.Column('profession_code', sa.String(length=8), nullable=True),
    sa.Column('profession_label', sa.String(length=200), nullable=True),
    sa.Column('profession_norm', sa.String(length=200).with_variant(sa.String(length=200, collation='C'), 'postgresql'), nullable=True),
    sa.Column('category_code', sa.String(length=8), nullable=True),
    sa.Column('category_label', sa.String(length=200), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['principal_id'], ['principals.id'], name=op.f('fk_practitioners_principal_id_principals')),
    sa.PrimaryKeyConstraint('principal_id', name=op.f('pk_practitioners')),
    sa.UniqueConstraint('national_id', name=op.f('uq_practitioners_national_id'))
    )
    with op.batch_alter_table('practitioners', schema=None) as batch_op:
        batch_op.create_index('ix_practitioners_given_name_norm', ['given_name_norm'], unique=False)
        batch_op.create_index('ix_practitioners_name_norm', ['name_norm'], unique=False)
        batch_op.create_index('ix_practitioners_profession_code', ['profession_code'], unique=False)
        batch_op.create_index('ix_practitioners_profession_norm', ['profession_norm'], unique=False)

    op.create_table('activities',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('practitioner_id', sa.Integer(), nullable=False),
    sa.Column('organisation_id', sa.Integer(), nullable=True),
    sa.Column('source_key', sa.String(length=200), nullable=False),
    sa.Column('mode_code', sa.String(length=8), nullable=True),
    sa.Column('mode_label', sa.String(length=200), nullable=True),
    sa.Column('sector_code', sa.String(length=8), nullable=True),
    sa.Column('sector_label', sa.String(length=200), nullable=True),
    sa.Column('role_code', sa.String(length=16), nullable=True),
    sa.Column('role_label', sa.String(length=200), nullable=True),
    sa.Column('genre_code', sa.String(length=16), nullable=True),
    sa.Column('genre_label', sa.String(length=200), nullable=True),
    sa.Column('section_code', sa.String(length=8), nullable=True),
    sa.Column('section_label', sa.String(length=200), nullable=True),
    sa.Column('registration_authority', sa.String(length=100), nullable=True),
    sa.Column('phone', sa.String(length=40), nullable=True),
    sa.Column('phone2', sa.String(length=40), nullable=True),
    sa.Column('fax', sa.String(length=40), nullable=True),
    sa.Column('email', sa.String(length=320), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['organisation_id'], ['organisations.id'], name=op.f('fk_activities_organisation_id_organisations')),
    sa.ForeignKeyConstraint(['practitioner_id'], ['practitioners.principal_id'], name=op.f('fk_activities_practitioner_id_practitioners'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_activities')),
    sa.UniqueConstraint('source_key', name=op.f('uq_activities_source_key'))
    )
    with op.batch_alter_table('activities', schema=None) as batch_op:
        batch_op.create_index('ix_activities_organisation_id', ['organisation_id'], unique=False)
        batch_op.create_index('ix_activities_practitioner_id', ['practitioner_id'], unique=False)

    op.create_table('certificates',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('principal_id', sa.Integer(), nullable=False),
    sa.Column('mailbox_id', sa.Integer(), nullable=True),
    sa.Column('usage', sa.String(length=8), nullable=False),
    sa.Column('der', sa.LargeBinary(), nullable=False),
    sa.Column('serial', sa.String(length=64), nullable=False),
    sa.Column('issuer_dn', sa.String(length=1000), nullable=False),
    sa.Column('subject_dn', sa.String(length=1000), nullable=False),
    sa.Column('not_after', sa.DateTime(timezone=True), nullable=False),
    sa.Column('status', sa.String(length=8), server_default='valid', nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('valid', 'revoked', 'expired')", name=op.f('ck_certificates_status')),
    sa.CheckConstraint("usage IN ('auth', 'sign', 'enc', 'org')", name=op.f('ck_certificates_usage')),
    sa.ForeignKeyConstraint(['mailbox_id'], ['mailboxes.id'], name=op.f('fk_certificates_mailbox_id_mailboxes')),
    sa.ForeignKeyConstraint(['principal_id'], ['principals.id'], name=op.f('fk_certificates_principal_id_principals')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_certificates')),
    sa.UniqueConstraint('fingerprint', name=op.f('uq_certificates_fingerprint'))
    )
    with op.batch_alter_table('certificates', schema=None) as batch_op:
        batch_op.create_index('ix_certificates_mailbox_id', ['mailbox_id'], unique=False)
        batch_op.create_index('ix_certificates_principal_id', ['principal_id'], unique=False)
        batch_op.create_index('ix_certificates_serial', ['serial'], unique=False)

    op.create_table('practitioner_skills',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('practitioner_id', sa.Integer(), nullable=False),
    sa.Column('source_key', sa.String(length=200), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('type_code', sa.String(length=16), nullable=True),
    sa.Column('type_label', sa.String(length=200), nullable=True),
    sa.Column('code', sa.String(length=32), nullable=False),
    sa.Column('label', sa.String(length=300), nullable=True),
    sa.Column('label_norm', sa.String(length=300).with_variant(sa.String(length=300, collation='C'), 'postgresql'), nullable=True),
    sa.CheckConstraint("kind IN ('savoir_faire', 'diploma', 'authorisation')", name=op.f('ck_practitioner_skills_kind')),
    sa.CheckConstraint("source IN ('activity', 'savoir_faire', 'diploma')", name=op.f('ck_practitioner_skills_source')),
    sa.ForeignKeyConstraint(['practitioner_id'], ['practitioners.principal_id'], name=op.f('fk_practitioner_skills_practitioner_id_practitioners'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_practitioner_skills')),
    sa.UniqueConstraint('source_key', name=op.f('uq_practitioner_skills_source_key'))
    )
    with op.batch_alter_table('practitioner_skills', schema=None) as batch_op:
        batch_op.create_index('ix_practitioner_skills_code', ['code'], unique=False)
        batch_op.create_index('ix_practitioner_skills_label_norm', ['label_norm'], unique=False)
        batch_op.create_index('ix_practitioner_skills_practitioner_id', ['practitioner_id'], unique=False)

    # Plain ALTER TABLE … ADD COLUMN, not a batch: on SQLite a batch rebuilds the table as soon as a
    # server default is an expression (sa.true()), and dropping the old mailboxes or principals table
    # fails the foreign keys of their folders, messages and grants.
    op.add_column('principals', sa.Column('name_norm', sa.String(length=400).with_variant(sa.String(length=400, collation='C'), 'postgresql'), nullable=True))
    op.create_index('ix_principals_name_norm', 'principals', ['name_norm'], unique=False)
    op.add_column('mailboxes', sa.Column('service', sa.String(length=300), nullable=True))
    op.add_column('mailboxes', sa.Column('responsible', sa.String(length=300), nullable=True))
    op.add_column('mailboxes', sa.Column('structure_id', sa.String(length=32), nullable=True))
    op.add_column('mailboxes', sa.Column('dematerialisation', sa.Boolean(), nullable=True))
    op.add_column('mailboxes', sa.Column('source', sa.String(length=8), server_default='local', nullable=False))
    op.add_column('mailboxes', sa.Column('hosted', sa.Boolean(), server_default=sa.true(), nullable=False))
    op.add_column('mailboxes', sa.Column('updated_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_mailboxes_mailbox_type', 'mailboxes', ['mailbox_type'], unique=False)
    op.create_index('ix_mailboxes_owner_id', 'mailboxes', ['owner_id'], unique=False)
    op.create_index('ix_mailboxes_source', 'mailboxes', ['source', 'active'], unique=False)
    op.create_index('ix_mailboxes_structure_id', 'mailboxes', ['structure_id'], unique=False)


def downgrade() -> None:
    # Plain ALTER TABLE … DROP COLUMN (SQLite ≥ 3.35), not a batch rebuild (see upgrade).
    for index in ('ix_mailboxes_structure_id', 'ix_mailboxes_source', 'ix_mailboxes_owner_id',
                  'ix_mailboxes_mailbox_type'):
        op.drop_index(index, table_name='mailboxes')
    for column in ('updated_at', 'hosted', 'source', 'dematerialisation', 'structure_id', 'responsible', 'service'):
        op.drop_column('mailboxes', column)
    op.drop_index('ix_principals_name_norm', table_name='principals')
    op.drop_column('principals', 'name_norm')

    with op.batch_alter_table('practitioner_skills', schema=None) as batch_op:
        batch_op.drop_index('ix_practitioner_skills_practitioner_id')
        batch_op.drop_index('ix_practitioner_skills_label_norm')
        batch_op.drop_index('ix_practitioner_skills_code')

    op.drop_table('practitioner_skills')
    with op.batch_alter_table('certificates', schema=None) as batch_op:
        batch_op.drop_index('ix_certificates_serial')
        batch_op.drop_index('ix_certificates_principal_id')
        batch_op.drop_index('ix_certificates_mailbox_id')

    op.drop_table('certificates')
    with op.batch_alter_table('activities', schema=None) as batch_op:
        batch_op.drop_index('ix_activities_practitioner_id')
        batch_op.drop_index('ix_activities_organisation_id')

    op.drop_table('activities')
    with op.batch_alter_table('practitioners', schema=None) as batch_op:
        batch_op.drop_index('ix_practitioners_profession_norm')
        batch_op.drop_index('ix_practitioners_profession_code')
        batch_op.drop_index('ix_practitioners_name_norm')
        batch_op.drop_index('ix_practitioners_given_name_norm')

    op.drop_table('practitioners')
    with op.batch_alter_table('organisations', schema=None) as batch_op:
        batch_op.drop_index('ix_organisations_postcode')
        batch_op.drop_index('ix_organisations_name_norm')
        batch_op.drop_index('ix_organisations_city_norm')

    op.drop_table('organisations')
    op.drop_table('directory_imports')
