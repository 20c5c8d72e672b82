"""The directory store: principals, mailboxes, who may use which mailbox, and the national directory.

The mail server logs in and checks recipients through `principal_by_national_id`, `mailboxes_of` and
`mailbox_by_address`: they see active mailboxes this operator hosts only. The national MSSanté
extraction (`directory.importers`) also brings the mailboxes of every other operator, for the directory
search; those are never a login's mailboxes nor a local recipient.

A mailbox's address and type never change after creation (REFERENCE.md §1): no method here changes
them, and `update_mailbox` refuses to.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import sqlalchemy as sa
from cryptography import x509

from directory.identifiers import PrincipalKind
from directory.importers.text import normalise
from directory.model import (
    Activity,
    Certificate,
    CertificateStatus,
    CertificateUsage,
    Mailbox,
    MailboxSource,
    MailboxType,
    Organisation,
    Practitioner,
    Principal,
    Skill,
    SkillKind,
)
from directory.schema import (
    activities,
    certificates,
    mailbox_access,
    mailboxes,
    organisations,
    practitioner_skills,
    practitioners,
    principals,
)

# What `update_mailbox` may change; the address, the type and the holder are fixed at creation.
MUTABLE_MAILBOX_FIELDS = frozenset({
    "description", "liste_rouge", "preference", "service", "responsible", "structure_id",
    "dematerialisation", "active",
})
IMMUTABLE_MAILBOX_FIELDS = frozenset({"address", "mailbox_type", "owner_id"})


class ImmutableMailboxField(ValueError):
    """An attempt to change a mailbox's address, type or holder (REFERENCE.md §1)."""


def normalise_address(address: str) -> str:
    """Addresses compare case-insensitively in the domain and, by MSSanté practice, in the local part."""
    return address.strip().lower()


def _principal(row: sa.Row[Any]) -> Principal:
    return Principal(
        id=row.id,
        kind=PrincipalKind(row.kind),
        national_id=row.national_id,
        display_name=row.display_name,
        organisation=row.organisation,
    )


def mailbox_from_row(row: sa.Row[Any]) -> Mailbox:
    """A `Mailbox` from a row holding the columns of `mailboxes`."""
    return Mailbox(
        id=row.id,
        address=row.address,
        mailbox_type=MailboxType(row.mailbox_type),
        owner_id=row.owner_id,
        description=row.description,
        liste_rouge=bool(row.liste_rouge),
        preference=row.preference,
        service=row.service,
        responsible=row.responsible,
        structure_id=row.structure_id,
        dematerialisation=None if row.dematerialisation is None else bool(row.dematerialisation),
        source=MailboxSource(row.source),
        hosted=bool(row.hosted),
    )


_mailbox = mailbox_from_row


def practitioner_from_row(row: sa.Row[Any]) -> Practitioner:
    """A `Practitioner` from a row holding the columns of `practitioners`."""
    return Practitioner(
        principal_id=row.principal_id, national_id=row.national_id, id_type=row.id_type,
        identifier=row.identifier, last_name=row.last_name, first_names=row.first_names,
        civility_code=row.civility_code, civility_label=row.civility_label,
        exercise_civility_code=row.exercise_civility_code, exercise_civility_label=row.exercise_civility_label,
        profession_code=row.profession_code, profession_label=row.profession_label,
        category_code=row.category_code, category_label=row.category_label,
    )


def organisation_from_row(row: Any) -> Organisation:
    """An `Organisation` from a row (or any object) with the attributes of the `organisations` columns."""
    return Organisation(
        id=row.id, principal_id=row.principal_id, structure_id=row.structure_id, name=row.name,
        trade_name=row.trade_name, technical_id=row.technical_id, finess=row.finess,
        finess_legal=row.finess_legal, siret=row.siret, siren=row.siren, address=row.address,
        postcode=row.postcode, commune_code=row.commune_code, city=row.city, country_code=row.country_code,
        country_label=row.country_label, department_code=row.department_code,
        department_label=row.department_label, phone=row.phone, phone2=row.phone2, fax=row.fax, email=row.email,
    )


def activity_from_row(row: sa.Row[Any]) -> Activity:
    """An `Activity` from a row holding the columns of `activities`."""
    return Activity(
        id=row.id, practitioner_id=row.practitioner_id, organisation_id=row.organisation_id,
        mode_code=row.mode_code, mode_label=row.mode_label, sector_code=row.sector_code,
        sector_label=row.sector_label, role_code=row.role_code, role_label=row.role_label,
        genre_code=row.genre_code, genre_label=row.genre_label, section_code=row.section_code,
        section_label=row.section_label, registration_authority=row.registration_authority,
        phone=row.phone, phone2=row.phone2, fax=row.fax, email=row.email,
    )


