"""Database tables of the directory. One `MetaData` serves every package (Alembic sees it whole).

`principals`, `mailboxes` and `mailbox_access` are what the mail server logs in with and delivers to.
The national directory (REFERENCE.md §3–4, research/formats.md §1) adds practitioners (RPPS/ADELI
persons), their skills, organisations (sites), activities (practitioner × site), the MSSanté columns of
mailboxes, certificates and the log of national imports.

Normalised columns (`*_norm`) hold lower-case ASCII words separated by one space
(`directory.importers.text.normalise`); searches match them by prefix with a range condition
(`col >= 'abc' AND col < 'abd'`), which an ordinary B-tree index answers only under a byte-wise
collation: SQLite's default, and `COLLATE "C"` on PostgreSQL (see `NormText`).
"""

from __future__ import annotations

import sqlalchemy as sa


def NormText(length: int) -> sa.types.TypeEngine[str]:
    """A normalised search column: byte-wise order on every backend, so that prefix ranges use indexes."""
    return sa.String(length).with_variant(sa.String(length, collation="C"), "postgresql")


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
    # The holder's name normalised for search ("last first" for a person when known), so that principals
    # without practitioner or organisation data (a holder of an MSSanté mailbox only) are found by name.
    sa.Column("name_norm", NormText(400), nullable=True),
    sa.Index("ix_principals_name_norm", "name_norm"),
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
    # MSSanté attributes of a BAL (ANS logical models AsBalMss{Per,Org,App,Cab}; research/formats.md §1.7).
    sa.Column("service", sa.String(300), nullable=True),  # serviceRattachement (ORG/APP)
    sa.Column("responsible", sa.String(300), nullable=True),  # responsable (ORG/APP)
    sa.Column("structure_id", sa.String(32), nullable=True),  # idnatStruct of the holding structure
    sa.Column("dematerialisation", sa.Boolean, nullable=True),  # "Dématérialisation" True/False
    # national: written by the import of Extraction_Correspondance_MSSante (removed ones are deactivated);
    # local: created by this operator, never touched by an import. Only the store and the importer write
    # it; no CHECK constraint, because SQLite adds one only by rebuilding the table, which the folders
    # and messages of existing mailboxes refer to.
    sa.Column("source", sa.String(8), nullable=False, server_default="local"),
    # Whether this operator hosts the mailbox (its domain is one of ours). The national extraction lists
    # the mailboxes of every operator: only hosted ones may log in here and receive mail here.
    sa.Column("hosted", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("mailbox_type IN ('PER', 'ORG', 'APP', 'CAB')", name="mailbox_type"),
    sa.Index("ix_mailboxes_owner_id", "owner_id"),
    sa.Index("ix_mailboxes_mailbox_type", "mailbox_type"),
    sa.Index("ix_mailboxes_structure_id", "structure_id"),
    sa.Index("ix_mailboxes_source", "source", "active"),
)

# Who besides the owner may use a mailbox (a CAB shared by a practice, an ORG read by a team).
mailbox_access = sa.Table(
    "mailbox_access",
    metadata,
    sa.Column("mailbox_id", sa.Integer, sa.ForeignKey("mailboxes.id"), primary_key=True),
    sa.Column("principal_id", sa.Integer, sa.ForeignKey("principals.id"), primary_key=True),
)

# -- the national directory (PS_LibreAcces_* files, research/formats.md §1.3–1.5) --

