"""Database tables of the directory. One `MetaData` serves every package (Alembic sees it whole)."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

principals = sa.Table(
    "principals",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),  # person | organisation
    sa.Column("national_id", sa.String(32), nullable=False, unique=True),
    sa.Column("display_name", sa.String(200), nullable=False),
    sa.Column("organisation", sa.String(200), nullable=True),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

mailboxes = sa.Table(
    "mailboxes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    # Address and type never change after creation (REFERENCE.md §1).
    sa.Column("address", sa.String(320), nullable=False, unique=True),
    sa.Column("mailbox_type", sa.String(3), nullable=False),  # PER | ORG | APP | CAB
    sa.Column("owner_id", sa.Integer, sa.ForeignKey("principals.id"), nullable=False),
    sa.Column("description", sa.String(200), nullable=True),
    sa.Column("liste_rouge", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("preference", sa.Integer, nullable=False, server_default="0"),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_login_at", sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("mailbox_type IN ('PER', 'ORG', 'APP', 'CAB')", name="mailbox_type"),
)

# Who besides the owner may use a mailbox (a CAB shared by a practice, an ORG read by a team).
mailbox_access = sa.Table(
    "mailbox_access",
    metadata,
    sa.Column("mailbox_id", sa.Integer, sa.ForeignKey("mailboxes.id"), primary_key=True),
    sa.Column("principal_id", sa.Integer, sa.ForeignKey("principals.id"), primary_key=True),
)
