"""Values of the directory that travel between packages."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from directory.identifiers import PrincipalKind


class MailboxType(enum.Enum):
    """BAL types of the MSSanté directory (REFERENCE.md §1)."""

    PER = "PER"  # personal: one practitioner
    ORG = "ORG"  # organisational: a service or team of a legal entity
    APP = "APP"  # applicative: software sending and receiving automatically
    CAB = "CAB"  # practice: shared by a private practice


@dataclass(frozen=True)
class Principal:
    id: int
    kind: PrincipalKind
    national_id: str
    display_name: str
    organisation: str | None = None


@dataclass(frozen=True)
class Mailbox:
    id: int
    address: str
    mailbox_type: MailboxType
    owner_id: int
    description: str | None = None
    liste_rouge: bool = False
    preference: int = 0