# A health professional of the RPPS/ADELI directory, 1:1 with a `principals` row of kind person whose
# national id is "8" + RPPS or "0" + ADELI ("Identification nationale PP", REFERENCE.md §3).
practitioners = sa.Table(
    "practitioners",
    metadata,
    sa.Column("principal_id", sa.Integer, sa.ForeignKey("principals.id"), primary_key=True,
              autoincrement=False),
    sa.Column("national_id", sa.String(32), nullable=False, unique=True),  # = principals.national_id
    sa.Column("id_type", sa.String(2), nullable=False),  # "8" RPPS | "0" ADELI
    sa.Column("identifier", sa.String(20), nullable=False),  # the bare RPPS or ADELI number
    sa.Column("civility_code", sa.String(8), nullable=True),  # Code civilité (M, MME)
    sa.Column("civility_label", sa.String(60), nullable=True),
    sa.Column("exercise_civility_code", sa.String(8), nullable=True),  # Code civilité d'exercice (DR, PR)
    sa.Column("exercise_civility_label", sa.String(60), nullable=True),
    sa.Column("last_name", sa.String(200), nullable=False),  # Nom d'exercice
    sa.Column("first_names", sa.String(200), nullable=True),  # Prénom d'exercice
    sa.Column("name_norm", NormText(400), nullable=False),  # "last first", normalised
    sa.Column("given_name_norm", NormText(400), nullable=False),  # "first last", normalised
    sa.Column("profession_code", sa.String(8), nullable=True),  # 10 Médecin, 26 Audioprothésiste…
    sa.Column("profession_label", sa.String(200), nullable=True),
    sa.Column("profession_norm", NormText(200), nullable=True),
    sa.Column("category_code", sa.String(8), nullable=True),  # C Civil…
    sa.Column("category_label", sa.String(200), nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_practitioners_name_norm", "name_norm"),
    sa.Index("ix_practitioners_given_name_norm", "given_name_norm"),
    sa.Index("ix_practitioners_profession_code", "profession_code"),
    sa.Index("ix_practitioners_profession_norm", "profession_norm"),
)

# Savoir-faire (specialties, competences…), diplomas and exercise authorisations of a practitioner.
# `source` names the file that carries the row: each import replaces only the rows of its own file.
practitioner_skills = sa.Table(
    "practitioner_skills",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("practitioner_id", sa.Integer,
              sa.ForeignKey("practitioners.principal_id", ondelete="CASCADE"), nullable=False),
    sa.Column("source_key", sa.String(200), nullable=False, unique=True),
    sa.Column("source", sa.String(16), nullable=False),  # activity | savoir_faire | diploma
    sa.Column("kind", sa.String(16), nullable=False),  # savoir_faire | diploma | authorisation
    sa.Column("type_code", sa.String(16), nullable=True),  # S Spécialité ordinale, C Compétence, DE…
    sa.Column("type_label", sa.String(200), nullable=True),
    sa.Column("code", sa.String(32), nullable=False),  # SM53…
    sa.Column("label", sa.String(300), nullable=True),
    sa.Column("label_norm", NormText(300), nullable=True),
    sa.CheckConstraint("source IN ('activity', 'savoir_faire', 'diploma')", name="source"),
    sa.CheckConstraint("kind IN ('savoir_faire', 'diploma', 'authorisation')", name="kind"),
    sa.Index("ix_practitioner_skills_practitioner_id", "practitioner_id"),
    sa.Index("ix_practitioner_skills_code", "code"),
    sa.Index("ix_practitioner_skills_label_norm", "label_norm"),
)

# A structure where practitioners work (a "site"), keyed by its structure national id (prefix + id:
# 1 FINESS, 3 SIRET, 0 ADELI cabinet, 4 RPPS cabinet; REFERENCE.md §3). Each one has a `principals` row of
# kind organisation so that its organisation certificates can log in.
organisations = sa.Table(
    "organisations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("principal_id", sa.Integer, sa.ForeignKey("principals.id"), nullable=False, unique=True),
    sa.Column("structure_id", sa.String(32), nullable=False, unique=True),  # = principals.national_id
    sa.Column("technical_id", sa.String(32), nullable=True),  # Identifiant technique de la structure
    sa.Column("finess", sa.String(9), nullable=True),  # Numéro FINESS site
    sa.Column("finess_legal", sa.String(9), nullable=True),  # Numéro FINESS établissement juridique
    sa.Column("siret", sa.String(14), nullable=True),
    sa.Column("siren", sa.String(9), nullable=True),
    sa.Column("name", sa.String(300), nullable=True),  # Raison sociale site
    sa.Column("trade_name", sa.String(300), nullable=True),  # Enseigne commerciale site
    sa.Column("name_norm", NormText(300), nullable=True),
    sa.Column("address", sa.String(1000), nullable=True),  # postal lines L2–L7, one per line
    sa.Column("postcode", NormText(16), nullable=True),
    sa.Column("commune_code", sa.String(8), nullable=True),  # COG
    sa.Column("city", sa.String(200), nullable=True),
    sa.Column("city_norm", NormText(200), nullable=True),
    sa.Column("country_code", sa.String(8), nullable=True),
    sa.Column("country_label", sa.String(100), nullable=True),
    sa.Column("department_code", sa.String(8), nullable=True),
    sa.Column("department_label", sa.String(100), nullable=True),
    sa.Column("phone", sa.String(40), nullable=True),
    sa.Column("phone2", sa.String(40), nullable=True),
    sa.Column("fax", sa.String(40), nullable=True),
    sa.Column("email", sa.String(320), nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_organisations_name_norm", "name_norm"),
    sa.Index("ix_organisations_postcode", "postcode"),
    sa.Index("ix_organisations_city_norm", "city_norm"),
)

# One activity of a practitioner at a site (one line of PS_LibreAcces_Personne_activite), with the contact
# fields of the site as that line gives them.
activities = sa.Table(
    "activities",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("practitioner_id", sa.Integer,
              sa.ForeignKey("practitioners.principal_id", ondelete="CASCADE"), nullable=False),
    sa.Column("organisation_id", sa.Integer, sa.ForeignKey("organisations.id"), nullable=True),
    sa.Column("source_key", sa.String(200), nullable=False, unique=True),
    sa.Column("mode_code", sa.String(8), nullable=True),  # Code mode exercice: L Libéral, S Salarié…
    sa.Column("mode_label", sa.String(200), nullable=True),
    sa.Column("sector_code", sa.String(8), nullable=True),  # Code secteur d'activité: SA01…
    sa.Column("sector_label", sa.String(200), nullable=True),
    sa.Column("role_code", sa.String(16), nullable=True),  # Code rôle / Code fonction (56-column files)
    sa.Column("role_label", sa.String(200), nullable=True),
    sa.Column("genre_code", sa.String(16), nullable=True),  # Code genre (d')activité (56-column files)
    sa.Column("genre_label", sa.String(200), nullable=True),
    sa.Column("section_code", sa.String(8), nullable=True),  # section tableau pharmaciens
    sa.Column("section_label", sa.String(200), nullable=True),
    sa.Column("registration_authority", sa.String(100), nullable=True),  # Autorité d'enregistrement
    sa.Column("phone", sa.String(40), nullable=True),
    sa.Column("phone2", sa.String(40), nullable=True),
    sa.Column("fax", sa.String(40), nullable=True),
    sa.Column("email", sa.String(320), nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_activities_practitioner_id", "practitioner_id"),
    sa.Index("ix_activities_organisation_id", "organisation_id"),
)

# Certificates of a principal (IGC-Santé issues one key pair per usage; organisation certificates are
# used by software, REFERENCE.md §1), optionally bound to one mailbox.
certificates = sa.Table(
    "certificates",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("principal_id", sa.Integer, sa.ForeignKey("principals.id"), nullable=False),
    sa.Column("mailbox_id", sa.Integer, sa.ForeignKey("mailboxes.id"), nullable=True),
    sa.Column("usage", sa.String(8), nullable=False),  # auth | sign | enc | org
    sa.Column("der", sa.LargeBinary, nullable=False),
    sa.Column("serial", sa.String(64), nullable=False),  # hexadecimal, upper case
    sa.Column("issuer_dn", sa.String(1000), nullable=False),  # RFC 4514
    sa.Column("subject_dn", sa.String(1000), nullable=False),
    sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
    sa.Column("status", sa.String(8), nullable=False, server_default="valid"),
    sa.Column("fingerprint", sa.String(64), nullable=False, unique=True),  # SHA-256 of the DER, hex
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("usage IN ('auth', 'sign', 'enc', 'org')", name="usage"),
    sa.CheckConstraint("status IN ('valid', 'revoked', 'expired')", name="status"),
    sa.Index("ix_certificates_principal_id", "principal_id"),
    sa.Index("ix_certificates_mailbox_id", "mailbox_id"),
    sa.Index("ix_certificates_serial", "serial"),
)

# One row per national file applied: what, when and what it changed (written in the import transaction).
directory_imports = sa.Table(
    "directory_imports",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(64), nullable=False),  # FileKind value, e.g. "PS_LibreAcces_SavoirFaire"
    sa.Column("file_name", sa.String(255), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("lines", sa.Integer, nullable=False, server_default="0"),
    sa.Column("added", sa.Integer, nullable=False, server_default="0"),
    sa.Column("changed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("removed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rejected", sa.Integer, nullable=False, server_default="0"),
    sa.Column("warnings", sa.Integer, nullable=False, server_default="0"),
)

# -- publication to OpenLDAP (`caducee directory publish`, directory.ldap_sync) --

# A server and base DN the directory is published to ("host:port/base", normalised).
ldap_targets = sa.Table(
    "ldap_targets",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("target", sa.String(600), nullable=False, unique=True),
    sa.Column("url", sa.String(300), nullable=False),  # as last given
    sa.Column("base", sa.String(300), nullable=False),
    sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),  # last run that reached the end
    sa.Column("full_at", sa.DateTime(timezone=True), nullable=True),  # last --full run that reached the end
)

# Every entry published to a target, as the server last acknowledged it: the next run sends only what
# differs from this.
ldap_published = sa.Table(
    "ldap_published",
    metadata,
    sa.Column("target_id", sa.Integer, sa.ForeignKey("ldap_targets.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("dn_key", sa.String(64), primary_key=True),  # SHA-256 of the normalised DN, hex
    sa.Column("dn", sa.String(1000), nullable=False),  # as sent
    sa.Column("depth", sa.Integer, nullable=False),  # number of RDNs: deletes go deepest first
    sa.Column("digest", sa.String(64), nullable=False),  # SHA-256 of the normalised attributes, hex
)
