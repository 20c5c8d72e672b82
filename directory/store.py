"""The directory store: principals, mailboxes and who may use which mailbox."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from directory.identifiers import PrincipalKind
from directory.model import Mailbox, MailboxType, Principal
from directory.schema import mailbox_access, mailboxes, principals


def normalise_address(address: str) -> str:
    """Addresses compare case-insensitively in the domain and, by MSSanté practice, in the local part."""
    return address.strip().lower()


def _principal(row: sa.Row) -> Principal:
    return Principal(
        id=row.id,
        kind=PrincipalKind(row.kind),
        national_id=row.national_id,
        display_name=row.display_name,
        organisation=row.organisation,
    )


def _mailbox(row: sa.Row) -> Mailbox:
    return Mailbox(
        id=row.id,
        address=row.address,
        mailbox_type=MailboxType(row.mailbox_type),
        owner_id=row.owner_id,
        description=row.description,
        liste_rouge=row.liste_rouge,
        preference=row.preference,
    )


class DirectoryStore:
    """Reads and writes the directory tables through a synchronous SQLAlchemy engine."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    # -- reads --
    def principal_by_national_id(self, national_id: str) -> Principal | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(principals).where(
                    principals.c.national_id == national_id, principals.c.active.is_(True)
                )
            ).first()
        return _principal(row) if row else None

    def mailbox_by_address(self, address: str) -> Mailbox | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(mailboxes).where(
                    mailboxes.c.address == normalise_address(address), mailboxes.c.active.is_(True)
                )
            ).first()
        return _mailbox(row) if row else None

    def mailboxes_of(self, principal_id: int) -> list[Mailbox]:
        """Mailboxes the principal owns or was granted, by preference then address."""
        granted = sa.select(mailbox_access.c.mailbox_id).where(
            mailbox_access.c.principal_id == principal_id
        )
        query = (
            sa.select(mailboxes)
            .where(
                mailboxes.c.active.is_(True),
                sa.or_(mailboxes.c.owner_id == principal_id, mailboxes.c.id.in_(granted)),
            )
            .order_by(mailboxes.c.preference, mailboxes.c.address)
        )
        with self.engine.connect() as conn:
            return [_mailbox(r) for r in conn.execute(query)]

    def all_mailboxes(self) -> list[Mailbox]:
        with self.engine.connect() as conn:
            return [_mailbox(r) for r in conn.execute(sa.select(mailboxes).order_by(mailboxes.c.address))]

    # -- writes (administration; idempotent where it makes sense) --
    def add_principal(
        self,
        kind: PrincipalKind,
        national_id: str,
        display_name: str,
        organisation: str | None = None,
    ) -> Principal:
        existing = self.principal_by_national_id(national_id)
        if existing:
            return existing
        with self.engine.begin() as conn:
            pid = conn.execute(
                sa.insert(principals).values(
                    kind=kind.value,
                    national_id=national_id,
                    display_name=display_name,
                    organisation=organisation,
                    created_at=dt.datetime.now(dt.timezone.utc),
                )
            ).inserted_primary_key[0]
        return Principal(pid, kind, national_id, display_name, organisation)

    def add_mailbox(
        self,
        address: str,
        mailbox_type: MailboxType,
        owner: Principal,
        *,
        description: str | None = None,
        liste_rouge: bool = False,
        preference: int = 0,
    ) -> Mailbox:
        address = normalise_address(address)
        existing = self.mailbox_by_address(address)
        if existing:
            if existing.mailbox_type is not mailbox_type or existing.owner_id != owner.id:
                raise ValueError(f"mailbox {address} already exists with another type or owner")
            return existing
        with self.engine.begin() as conn:
            mid = conn.execute(
                sa.insert(mailboxes).values(
                    address=address,
                    mailbox_type=mailbox_type.value,
                    owner_id=owner.id,
                    description=description,
                    liste_rouge=liste_rouge,
                    preference=preference,
                    created_at=dt.datetime.now(dt.timezone.utc),
                )
            ).inserted_primary_key[0]
        return Mailbox(mid, address, mailbox_type, owner.id, description, liste_rouge, preference)

    def grant(self, mailbox: Mailbox, principal: Principal) -> None:
        with self.engine.begin() as conn:
            exists = conn.execute(
                sa.select(mailbox_access).where(
                    mailbox_access.c.mailbox_id == mailbox.id,
                    mailbox_access.c.principal_id == principal.id,
                )
            ).first()
            if not exists:
                conn.execute(
                    sa.insert(mailbox_access).values(mailbox_id=mailbox.id, principal_id=principal.id)
                )