def skill_from_row(row: sa.Row[Any]) -> Skill:
    """A `Skill` from a row holding the columns of `practitioner_skills`."""
    return Skill(kind=SkillKind(row.kind), code=row.code, label=row.label, type_code=row.type_code,
                 type_label=row.type_label, source=row.source)


def _certificate(row: sa.Row[Any]) -> Certificate:
    not_after = row.not_after
    if not_after.tzinfo is None:  # SQLite returns naive datetimes; they are stored in UTC
        not_after = not_after.replace(tzinfo=dt.UTC)
    return Certificate(
        id=row.id, principal_id=row.principal_id, mailbox_id=row.mailbox_id, usage=CertificateUsage(row.usage),
        serial=row.serial, issuer_dn=row.issuer_dn, subject_dn=row.subject_dn, not_after=not_after,
        status=CertificateStatus(row.status), fingerprint=row.fingerprint, der=bytes(row.der),
    )


_SERVED = sa.and_(mailboxes.c.active.is_(True), mailboxes.c.hosted.is_(True))


# Constant statements of the hot paths (one per RCPT): compiled once, then only executed.
_SERVED_BY_ADDRESS = sa.select(mailboxes).where(mailboxes.c.address == sa.bindparam("address"), _SERVED)
# ... and one per login (every connection of a sender's software):
_ACTIVE_PRINCIPAL = sa.select(principals).where(principals.c.national_id == sa.bindparam("national_id"),
                                                principals.c.active.is_(True))
_MAILBOXES_OF = (
    sa.select(mailboxes)
    .where(_SERVED, sa.or_(mailboxes.c.owner_id == sa.bindparam("principal_id"), mailboxes.c.id.in_(
        sa.select(mailbox_access.c.mailbox_id).where(mailbox_access.c.principal_id == sa.bindparam("principal_id"))
    )))
    .order_by(mailboxes.c.preference, mailboxes.c.address)
)


