"""Search the directory: practitioners and organisations with their published mailboxes.

Pure query building over SQLAlchemy Core, every value bound as a parameter, so that the command line
(`caducee directory search`) and an HTTP API share it. Names, professions, specialties and cities match
by prefix, accent- and case-insensitively, on the normalised columns (`directory.importers.text`), with
range conditions that their B-tree indexes answer (`directory.schema.NormText`). Each criterion selects a
set of principals through its own index; the sets are intersected.

Mailboxes on the liste rouge (ANS logical models: "la BAL ne doit pas être publiée") and inactive ones
are never returned, nor used to match a criterion.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from directory.identifiers import PERSON_RPPS_PREFIX, PrincipalKind
from directory.importers.text import normalise, prefix_bounds
from directory.model import Activity, Mailbox, MailboxType, Organisation, Practitioner, Skill
from directory.schema import (
    activities,
    mailboxes,
    organisations,
    practitioner_skills,
    practitioners,
    principals,
)
from directory.store import (
    activity_from_row,
    mailbox_from_row,
    organisation_from_row,
    practitioner_from_row,
    skill_from_row,
)

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000


class SearchError(ValueError):
    """The criteria cannot be searched (none given, nothing left after normalisation, bad limit)."""


@dataclass(frozen=True)
class SearchQuery:
    """Search criteria; every given criterion must hold (AND).

    `name`, `profession`, `specialty` and `city` match by accent- and case-insensitive prefix (a
    profession or specialty also by exact code, e.g. "10" or "SM53"); `postcode` by prefix ("75" for
    Paris); `rpps`, `national_id` and `mailbox` exactly.
    """

    name: str | None = None
    rpps: str | None = None
    national_id: str | None = None
    profession: str | None = None
    specialty: str | None = None
    postcode: str | None = None
    city: str | None = None
    mailbox: str | None = None
    mailbox_type: MailboxType | None = None
    limit: int = DEFAULT_LIMIT

    def is_empty(self) -> bool:
        return not any(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "limit")


@dataclass(frozen=True)
class Site:
    """Where a practitioner works: the activity and, when known, its organisation."""

    activity: Activity
    organisation: Organisation | None


@dataclass(frozen=True)
class DirectoryEntry:
    """One search result: a person (with the practitioner's data when the national directory has it)
    or an organisation, and its published mailboxes."""

    kind: PrincipalKind
    principal_id: int
    national_id: str
    display_name: str
    practitioner: Practitioner | None = None
    organisation: Organisation | None = None
    skills: tuple[Skill, ...] = ()
    sites: tuple[Site, ...] = ()
    mailboxes: tuple[Mailbox, ...] = ()


def _prefix(column: sa.ColumnElement[str], prefix: str) -> sa.ColumnElement[bool]:
    low, high = prefix_bounds(prefix)
    return sa.and_(column >= low, column < high)


def _normalised(label: str, value: str) -> str:
    text = normalise(value)
    if not text:
        raise SearchError(f"{label} {value!r} has no letter or digit to search for")
    return text


_PUBLISHED = sa.and_(mailboxes.c.active.is_(True), mailboxes.c.liste_rouge.is_(False))


def matching_principals(query: SearchQuery) -> list[sa.Select[Any]]:
    """One SELECT of principal ids per criterion (their intersection is the result)."""
    sets: list[sa.Select[Any]] = []
    p, o, a, k = practitioners, organisations, activities, practitioner_skills
    if query.name:
        name = _normalised("name", query.name)
        sets.append(sa.union(
            sa.select(p.c.principal_id).where(_prefix(p.c.name_norm, name)),
            sa.select(p.c.principal_id).where(_prefix(p.c.given_name_norm, name)),
            sa.select(o.c.principal_id).where(_prefix(o.c.name_norm, name)),
            sa.select(principals.c.id).where(_prefix(principals.c.name_norm, name)),
        ).subquery().select())
    if query.rpps:
        sets.append(sa.select(principals.c.id).where(
            principals.c.national_id == PERSON_RPPS_PREFIX + query.rpps.strip()))
    if query.national_id:
        sets.append(sa.select(principals.c.id).where(principals.c.national_id == query.national_id.strip()))
    if query.profession:
        text = _normalised("profession", query.profession)
        sets.append(sa.union(
            sa.select(p.c.principal_id).where(p.c.profession_code == query.profession.strip().upper()),
            sa.select(p.c.principal_id).where(_prefix(p.c.profession_norm, text)),
        ).subquery().select())
    if query.specialty:
        text = _normalised("specialty", query.specialty)
        sets.append(sa.union(
            sa.select(k.c.practitioner_id).where(k.c.code == query.specialty.strip().upper()),
            sa.select(k.c.practitioner_id).where(_prefix(k.c.label_norm, text)),
        ).subquery().select())
    for value, column in ((query.postcode, o.c.postcode), (query.city, o.c.city_norm)):
        if value:
            text = value.strip().upper() if column is o.c.postcode else _normalised("city", value)
            if not text:
                raise SearchError("empty postcode")
            sets.append(sa.union(
                sa.select(a.c.practitioner_id).join(o, o.c.id == a.c.organisation_id).where(_prefix(column, text)),
                sa.select(o.c.principal_id).where(_prefix(column, text)),
            ).subquery().select())
    if query.mailbox or query.mailbox_type:
        owners = sa.select(mailboxes.c.owner_id).where(_PUBLISHED)
        if query.mailbox:
            owners = owners.where(mailboxes.c.address == query.mailbox.strip().lower())
        if query.mailbox_type:
            owners = owners.where(mailboxes.c.mailbox_type == query.mailbox_type.value)
        sets.append(owners)
    return sets


def build_query(query: SearchQuery) -> sa.Select[Any]:
    """The ids, kinds, national ids and names of the matching principals, by name, at most `limit`."""
    if query.is_empty():
        raise SearchError("give at least one criterion")
    if not 1 <= query.limit <= MAX_LIMIT:
        raise SearchError(f"the limit must be between 1 and {MAX_LIMIT}")
    p, o = practitioners, organisations
    statement = (
        sa.select(principals.c.id, principals.c.kind, principals.c.national_id, principals.c.display_name)
        .select_from(principals.outerjoin(p, p.c.principal_id == principals.c.id)
                     .outerjoin(o, o.c.principal_id == principals.c.id))
        .where(principals.c.active.is_(True))
    )
    for ids in matching_principals(query):
        statement = statement.where(principals.c.id.in_(ids))
    order = sa.func.coalesce(p.c.name_norm, o.c.name_norm, principals.c.name_norm,
                             sa.func.lower(principals.c.display_name))
    return statement.order_by(order, principals.c.id).limit(query.limit)


def search(bind: sa.Engine | sa.Connection, query: SearchQuery) -> list[DirectoryEntry]:
    """Run `query`; each entry carries its practitioner or organisation data, skills, sites and
    published mailboxes (by preference, then address)."""
    statement = build_query(query)
    if isinstance(bind, sa.Engine):
        with bind.connect() as conn:
            return _entries(conn, conn.execute(statement).all())
    return _entries(bind, bind.execute(statement).all())


def _entries(conn: sa.Connection, rows: Sequence[sa.Row[Any]]) -> list[DirectoryEntry]:
    ids = [r.id for r in rows]
    if not ids:
        return []
    found_practitioners = {r.principal_id: practitioner_from_row(r) for r in conn.execute(
        sa.select(practitioners).where(practitioners.c.principal_id.in_(ids)))}
    found_organisations = {r.principal_id: organisation_from_row(r) for r in conn.execute(
        sa.select(organisations).where(organisations.c.principal_id.in_(ids)))}
    skills: dict[int, list[Skill]] = defaultdict(list)
    for r in conn.execute(sa.select(practitioner_skills).where(practitioner_skills.c.practitioner_id.in_(ids))
                          .order_by(practitioner_skills.c.kind, practitioner_skills.c.code)):
        skill = skill_from_row(r)
        if all((s.kind, s.code) != (skill.kind, skill.code) for s in skills[r.practitioner_id]):
            skills[r.practitioner_id].append(skill)  # the same savoir-faire may come from two files
    sites: dict[int, list[Site]] = defaultdict(list)
    site_orgs = organisations.alias("site")
    site_rows = conn.execute(
        sa.select(activities, *(c.label(f"site_{c.name}") for c in site_orgs.c))
        .select_from(activities.outerjoin(site_orgs, site_orgs.c.id == activities.c.organisation_id))
        .where(activities.c.practitioner_id.in_(ids)).order_by(activities.c.id))
    for r in site_rows:
        org = None
        if r.site_id is not None:
            org = organisation_from_row(_Prefixed(r, "site_"))
        sites[r.practitioner_id].append(Site(activity_from_row(r), org))
    boxes: dict[int, list[Mailbox]] = defaultdict(list)
    for r in conn.execute(sa.select(mailboxes).where(mailboxes.c.owner_id.in_(ids), _PUBLISHED)
                          .order_by(mailboxes.c.preference, mailboxes.c.address)):
        boxes[r.owner_id].append(mailbox_from_row(r))
    return [
        DirectoryEntry(
            kind=PrincipalKind(r.kind), principal_id=r.id, national_id=r.national_id,
            display_name=r.display_name, practitioner=found_practitioners.get(r.id),
            organisation=found_organisations.get(r.id), skills=tuple(skills[r.id]), sites=tuple(sites[r.id]),
            mailboxes=tuple(boxes[r.id]),
        )
        for r in rows
    ]


class _Prefixed:
    """Attribute access to the `prefix`-labelled columns of a row (an aliased joined table)."""

    def __init__(self, row: sa.Row[Any], prefix: str) -> None:
        self._mapping = row._mapping
        self._prefix = prefix

    def __getattr__(self, name: str) -> Any:
        return self._mapping[self._prefix + name]


def to_jsonable(value: Any) -> Any:
    """Dataclasses, enums and tuples of search results as JSON-ready values (ids of rows left out)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name not in _INTERNAL_FIELDS}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


# Database ids mean nothing outside this database; national ids identify the entries.
_INTERNAL_FIELDS = frozenset({"id", "principal_id", "owner_id", "practitioner_id", "organisation_id"})
