"""The published view of the directory: what LDAP clients see, as (DN, attributes) entries.

One definition serves the LDAPS listener (`directory.ldap_server`) and the push to OpenLDAP
(`caducee directory publish`), so that both always present the same entries (layout and schema in
`directory.ldap_schema`).

Published: active persons (practitioners of the national directory and persons holding a published
mailbox), the organisations of the national directory, and active mailboxes not on the liste rouge. Never
published: liste rouge and inactive mailboxes, authentication and signature certificates, revoked or expired
certificates, database row ids. Encryption certificates are published as `userCertificate;binary` (the DER
certificate) and `userSMIMECertificate` (a degenerate PKCS#7 SignedData holding it, RFC 2798 §9.1.2), on the
person's entry and on each mailbox it may be used for; organisation certificates on the mailboxes of their
organisation.

Entries are built in batches of principal or mailbox ids, so that a search answers from a few queries
and a full publication streams the directory in constant memory (`iter_published`).
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from directory import ldap_schema as ls
from directory.importers.text import normalise
from directory.schema import (
    activities,
    certificates,
    mailboxes,
    organisations,
    practitioner_skills,
    practitioners,
    principals,
)

BATCH = 1000

PERSON_CLASSES = ("top", "person", "organizationalPerson", "inetOrgPerson", "caduceePractitioner")
MAILBOX_CLASSES = ("top", "person", "organizationalPerson", "inetOrgPerson", "caduceeMailbox")
ORGANISATION_CLASSES = ("top", "organization", "uidObject", "caduceeOrganisation")

# Liste rouge: "la BAL ne doit pas être publiée" (ANS logical models). Inactive: removed or closed.
PUBLISHED_MAILBOX = sa.and_(mailboxes.c.active.is_(True), mailboxes.c.liste_rouge.is_(False))


@dataclass
class LdapEntry:
    """One published entry. Attribute names as in `directory.ldap_schema`; values are `str`, except the
    certificate attributes (`ldap_schema.BINARY_ATTRIBUTES`), which are DER `bytes`."""

    dn: str
    attributes: dict[str, list[Any]] = field(default_factory=dict)
    key: int | None = field(default=None, compare=False, repr=False)  # its row id (never published)

    def add(self, name: str, *values: Any) -> None:
        for value in values:
            if value is None or value == "":
                continue
            current = self.attributes.setdefault(name, [])
            if value not in current:
                current.append(value)

    def get(self, name: str) -> list[Any]:
        """Values of an attribute, its name compared case-insensitively."""
        lowered = name.lower()
        for key, values in self.attributes.items():
            if key.lower() == lowered:
                return values
        return []


def structural_entries(base: str, organisation: str | None = None) -> list[LdapEntry]:
    """The base entry and the three containers, parents first (what a publication creates before the rest)."""
    first_rdn = base.split(",", 1)[0]
    attr, _, value = first_rdn.partition("=")
    root = LdapEntry(base)
    if attr.strip().lower() == "dc":
        root.add("objectClass", "top", "dcObject", "organization")
        root.add("dc", value.strip())
        root.add("o", organisation or value.strip())
    else:
        root.add("objectClass", "top", "organization")
        root.add("o", value.strip())
    entries = [root]
    for ou in ls.OUS:
        entry = LdapEntry(f"ou={ou},{base}")
        entry.add("objectClass", "top", "organizationalUnit")
        entry.add("ou", ou)
        entries.append(entry)
    return entries


@functools.lru_cache(maxsize=4096)
def _smime(der: bytes) -> bytes:
    """A certs-only PKCS#7 SignedData holding one certificate (the form of userSMIMECertificate); the same
    certificates are published again and again, so they are wrapped once."""
    return pkcs7.serialize_certificates([x509.load_der_x509_certificate(der)], Encoding.DER)


# The statements of the builders are built once (with bound parameters): building and keying a SELECT costs
# more than running it on a handful of ids, and searches build entries all the time.
def _ids(name: str = "ids") -> Any:
    return sa.bindparam(name, expanding=True)


_VALID_CERTIFICATES: sa.Select[Any] = (
    sa.select(certificates.c.principal_id, certificates.c.mailbox_id, certificates.c.usage, certificates.c.der)
    .where(certificates.c.principal_id.in_(_ids()), certificates.c.usage.in_(_ids("usages")),
           certificates.c.status == "valid", certificates.c.not_after > sa.bindparam("now"))
    .order_by(certificates.c.not_after.desc(), certificates.c.id))


def _valid_certificates(conn: sa.Connection, principal_ids: Sequence[int], usages: Iterable[str]) -> list[sa.Row[Any]]:
    if not principal_ids:
        return []
    return list(conn.execute(_VALID_CERTIFICATES, {"ids": list(principal_ids), "usages": list(usages),
                                                   "now": dt.datetime.now(dt.UTC)}))


def _add_certificates(entry: LdapEntry, ders: Iterable[bytes]) -> None:
    for der in ders:
        entry.add("userCertificate;binary", der)
        entry.add("userSMIMECertificate", _smime(der))


# A value without any character RFC 4514 §2.4 escapes (the common case: addresses, national ids) is its own
# escaped form; `ldap_schema.escape_rdn_value`, character by character, is only needed for the others.
_NEEDS_ESCAPE = re.compile(r'[,+"\\<>;=\x00]|^[# ]|^$| $')


def _mailbox_dn(address: str, base: str) -> str:
    if _NEEDS_ESCAPE.search(address):
        return ls.mailbox_dn(address, base)
    return f"mail={address},ou={ls.MAILBOXES_OU},{base}"


def _person_dn(national_id: str, base: str) -> str:
    if _NEEDS_ESCAPE.search(national_id):
        return ls.person_dn(national_id, base)
    return f"uid={national_id},ou={ls.PEOPLE_OU},{base}"


# PrintableString (RFC 4517 §3.3.29), the syntax of telephoneNumber and facsimileTelephoneNumber in
# OpenLDAP: a value with another character (a "#", an accent, as some national rows carry) is refused by
# the server, so it is cleaned here.
_PRINTABLE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:?")


def _phone(value: str | None) -> str | None:
    """A telephone number as PrintableString: other characters dropped; None when nothing is left."""
    if not value:
        return None
    cleaned = " ".join("".join(ch for ch in value if ch in _PRINTABLE).split())
    return cleaned if any(ch.isdigit() for ch in cleaned) else None


def _split_name(display_name: str, name_norm: str | None = None) -> tuple[str | None, str]:
    """(given name, surname) of a display name "Given Surname" (a holder without practitioner data).

    The national extraction gives the holder's names apart, and `name_norm` keeps them as "surname given":
    it tells where a compound surname starts ("Yann LE GALL"). Otherwise the last word is the surname."""
    parts = display_name.split()
    if len(parts) < 2:
        return None, display_name
    if name_norm:
        for k in range(1, len(parts)):
            given, surname = " ".join(parts[:k]), " ".join(parts[k:])
            if normalise(f"{surname} {given}") == name_norm:
                return given, surname
    return " ".join(parts[:-1]), parts[-1]


_PEOPLE: sa.Select[Any] = (
    sa.select(principals.c.id, principals.c.national_id, principals.c.display_name, principals.c.name_norm,
              practitioners.c.id_type, practitioners.c.identifier, practitioners.c.last_name,
              practitioners.c.first_names, practitioners.c.exercise_civility_label,
              practitioners.c.profession_code, practitioners.c.profession_label)
    .select_from(principals.outerjoin(practitioners, practitioners.c.principal_id == principals.c.id))
    .where(principals.c.id.in_(_ids()), principals.c.kind == "person", principals.c.active.is_(True),
           # Public: a practitioner of the national directory (open data), or the holder of a published
           # mailbox. A person whose only mailboxes are on the liste rouge is not published at all.
           sa.or_(practitioners.c.principal_id.is_not(None),
                  sa.exists().where(mailboxes.c.owner_id == principals.c.id, PUBLISHED_MAILBOX)))
    .order_by(principals.c.id))
_SKILLS: sa.Select[Any] = (
    sa.select(practitioner_skills.c.practitioner_id, practitioner_skills.c.code, practitioner_skills.c.label)
    .where(practitioner_skills.c.practitioner_id.in_(_ids()), practitioner_skills.c.kind == "savoir_faire")
    .order_by(practitioner_skills.c.code))
_SITES: sa.Select[Any] = (
    sa.select(activities.c.practitioner_id, organisations.c.structure_id, organisations.c.postcode,
              organisations.c.city)
    .select_from(activities.join(organisations, organisations.c.id == activities.c.organisation_id))
    .where(activities.c.practitioner_id.in_(_ids())).order_by(activities.c.id))
_BOXES: sa.Select[Any] = (
    sa.select(mailboxes.c.owner_id, mailboxes.c.address)
    .where(mailboxes.c.owner_id.in_(_ids()), PUBLISHED_MAILBOX)
    .order_by(mailboxes.c.preference, mailboxes.c.address))
_SHOWN: sa.Select[Any] = sa.select(mailboxes.c.id).where(mailboxes.c.id.in_(_ids()), PUBLISHED_MAILBOX)


def people(conn: sa.Connection, principal_ids: Sequence[int], base: str) -> list[LdapEntry]:
    """Entries of the given person principals (inactive ones and organisations left out), in id order."""
    ids = sorted(set(principal_ids))
    if not ids:
        return []
    rows = conn.execute(_PEOPLE, {"ids": ids}).all()
    found = [r.id for r in rows]
    if not found:
        return []
    skills: dict[int, list[sa.Row[Any]]] = defaultdict(list)
    for r in conn.execute(_SKILLS, {"ids": found}):
        skills[r.practitioner_id].append(r)
    sites: dict[int, list[sa.Row[Any]]] = defaultdict(list)
    for r in conn.execute(_SITES, {"ids": found}):
        sites[r.practitioner_id].append(r)
    boxes: dict[int, list[str]] = defaultdict(list)
    for r in conn.execute(_BOXES, {"ids": found}):
        boxes[r.owner_id].append(r.address)
    certs: dict[int, list[bytes]] = defaultdict(list)
    enc = _valid_certificates(conn, found, ("enc",))
    # A certificate bound to a liste rouge (or closed) mailbox names that mailbox: not on the person either.
    bound = sorted({r.mailbox_id for r in enc if r.mailbox_id is not None})
    shown = {r.id for r in conn.execute(_SHOWN, {"ids": bound})} if bound else set()
    for r in enc:
        if r.mailbox_id is None or r.mailbox_id in shown:
            certs[r.principal_id].append(r.der)

    entries = []
    for r in rows:
        entry = LdapEntry(_person_dn(r.national_id, base), key=r.id)
        entry.add("objectClass", *PERSON_CLASSES)
        entry.add("uid", r.national_id)
        entry.add("caduceeNationalId", r.national_id)
        if r.last_name is not None:
            given, surname = r.first_names, r.last_name
            entry.add("cn", " ".join(p for p in (given, surname) if p))
        else:
            given, surname = _split_name(r.display_name, r.name_norm)
            entry.add("cn", r.display_name)
        entry.add("sn", surname)
        entry.add("givenName", given)
        entry.add("displayName", r.display_name)
        if r.id_type == "8":
            entry.add("caduceeRpps", r.identifier)
        entry.add("title", r.exercise_civility_label)
        entry.add("caduceeProfessionCode", r.profession_code)
        entry.add("caduceeProfession", r.profession_label)
        for s in skills[r.id]:
            entry.add("caduceeSpecialtyCode", s.code)
            entry.add("caduceeSpecialty", s.label)
        for site in sites[r.id]:
            entry.add("caduceeStructureId", site.structure_id)
            entry.add("postalCode", site.postcode)
            entry.add("l", site.city)
        entry.add("seeAlso", *(_mailbox_dn(a, base) for a in boxes[r.id]))
        _add_certificates(entry, certs[r.id])
        entries.append(entry)
    return entries


_ORGANISATIONS: sa.Select[Any] = (
    sa.select(organisations).where(organisations.c.id.in_(_ids())).order_by(organisations.c.id))


def organisation_entries(conn: sa.Connection, organisation_ids: Sequence[int], base: str) -> list[LdapEntry]:
    """Entries of the given organisations (rows of `organisations`, by their id), in id order."""
    ids = sorted(set(organisation_ids))
    if not ids:
        return []
    rows = conn.execute(_ORGANISATIONS, {"ids": ids}).all()
    entries = []
    for r in rows:
        entry = LdapEntry(ls.organisation_dn(r.structure_id, base), key=r.id)
        entry.add("objectClass", *ORGANISATION_CLASSES)
        entry.add("uid", r.structure_id)
        entry.add("caduceeNationalId", r.structure_id)
        entry.add("o", r.name or r.trade_name or r.structure_id)
        entry.add("displayName", r.trade_name)
        entry.add("caduceeFiness", r.finess)
        entry.add("caduceeSiret", r.siret)
        entry.add("postalAddress", "$".join(line.replace("$", " ") for line in (r.address or "").splitlines()))
        entry.add("postalCode", r.postcode)
        entry.add("l", r.city)
        entry.add("telephoneNumber", _phone(r.phone), _phone(r.phone2))
        entry.add("facsimileTelephoneNumber", _phone(r.fax))
        entries.append(entry)
    return entries


_MAILBOXES: sa.Select[Any] = (
    sa.select(mailboxes, principals.c.kind, principals.c.national_id, principals.c.display_name,
              principals.c.name_norm,
              principals.c.organisation, principals.c.active.label("owner_active"),
              practitioners.c.last_name, practitioners.c.first_names,
              practitioners.c.profession_code, practitioners.c.profession_label)
    .select_from(mailboxes.join(principals, principals.c.id == mailboxes.c.owner_id)
                 .outerjoin(practitioners, practitioners.c.principal_id == principals.c.id))
    .where(mailboxes.c.id.in_(_ids()), PUBLISHED_MAILBOX)
    .order_by(mailboxes.c.id))
_STRUCTURE_NAMES: sa.Select[Any] = (sa.select(organisations.c.structure_id, organisations.c.name)
                    .where(organisations.c.structure_id.in_(_ids())))


def mailbox_entries(conn: sa.Connection, mailbox_ids: Sequence[int], base: str) -> list[LdapEntry]:
    """Entries of the given mailboxes (liste rouge and inactive ones left out), in id order."""
    ids = sorted(set(mailbox_ids))
    if not ids:
        return []
    rows = conn.execute(_MAILBOXES, {"ids": ids}).all()
    if not rows:
        return []
    owners = sorted({r.owner_id for r in rows})
    skills: dict[int, list[sa.Row[Any]]] = defaultdict(list)
    for s in conn.execute(_SKILLS, {"ids": owners}):
        skills[s.practitioner_id].append(s)
    structures = {r.structure_id for r in rows if r.structure_id}
    structure_names = {s.structure_id: s.name for s in conn.execute(
        _STRUCTURE_NAMES, {"ids": sorted(structures)})} if structures else {}
    # Certificates usable for a mailbox: those bound to it, and the owner's unbound ones.
    bound: dict[int, list[bytes]] = defaultdict(list)
    unbound: dict[int, list[bytes]] = defaultdict(list)
    for c in _valid_certificates(conn, owners, ("enc", "org")):
        if c.mailbox_id is None:
            unbound[c.principal_id].append(c.der)
        else:
            bound[c.mailbox_id].append(c.der)

    entries = []
    for r in rows:
        if not r.owner_active:
            continue
        entry = LdapEntry(_mailbox_dn(r.address, base), key=r.id)
        entry.add("objectClass", *MAILBOX_CLASSES)
        entry.add("mail", r.address)
        if r.mailbox_type == "PER" and r.kind == "person":
            if r.last_name is not None:
                entry.add("cn", " ".join(p for p in (r.first_names, r.last_name) if p))
                entry.add("sn", r.last_name)
                entry.add("givenName", r.first_names)
            else:
                given, surname = _split_name(r.display_name, r.name_norm)
                entry.add("cn", r.display_name)
                entry.add("sn", surname)
                entry.add("givenName", given)
            entry.add("caduceeProfessionCode", r.profession_code)
            entry.add("caduceeProfession", r.profession_label)
            for s in skills[r.owner_id]:
                entry.add("caduceeSpecialtyCode", s.code)
                entry.add("caduceeSpecialty", s.label)
        else:
            name = r.description or r.display_name or r.address
            entry.add("cn", name)
            entry.add("sn", name)
        entry.add("displayName", r.description or r.display_name)
        entry.add("description", r.description)
        entry.add("o", structure_names.get(r.structure_id) or r.organisation)
        entry.add("ou", r.service)
        entry.add("caduceeMailboxType", r.mailbox_type)
        entry.add("caduceeOwner", r.national_id)
        entry.add("caduceeStructureId", r.structure_id)
        if r.dematerialisation is not None:
            entry.add("caduceeDematerialisation", "TRUE" if r.dematerialisation else "FALSE")
        entry.add("caduceeService", r.service)
        entry.add("caduceeResponsible", r.responsible)
        _add_certificates(entry, [*bound[r.id], *unbound[r.owner_id]])
        entries.append(entry)
    return entries


def _id_batches(conn: sa.Connection, statement: sa.Select[Any], batch: int) -> Iterator[list[int]]:
    """Ids selected by `statement` (one id column, ascending), `batch` at a time, by keyset pagination."""
    column = statement.selected_columns[0]
    last = None
    while True:
        query = statement if last is None else statement.where(column > last)
        ids = [r[0] for r in conn.execute(query.order_by(column).limit(batch))]
        if not ids:
            return
        yield ids
        last = ids[-1]


def iter_published(conn: sa.Connection, base: str, *, organisation: str | None = None,
                   batch: int = BATCH) -> Iterator[LdapEntry]:
    """Every published entry: the structural ones, then people, organisations and mailboxes, each in a
    stable order (by database id), in constant memory."""
    yield from structural_entries(base, organisation)
    for ids in _id_batches(conn, sa.select(principals.c.id).where(
            principals.c.kind == "person", principals.c.active.is_(True)), batch):
        yield from people(conn, ids, base)
    for ids in _id_batches(conn, sa.select(organisations.c.id), batch):
        yield from organisation_entries(conn, ids, base)
    for ids in _id_batches(conn, sa.select(mailboxes.c.id).where(PUBLISHED_MAILBOX), batch):
        yield from mailbox_entries(conn, ids, base)