class DirectoryStore:
    """Reads and writes the directory tables through a synchronous SQLAlchemy engine."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    # -- reads used by the mail server --
    def principal_by_national_id(self, national_id: str) -> Principal | None:
        with self.engine.connect() as conn:
            row = conn.execute(_ACTIVE_PRINCIPAL, {"national_id": national_id}).first()
        return _principal(row) if row else None

    def mailbox_by_address(self, address: str) -> Mailbox | None:
        """The active mailbox this operator hosts at `address` (recipient checks, delivery)."""
        with self.engine.connect() as conn:
            row = conn.execute(_SERVED_BY_ADDRESS, {"address": normalise_address(address)}).first()
        return _mailbox(row) if row else None

    def login_view(self, national_id: str) -> tuple[Principal, list[Mailbox]] | None:
        """`principal_by_national_id` and its `mailboxes_of`, on one connection (a login's two reads: one
        pool checkout and reset instead of two)."""
        with self.engine.connect() as conn:
            row = conn.execute(_ACTIVE_PRINCIPAL, {"national_id": national_id}).first()
            if row is None:
                return None
            principal = _principal(row)
            return principal, [_mailbox(r) for r in conn.execute(_MAILBOXES_OF, {"principal_id": principal.id})]

    def mailboxes_of(self, principal_id: int) -> list[Mailbox]:
        """Hosted mailboxes the principal owns or was granted, by preference then address."""
        with self.engine.connect() as conn:
            return [_mailbox(r) for r in conn.execute(_MAILBOXES_OF, {"principal_id": principal_id})]

    def all_mailboxes(self, *, hosted_only: bool = True) -> list[Mailbox]:
        """Every mailbox by address: those this operator hosts, or with `hosted_only=False` also the
        other operators' ones from the national extraction (active or not)."""
        query = sa.select(mailboxes).order_by(mailboxes.c.address)
        if hosted_only:
            query = query.where(mailboxes.c.hosted.is_(True))
        with self.engine.connect() as conn:
            return [_mailbox(r) for r in conn.execute(query)]

    # -- reads of the national directory --
    def principal(self, principal_id: int) -> Principal | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(principals).where(principals.c.id == principal_id)).first()
        return _principal(row) if row else None

    def mailbox(self, address: str) -> Mailbox | None:
        """The mailbox at `address` whoever hosts it, active or not (administration, directory)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(mailboxes).where(mailboxes.c.address == normalise_address(address))
            ).first()
        return _mailbox(row) if row else None

    def practitioner(self, national_id: str) -> Practitioner | None:
        """The practitioner whose national id is `national_id` ("8" + RPPS or "0" + ADELI)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(practitioners).where(practitioners.c.national_id == national_id)
            ).first()
        return practitioner_from_row(row) if row else None

    def skills_of(self, practitioner_id: int) -> list[Skill]:
        query = (sa.select(practitioner_skills).where(practitioner_skills.c.practitioner_id == practitioner_id)
                 .order_by(practitioner_skills.c.kind, practitioner_skills.c.code, practitioner_skills.c.source))
        with self.engine.connect() as conn:
            return [skill_from_row(r) for r in conn.execute(query)]

    def activities_of(self, practitioner_id: int) -> list[Activity]:
        query = (sa.select(activities).where(activities.c.practitioner_id == practitioner_id)
                 .order_by(activities.c.id))
        with self.engine.connect() as conn:
            return [activity_from_row(r) for r in conn.execute(query)]

    def organisation(self, structure_id: str) -> Organisation | None:
        """The organisation whose structure national id is `structure_id` (e.g. "1" + FINESS)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(organisations).where(organisations.c.structure_id == structure_id)
            ).first()
        return organisation_from_row(row) if row else None

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
                    name_norm=normalise(display_name)[:400] or None,
                    created_at=dt.datetime.now(dt.UTC),
                )
            ).inserted_primary_key[0]  # type: ignore[index]
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
        service: str | None = None,
        responsible: str | None = None,
        structure_id: str | None = None,
        dematerialisation: bool | None = None,
    ) -> Mailbox:
        """Create a local mailbox hosted here; idempotent for the same address, type and holder."""
        address = normalise_address(address)
        existing = self.mailbox(address)
        if existing:
            if existing.mailbox_type is not mailbox_type or existing.owner_id != owner.id:
                raise ValueError(f"mailbox {address} already exists with another type or owner")
            return existing
        now = dt.datetime.now(dt.UTC)
        with self.engine.begin() as conn:
            mid = conn.execute(
                sa.insert(mailboxes).values(
                    address=address,
                    mailbox_type=mailbox_type.value,
                    owner_id=owner.id,
                    description=description,
                    liste_rouge=liste_rouge,
                    preference=preference,
                    service=service,
                    responsible=responsible,
                    structure_id=structure_id,
                    dematerialisation=dematerialisation,
                    source=MailboxSource.LOCAL.value,
                    hosted=True,
                    created_at=now,
                    updated_at=now,
                )
            ).inserted_primary_key[0]  # type: ignore[index]
        return Mailbox(mid, address, mailbox_type, owner.id, description, liste_rouge, preference, service,
                       responsible, structure_id, dematerialisation, MailboxSource.LOCAL, True)

    def update_mailbox(self, address: str, /, **changes: Any) -> Mailbox:
        """Change the mutable attributes of a mailbox (`MUTABLE_MAILBOX_FIELDS`).

        The address, type and holder never change (REFERENCE.md §1): asking to is an
        `ImmutableMailboxField` error. A national mailbox changed here is set back by the next import
        when the national file says otherwise.
        """
        fixed = IMMUTABLE_MAILBOX_FIELDS & changes.keys()
        if fixed:
            raise ImmutableMailboxField(
                f"mailbox {normalise_address(address)}: {', '.join(sorted(fixed))} cannot change after creation")
        unknown = changes.keys() - MUTABLE_MAILBOX_FIELDS
        if unknown:
            raise ValueError(f"unknown mailbox field(s): {', '.join(sorted(unknown))}")
        address = normalise_address(address)
        with self.engine.begin() as conn:
            if changes:
                conn.execute(sa.update(mailboxes).where(mailboxes.c.address == address).values(
                    **changes, updated_at=dt.datetime.now(dt.UTC)))
            row = conn.execute(sa.select(mailboxes).where(mailboxes.c.address == address)).first()
        if row is None:
            raise LookupError(f"no mailbox {address}")
        return _mailbox(row)

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

    # -- certificates --
    def add_certificate(self, principal: Principal, der: bytes, usage: CertificateUsage,
                        mailbox: Mailbox | None = None) -> Certificate:
        """Record a certificate of `principal` (idempotent by SHA-256 fingerprint).

        Persons hold auth/sign/enc certificates, organisations "org" ones (REFERENCE.md §1); a bound
        mailbox must be one the principal owns or was granted. The status starts as valid, or expired
        when the certificate's validity has already ended.
        """
        cert = x509.load_der_x509_certificate(der)
        expected = PrincipalKind.ORGANISATION if usage is CertificateUsage.ORG else PrincipalKind.PERSON
        if principal.kind is not expected:
            raise ValueError(f"a {usage.value} certificate belongs to a {expected.value}, "
                             f"not to {principal.kind.value} {principal.national_id}")
        fingerprint = hashlib.sha256(der).hexdigest()
        not_after = cert.not_valid_after_utc
        now = dt.datetime.now(dt.UTC)
        with self.engine.begin() as conn:
            if mailbox is not None:
                allowed = conn.execute(sa.select(sa.literal(1)).where(sa.or_(
                    sa.exists().where(mailboxes.c.id == mailbox.id, mailboxes.c.owner_id == principal.id),
                    sa.exists().where(mailbox_access.c.mailbox_id == mailbox.id,
                                      mailbox_access.c.principal_id == principal.id),
                ))).first()
                if allowed is None:
                    raise ValueError(f"mailbox {mailbox.address} is not one of {principal.national_id}'s")
            row = conn.execute(sa.select(certificates).where(certificates.c.fingerprint == fingerprint)).first()
            if row is None:
                conn.execute(sa.insert(certificates).values(
                    principal_id=principal.id, mailbox_id=mailbox.id if mailbox else None, usage=usage.value,
                    der=der, serial=format(cert.serial_number, "X"), issuer_dn=cert.issuer.rfc4514_string(),
                    subject_dn=cert.subject.rfc4514_string(), not_after=not_after,
                    status=(CertificateStatus.EXPIRED if not_after <= now else CertificateStatus.VALID).value,
                    fingerprint=fingerprint, created_at=now,
                ))
                row = conn.execute(
                    sa.select(certificates).where(certificates.c.fingerprint == fingerprint)).first()
        assert row is not None
        return _certificate(row)

    def certificates_of(self, principal_id: int, usage: CertificateUsage | None = None,
                        *, valid_only: bool = False) -> list[Certificate]:
        """The principal's certificates, latest expiry first."""
        query = sa.select(certificates).where(certificates.c.principal_id == principal_id)
        if usage is not None:
            query = query.where(certificates.c.usage == usage.value)
        if valid_only:
            query = query.where(certificates.c.status == CertificateStatus.VALID.value,
                                certificates.c.not_after > dt.datetime.now(dt.UTC))
        with self.engine.connect() as conn:
            return [_certificate(r) for r in conn.execute(
                query.order_by(certificates.c.not_after.desc(), certificates.c.id))]

    def certificate_by_fingerprint(self, fingerprint: str) -> Certificate | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(certificates).where(
                certificates.c.fingerprint == fingerprint.lower())).first()
        return _certificate(row) if row else None

    def set_certificate_status(self, fingerprint: str, status: CertificateStatus) -> bool:
        """Mark a certificate revoked or expired (or valid again); False when it is unknown."""
        with self.engine.begin() as conn:
            result = conn.execute(sa.update(certificates).where(
                certificates.c.fingerprint == fingerprint.lower()).values(status=status.value))
        return bool(result.rowcount)

    # -- national directory rows written here (demo directory, administration); idempotent --
    def add_practitioner(
        self,
        principal: Principal,
        *,
        last_name: str,
        first_names: str | None = None,
        profession_code: str | None = None,
        profession_label: str | None = None,
        category_code: str | None = "C",
        category_label: str | None = "Civil",
        civility_code: str | None = None,
        civility_label: str | None = None,
        exercise_civility_code: str | None = None,
        exercise_civility_label: str | None = None,
    ) -> Practitioner:
        """The practitioner row of a person principal whose national id is "8" + RPPS or "0" + ADELI.

        An existing row is returned unchanged (the national import, not this method, keeps it current).
        """
        existing = self.practitioner(principal.national_id)
        if existing:
            return existing
        nid = principal.national_id
        if principal.kind is not PrincipalKind.PERSON or nid[:1] not in ("8", "0") or len(nid) < 2:
            raise ValueError(f"{nid} is not the national id of a person (8 + RPPS or 0 + ADELI)")
        last, first = normalise(last_name), normalise(first_names or "")
        with self.engine.begin() as conn:
            conn.execute(sa.insert(practitioners).values(
                principal_id=principal.id, national_id=nid, id_type=nid[0], identifier=nid[1:],
                civility_code=civility_code, civility_label=civility_label,
                exercise_civility_code=exercise_civility_code, exercise_civility_label=exercise_civility_label,
                last_name=last_name, first_names=first_names, name_norm=f"{last} {first}".strip()[:400],
                given_name_norm=f"{first} {last}".strip()[:400], profession_code=profession_code,
                profession_label=profession_label, profession_norm=normalise(profession_label or "") or None,
                category_code=category_code, category_label=category_label, updated_at=dt.datetime.now(dt.UTC),
            ))
        found = self.practitioner(nid)
        assert found is not None
        return found

    def add_organisation(
        self,
        principal: Principal,
        *,
        name: str,
        finess: str | None = None,
        siret: str | None = None,
        address: str | None = None,
        postcode: str | None = None,
        commune_code: str | None = None,
        city: str | None = None,
        department_code: str | None = None,
        department_label: str | None = None,
        phone: str | None = None,
        email: str | None = None,
    ) -> Organisation:
        """The organisation (site) row of an organisation principal, keyed by its structure national id.

        An existing row is returned unchanged. `address` holds the postal lines, one per line.
        """
        existing = self.organisation(principal.national_id)
        if existing:
            return existing
        if principal.kind is not PrincipalKind.ORGANISATION:
            raise ValueError(f"{principal.national_id} is not an organisation")
        with self.engine.begin() as conn:
            conn.execute(sa.insert(organisations).values(
                principal_id=principal.id, structure_id=principal.national_id, finess=finess, siret=siret,
                siren=siret[:9] if siret else None, name=name, name_norm=normalise(name) or None,
                address=address, postcode=postcode, commune_code=commune_code, city=city,
                city_norm=normalise(city or "") or None, department_code=department_code,
                department_label=department_label, phone=phone, email=email, updated_at=dt.datetime.now(dt.UTC),
            ))
        found = self.organisation(principal.national_id)
        assert found is not None
        return found

    def add_activity(
        self,
        practitioner: Practitioner,
        organisation: Organisation | None,
        *,
        mode_code: str | None = None,
        mode_label: str | None = None,
        sector_code: str | None = None,
        sector_label: str | None = None,
        role_code: str | None = None,
        role_label: str | None = None,
        genre_code: str | None = None,
        genre_label: str | None = None,
        section_code: str | None = None,
        section_label: str | None = None,
        registration_authority: str | None = None,
    ) -> Activity:
        """An activity of a practitioner at a site, keyed like the national import's (practitioner, site,
        mode, sector, role, genre): adding the same one twice returns the existing row."""
        sid = organisation.structure_id if organisation is not None else ""
        codes = "|".join(c or "" for c in (mode_code, sector_code, role_code, genre_code))
        key = f"{practitioner.national_id}|{sid}|{codes}"
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(activities).where(activities.c.source_key == key)).first()
            if row is None:
                conn.execute(sa.insert(activities).values(
                    practitioner_id=practitioner.principal_id,
                    organisation_id=organisation.id if organisation is not None else None, source_key=key,
                    mode_code=mode_code, mode_label=mode_label, sector_code=sector_code, sector_label=sector_label,
                    role_code=role_code, role_label=role_label, genre_code=genre_code, genre_label=genre_label,
                    section_code=section_code, section_label=section_label,
                    registration_authority=registration_authority, updated_at=dt.datetime.now(dt.UTC),
                ))
                row = conn.execute(sa.select(activities).where(activities.c.source_key == key)).first()
        assert row is not None
        return activity_from_row(row)

    def add_skill(
        self,
        practitioner: Practitioner,
        kind: SkillKind,
        code: str,
        *,
        label: str | None = None,
        type_code: str | None = None,
        type_label: str | None = None,
        source: str = "savoir_faire",
    ) -> Skill:
        """A savoir-faire, diploma or authorisation of a practitioner, keyed like the national import's
        rows of `source` (activity | savoir_faire | diploma): adding it twice returns the existing row."""
        key = f"{practitioner.national_id}|{source}|{kind.value}|{type_code or ''}|{code}"
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(practitioner_skills).where(practitioner_skills.c.source_key == key)).first()
            if row is None:
                conn.execute(sa.insert(practitioner_skills).values(
                    practitioner_id=practitioner.principal_id, source_key=key, source=source, kind=kind.value,
                    type_code=type_code, type_label=type_label, code=code, label=label,
                    label_norm=normalise(label or "") or None,
                ))
                row = conn.execute(
                    sa.select(practitioner_skills).where(practitioner_skills.c.source_key == key)).first()
        assert row is not None
        return skill_from_row(row)
