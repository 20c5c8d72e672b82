"""Values of the directory that travel between packages.

The national directory's vocabulary follows the open-data files of the Annuaire Santé
(research/formats.md §1) and the ANS logical models of MSSanté mailboxes (AsBalMss*LogicalModel).
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

from directory.identifiers import PrincipalKind


class MailboxType(enum.Enum):
    """BAL types of the MSSanté directory (REFERENCE.md §1; nomenclature TRE_R257-TypeBAL)."""

    PER = "PER"  # personal: one practitioner
    ORG = "ORG"  # organisational: a service or team of a legal entity
    APP = "APP"  # applicative: software sending and receiving automatically
    CAB = "CAB"  # practice: shared by a private practice


class MailboxSource(enum.Enum):
    """Who manages a mailbox row: the national import, or this operator's administrators."""

    NATIONAL = "national"  # Extraction_Correspondance_MSSante; deactivated when it leaves the file
    LOCAL = "local"  # created here; never changed nor removed by an import


class SkillKind(enum.Enum):
    """What a practitioner's skill row records (research/formats.md §1.4–1.5)."""

    SAVOIR_FAIRE = "savoir_faire"  # spécialité ordinale (S), compétence (C), capacité (CAPA), …
    DIPLOMA = "diploma"  # diplôme obtenu
    AUTHORISATION = "authorisation"  # autorisation d'exercice (type and discipline)


class CertificateUsage(enum.Enum):
    """What a certificate's key is for: IGC-Santé issues one key pair per usage for persons, and
    organisation certificates for software (REFERENCE.md §1)."""

    AUTH = "auth"
    SIGN = "sign"
    ENC = "enc"
    ORG = "org"


class CertificateStatus(enum.Enum):
    VALID = "valid"
    REVOKED = "revoked"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Principal:
    id: int
    kind: PrincipalKind
    national_id: str
    display_name: str
    organisation: str | None = None


@dataclass(frozen=True)
class Mailbox:
    """A BAL. Address and type never change after creation (REFERENCE.md §1)."""

    id: int
    address: str
    mailbox_type: MailboxType
    owner_id: int
    description: str | None = None
    liste_rouge: bool = False
    preference: int = 0
    service: str | None = None  # serviceRattachement (ORG/APP)
    responsible: str | None = None  # responsable (ORG/APP)
    structure_id: str | None = None  # idnatStruct of the holding structure
    dematerialisation: bool | None = None
    source: MailboxSource = MailboxSource.LOCAL
    hosted: bool = True  # this operator hosts it (its domain is ours)


@dataclass(frozen=True)
class Practitioner:
    """A health professional of the RPPS/ADELI directory (PS_LibreAcces_Personne_activite)."""

    principal_id: int
    national_id: str  # "8" + RPPS or "0" + ADELI
    id_type: str
    identifier: str
    last_name: str
    first_names: str | None = None
    civility_code: str | None = None
    civility_label: str | None = None
    exercise_civility_code: str | None = None
    exercise_civility_label: str | None = None
    profession_code: str | None = None
    profession_label: str | None = None
    category_code: str | None = None
    category_label: str | None = None

    @property
    def rpps(self) -> str | None:
        """The RPPS number when the national id is an RPPS one."""
        return self.identifier if self.id_type == "8" else None


@dataclass(frozen=True)
class Skill:
    """A savoir-faire, diploma or exercise authorisation of a practitioner."""

    kind: SkillKind
    code: str
    label: str | None = None
    type_code: str | None = None
    type_label: str | None = None
    source: str = "activity"  # the file kind that carries it: activity | savoir_faire | diploma


@dataclass(frozen=True)
class Organisation:
    """A structure (site) of the directory, keyed by its structure national id."""

    id: int
    principal_id: int
    structure_id: str
    name: str | None = None
    trade_name: str | None = None
    technical_id: str | None = None
    finess: str | None = None
    finess_legal: str | None = None
    siret: str | None = None
    siren: str | None = None
    address: str | None = None
    postcode: str | None = None
    commune_code: str | None = None
    city: str | None = None
    country_code: str | None = None
    country_label: str | None = None
    department_code: str | None = None
    department_label: str | None = None
    phone: str | None = None
    phone2: str | None = None
    fax: str | None = None
    email: str | None = None


@dataclass(frozen=True)
class Activity:
    """One activity of a practitioner at a site, with the site's contact fields given by that line."""

    id: int
    practitioner_id: int
    organisation_id: int | None
    mode_code: str | None = None
    mode_label: str | None = None
    sector_code: str | None = None
    sector_label: str | None = None
    role_code: str | None = None
    role_label: str | None = None
    genre_code: str | None = None
    genre_label: str | None = None
    section_code: str | None = None
    section_label: str | None = None
    registration_authority: str | None = None
    phone: str | None = None
    phone2: str | None = None
    fax: str | None = None
    email: str | None = None


@dataclass(frozen=True)
class Certificate:
    """A certificate of a principal, optionally bound to one of its mailboxes."""

    id: int
    principal_id: int
    mailbox_id: int | None
    usage: CertificateUsage
    serial: str
    issuer_dn: str
    subject_dn: str
    not_after: dt.datetime
    status: CertificateStatus
    fingerprint: str
    der: bytes
