"""Apply a staged national file to the directory: set-based INSERT / UPDATE / DELETE, one transaction.

Each file kind owns some entities (REFERENCE.md §4, research/formats.md §1):

- PS_LibreAcces_Personne_activite: practitioners, organisations (sites), activities, and the savoir-faire
  rows it carries (skills with source "activity");
- PS_LibreAcces_SavoirFaire / PS_LibreAcces_Dipl_AutExerc: skills with source "savoir_faire" / "diploma";
- Extraction_Correspondance_MSSante: mailboxes with source "national".

Re-importing a file applies the difference for those entities only: rows whose natural key is new are
added, rows whose values differ (compared column by column, NULL-safe) are changed, rows of the
directory absent from the file are removed (national mailboxes are deactivated instead: their folders and
messages stay). Principals are created when missing and never deleted: mailboxes, certificates, grants
and the audit trail refer to them. Local mailboxes (source "local") are never written by an import.

For practitioners, sites, activities and skills the difference is found first, by `plan_*`, in a
read-only pass over the directory that writes only to the staging tables (the `action` of each staged
row, `stg_gone`); only importers write those tables, and the apply checks that no other import committed
since the plan (`last_import_id`). `apply_*` then writes just the planned rows, so that the write
transaction, which on SQLite holds the database's only write lock, stays short. Mailboxes, which
administrators also change, are compared and written in the write transaction itself.

Every statement is built with SQLAlchemy Core (parameters bound) and runs on SQLite ≥ 3.33 (UPDATE …
FROM) and PostgreSQL. Into a table that the insert will at least double, the secondary indexes are
dropped and built again after the insert, which is several times faster than maintaining them row by
row.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from directory.importers.parsers import Report
from directory.importers.staging import (
    ACTIVITY_FIELDS,
    ADD,
    CHANGE,
    ORGANISATION_FIELDS,
    PLAN_COLUMN,
    PRACTITIONER_FIELDS,
    SKILL_FIELDS,
    stg_activities,
    stg_gone,
    stg_mailboxes,
    stg_organisations,
    stg_practitioners,
    stg_skills,
)
from directory.schema import (
    activities,
    directory_imports,
    mailboxes,
    organisations,
    practitioner_skills,
    practitioners,
    principals,
)

PERSON = "person"
ORGANISATION = "organisation"
NATIONAL = "national"
ANALYZE_AFTER = 10_000  # rows inserted into a table before PostgreSQL is asked to analyse it
BULK_MIN_ROWS = 1_000  # below this, a table's indexes are always rebuilt around a large insert
Values = dict[str, sa.ColumnElement[Any]]


@dataclass
class EntityCounts:
    """What an import did to one entity of the directory."""

    added: int = 0
    changed: int = 0
    removed: int = 0


@dataclass
class Plan:
    """What `plan_*` found: the newest import it was made after, and the staging tables whose rows are
    all new (their target was empty: no row was marked, every one is added)."""

    after_import: int = 0
    all_new: frozenset[str] = frozenset()

    def added(self, staged: sa.Table) -> sa.ColumnElement[bool]:
        return sa.true() if staged.name in self.all_new else staged.c[PLAN_COLUMN] == ADD

    def touched(self, staged: sa.Table) -> sa.ColumnElement[bool]:
        """Added or changed."""
        return sa.true() if staged.name in self.all_new else staged.c[PLAN_COLUMN].is_not(None)


@dataclass
class Applied:
    """The outcome of applying one file: counts per entity and the principals it had to create."""

    entities: dict[str, EntityCounts]
    principals_created: int = 0


def _rows(result: sa.CursorResult[Any]) -> int:
    return int(result.rowcount or 0)


class _Sql:
    """Expressions that depend on the backend."""

    def __init__(self, conn: sa.Connection, now: dt.datetime) -> None:
        # PostgreSQL refuses a value longer than a VARCHAR(n); SQLite stores it as it is.
        self.cut = conn.dialect.name != "sqlite"
        self.now: sa.ColumnElement[Any] = sa.literal(now, sa.DateTime(timezone=True))

    def val(self, source: sa.ColumnElement[Any], target: sa.Column[Any]) -> sa.ColumnElement[Any]:
        """A staged text value for a target column: empty → NULL, cut to the column's length."""
        value: sa.ColumnElement[Any] = sa.func.nullif(source, "")
        length = getattr(target.type, "length", None)
        if self.cut and length:
            value = sa.func.substr(value, 1, length)
        return value

    def text(self, source: sa.ColumnElement[Any], target: sa.Column[Any]) -> sa.ColumnElement[Any]:
        """A value computed by the parser (never empty, maybe NULL), cut to the column's length."""
        length = getattr(target.type, "length", None)
        return sa.func.substr(source, 1, length) if self.cut and length else source


def _differs(target: sa.Table, values: Values) -> sa.ColumnElement[bool]:
    """Any compared column differs (NULL-safe: IS DISTINCT FROM, `IS NOT` on SQLite)."""
    return sa.or_(*(target.c[name].is_distinct_from(value) for name, value in values.items()
                    if name != "updated_at"))


@contextmanager
def _bulk_indexes(conn: sa.Connection, table: sa.Table, staged: sa.Table) -> Iterator[int]:
    """When an insert will at least double `table` (a first import: at least twice as many staged rows
    as rows in the table), drop its secondary indexes for the insert and build them after it: sorting
    once is several times faster than growing a B-tree row by row in random order. Yields the number of
    rows the table had.

    On PostgreSQL the foreign keys go too (each one is a trigger per inserted row); adding them back
    checks every row in one join. SQLite cannot drop a foreign key, and checks it cheaply in-process.
    """
    existing = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
    bulk = existing < BULK_MIN_ROWS or conn.execute(
        sa.select(sa.func.count()).select_from(staged)).scalar_one() >= 2 * existing
    indexes = [index for index in table.indexes if not index.unique] if bulk else []
    keys = list(table.foreign_key_constraints) if bulk and conn.dialect.name == "postgresql" else []
    for key in keys:
        conn.execute(sa.schema.DropConstraint(key))
    for index in indexes:
        conn.execute(sa.schema.DropIndex(index))
    yield existing
    for index in indexes:
        conn.execute(sa.schema.CreateIndex(index))
    for key in keys:
        conn.execute(sa.schema.AddConstraint(key))


def _update_changed(conn: sa.Connection, target: sa.Table, key: sa.ColumnElement[bool], values: Values,
                    *where: sa.ColumnElement[bool]) -> int:
    """Compare and update in one statement (mailboxes)."""
    statement = (sa.update(target).where(key, _differs(target, values), *where)
                 .values({target.c[name]: value for name, value in values.items()}))
    return _rows(conn.execute(statement))


def _insert_new(conn: sa.Connection, target: sa.Table, target_key: str, staged_key: sa.Column[Any],
                columns: Values, from_: sa.FromClause, *where: sa.ColumnElement[bool]) -> int:
    """Insert the staged rows whose key the target lacks (mailboxes)."""
    staged = staged_key.table
    assert isinstance(staged, sa.Table)
    with _bulk_indexes(conn, target, staged) as existing:
        select = sa.select(*columns.values()).select_from(from_).where(*where)
        if existing:  # into an empty table every row is new: no probe
            select = select.where(~sa.exists().where(target.c[target_key] == staged_key))
        added = _rows(conn.execute(sa.insert(target).from_select(list(columns), select)))
    _analyze_after(conn, target, added)
    return added


def _analyze_after(conn: sa.Connection, target: sa.Table, added: int) -> None:
    if added >= ANALYZE_AFTER and conn.dialect.name == "postgresql":
        # Rows inserted in this transaction are invisible to autovacuum: give the planner of the next
        # statements (which join this table) fresh statistics.
        conn.exec_driver_sql(f"ANALYZE {conn.dialect.identifier_preparer.format_table(target)}")


# -- the plan: read-only over the directory, written into the staging tables --

def _plan_rows(conn: sa.Connection, staged: sa.Table, target: sa.Table, match: sa.ColumnElement[bool],
               values: Values) -> bool:
    """Mark each staged row "add" (no target row has its key) or "change" (the target row differs).
    Returns True, marking nothing, when the target is empty: every row is new (a first import)."""
    if conn.execute(sa.select(sa.literal(1)).select_from(target).limit(1)).first() is None:
        return True
    action = staged.c[PLAN_COLUMN]
    conn.execute(sa.update(staged).where(~sa.exists().where(match)).values({action: ADD}))
    conn.execute(sa.update(staged).where(sa.exists().where(match, _differs(target, values)))
                 .values({action: CHANGE}))
    return False


def _plan_gone(conn: sa.Connection, kind: str, ids: sa.Select[Any]) -> None:
    conn.execute(sa.insert(stg_gone).from_select(["kind", "id"], sa.select(sa.literal(kind), ids.subquery())))


def _gone(kind: str) -> sa.Select[Any]:
    return sa.select(stg_gone.c.id).where(stg_gone.c.kind == kind)


def _practitioner_values(sql: _Sql) -> Values:
    sp, p = stg_practitioners, practitioners
    values: Values = {f: sql.val(sp.c[f], p.c[f]) for f in PRACTITIONER_FIELDS}
    values["id_type"], values["identifier"] = sp.c.id_type, sp.c.identifier
    values["last_name"] = sa.func.coalesce(values["last_name"], "")
    for name in ("name_norm", "given_name_norm", "profession_norm"):
        values[name] = sql.text(sp.c[name], p.c[name])
    return values


def _organisation_values(sql: _Sql) -> Values:
    so, o = stg_organisations, organisations
    values: Values = {f: sql.val(so.c[f], o.c[f]) for f in ORGANISATION_FIELDS}
    for name in ("name_norm", "city_norm", "address"):
        values[name] = sql.text(so.c[name], o.c[name])
    return values


def _activity_values(sql: _Sql) -> Values:
    return {f: sql.val(stg_activities.c[f], activities.c[f]) for f in ACTIVITY_FIELDS}


def _skill_values(sql: _Sql) -> Values:
    s, t = stg_skills, practitioner_skills
    values: Values = {f: sql.val(s.c[f], t.c[f]) for f in SKILL_FIELDS}
    values["code"] = sa.func.coalesce(values["code"], "")
    values["label_norm"] = sql.text(s.c.label_norm, t.c.label_norm)
    return values


def _plan_skills(conn: sa.Connection, sql: _Sql, source: str) -> set[str]:
    s, k = stg_skills, practitioner_skills
    all_new = _plan_rows(conn, s, k, k.c.source_key == s.c.source_key, _skill_values(sql))
    _plan_gone(conn, "skill", sa.select(k.c.id).where(
        k.c.source == source, ~sa.exists().where(s.c.source_key == k.c.source_key)))
    return {s.name} if all_new else set()


def last_import_id(conn: sa.Connection) -> int:
    """The newest import applied: the plan is valid only while it stays the same."""
    return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(directory_imports.c.id), 0))).scalar_one())


def plan_activity(conn: sa.Connection, now: dt.datetime, *, with_skills: bool) -> Plan:
    """PS_LibreAcces_Personne_activite: the file is the whole list of practitioners, sites and activities."""
    sql = _Sql(conn, now)
    sp, so, sa_ = stg_practitioners, stg_organisations, stg_activities
    p, o, a = practitioners, organisations, activities
    conn.execute(sa.schema.CreateTable(stg_gone, if_not_exists=True))
    all_new = {staged.name for staged, target, match, values in (
        (sp, p, p.c.national_id == sp.c.national_id, _practitioner_values(sql)),
        (so, o, o.c.structure_id == so.c.structure_id, _organisation_values(sql)),
        (sa_, a, a.c.source_key == sa_.c.source_key, _activity_values(sql)),
    ) if _plan_rows(conn, staged, target, match, values)}
    _plan_gone(conn, "activity", sa.select(a.c.id).where(~sa.exists().where(sa_.c.source_key == a.c.source_key)))
    _plan_gone(conn, "practitioner", sa.select(p.c.principal_id).where(
        ~sa.exists().where(sp.c.national_id == p.c.national_id)))
    _plan_gone(conn, "organisation", sa.select(o.c.id).where(
        ~sa.exists().where(so.c.structure_id == o.c.structure_id)))
    if with_skills:
        all_new |= _plan_skills(conn, sql, "activity")
    return Plan(last_import_id(conn), frozenset(all_new))


def plan_skills(conn: sa.Connection, report: Report, now: dt.datetime, source: str) -> Plan:
    """PS_LibreAcces_SavoirFaire / PS_LibreAcces_Dipl_AutExerc: the skills of known practitioners.

    Lines about a person absent from the directory are counted as warnings and skipped: practitioners
    come from PS_LibreAcces_Personne_activite, which is imported first.
    """
    s = stg_skills
    unknown = ~sa.exists().where(practitioners.c.national_id == s.c.national_id)
    rows = conn.execute(sa.select(s.c.line_no, s.c.national_id).distinct().where(unknown)
                        .order_by(s.c.line_no)).all()
    for line_no, national_id in rows:
        report.warn(line_no, f"practitioner {national_id} is not in the directory (import "
                             "PS_LibreAcces_Personne_activite first): line skipped")
    if rows:
        conn.execute(sa.delete(s).where(unknown))
    conn.execute(sa.schema.CreateTable(stg_gone, if_not_exists=True))
    return Plan(last_import_id(conn), frozenset(_plan_skills(conn, _Sql(conn, now), source)))


# -- the apply: the write transaction --

def _delete_gone(conn: sa.Connection, target: sa.Table, id_column: sa.Column[Any], kind: str) -> int:
    return _rows(conn.execute(sa.delete(target).where(id_column.in_(_gone(kind)))))


def _update_planned(conn: sa.Connection, plan: Plan, target: sa.Table, staged: sa.Table,
                    match: sa.ColumnElement[bool], values: Values) -> int:
    if staged.name in plan.all_new:
        return 0
    statement = (sa.update(target).where(match, staged.c[PLAN_COLUMN] == CHANGE)
                 .values({target.c[name]: value for name, value in values.items()}))
    return _rows(conn.execute(statement))


def _insert_planned(conn: sa.Connection, plan: Plan, target: sa.Table, staged: sa.Table, columns: Values,
                    from_: sa.FromClause) -> int:
    with _bulk_indexes(conn, target, staged):
        select = sa.select(*columns.values()).select_from(from_).where(plan.added(staged))
        added = _rows(conn.execute(sa.insert(target).from_select(list(columns), select)))
    _analyze_after(conn, target, added)
    return added


def _reject_kind_conflicts(conn: sa.Connection, plan: Plan, staged: sa.Table, key: str, kind: str,
                           report: Report) -> None:
    """Lines whose national id already names a principal of the other kind cannot be applied."""
    clash = sa.and_(plan.added(staged),
                    sa.exists().where(principals.c.national_id == staged.c[key], principals.c.kind != kind))
    rows = conn.execute(sa.select(staged.c.line_no, staged.c[key]).where(clash).order_by(staged.c.line_no)).all()
    for line_no, national_id in rows:
        report.reject(line_no, f"national id {national_id} already belongs to a principal that is not a {kind}")
    if rows:
        conn.execute(sa.delete(staged).where(clash))


def _principal_name(sql: _Sql, staged: sa.Table, key: str) -> sa.ColumnElement[Any]:
    return sa.func.coalesce(sql.val(staged.c.display_name, principals.c.display_name), staged.c[key])


def _create_principals(conn: sa.Connection, sql: _Sql, plan: Plan, staged: sa.Table, key: str, kind: str) -> int:
    """Principals for the added practitioners or sites that have none yet."""
    name = _principal_name(sql, staged, key)
    select = (sa.select(sa.literal(kind), staged.c[key], name, name if kind == ORGANISATION else sa.null(),
                        sql.text(staged.c.name_norm, principals.c.name_norm), sql.now)
              .where(plan.added(staged),
                     ~sa.exists().where(principals.c.national_id == staged.c[key])))
    with _bulk_indexes(conn, principals, staged):
        return _rows(conn.execute(sa.insert(principals).from_select(
            ["kind", "national_id", "display_name", "organisation", "name_norm", "created_at"], select)))


def _sync_display_names(conn: sa.Connection, sql: _Sql, plan: Plan, staged: sa.Table, key: str,
                        kind: str) -> None:
    """National names win: the display name (normalised name, organisation name) of the principal of an
    added or changed practitioner or site follows the file."""
    name = _principal_name(sql, staged, key)
    norm = sql.text(staged.c.name_norm, principals.c.name_norm)
    values: dict[Any, Any] = {principals.c.display_name: name, principals.c.name_norm: norm}
    differs = sa.or_(principals.c.display_name != name, principals.c.name_norm.is_distinct_from(norm))
    if kind == ORGANISATION:
        values[principals.c.organisation] = name
        differs = sa.or_(differs, principals.c.organisation.is_distinct_from(name))
    conn.execute(sa.update(principals)
                 .where(plan.touched(staged), principals.c.national_id == staged.c[key],
                        principals.c.kind == kind, differs)
                 .values(values))


def _apply_skills(conn: sa.Connection, sql: _Sql, plan: Plan, source: str, removed: int) -> EntityCounts:
    """Update and add the planned skills of `source` (the removed ones are already deleted)."""
    s, k = stg_skills, practitioner_skills
    counts = EntityCounts(removed=removed)
    values = _skill_values(sql)
    counts.changed = _update_planned(conn, plan, k, s, k.c.source_key == s.c.source_key, values)
    counts.added = _insert_planned(
        conn, plan, k, s, {"practitioner_id": practitioners.c.principal_id, "source_key": s.c.source_key,
                     "source": sa.literal(source), "kind": s.c.kind, **values},
        s.join(practitioners, practitioners.c.national_id == s.c.national_id))
    return counts


def apply_activity(conn: sa.Connection, plan: Plan, report: Report, now: dt.datetime, *,
                   with_skills: bool) -> Applied:
    """Write the plan of a PS_LibreAcces_Personne_activite file (`plan_activity`).

    What left the file goes first (children before parents); then principals, practitioners, sites,
    activities and skills are updated and added.
    """
    sql = _Sql(conn, now)
    sp, so, sa_ = stg_practitioners, stg_organisations, stg_activities
    p, o, a, k = practitioners, organisations, activities, practitioner_skills
    _reject_kind_conflicts(conn, plan, sp, "national_id", PERSON, report)
    _reject_kind_conflicts(conn, plan, so, "structure_id", ORGANISATION, report)
    entities = {name: EntityCounts() for name in ("practitioners", "organisations", "activities")}

    entities["activities"].removed = _delete_gone(conn, a, a.c.id, "activity")
    skills_removed = _delete_gone(conn, k, k.c.id, "skill")
    conn.execute(sa.delete(k).where(k.c.practitioner_id.in_(_gone("practitioner"))))
    conn.execute(sa.delete(a).where(a.c.practitioner_id.in_(_gone("practitioner"))))
    entities["practitioners"].removed = _delete_gone(conn, p, p.c.principal_id, "practitioner")
    conn.execute(sa.update(a).where(a.c.organisation_id.in_(_gone("organisation"))).values(organisation_id=None))
    entities["organisations"].removed = _delete_gone(conn, o, o.c.id, "organisation")

    _sync_display_names(conn, sql, plan, sp, "national_id", PERSON)
    _sync_display_names(conn, sql, plan, so, "structure_id", ORGANISATION)
    created = _create_principals(conn, sql, plan, sp, "national_id", PERSON)
    created += _create_principals(conn, sql, plan, so, "structure_id", ORGANISATION)

    values = {**_practitioner_values(sql), "updated_at": sql.now}
    entities["practitioners"].changed = _update_planned(conn, plan, p, sp, p.c.national_id == sp.c.national_id,
                                                        values)
    entities["practitioners"].added = _insert_planned(
        conn, plan, p, sp, {"principal_id": principals.c.id, "national_id": sp.c.national_id, **values},
        sp.join(principals, sa.and_(principals.c.national_id == sp.c.national_id, principals.c.kind == PERSON)))

    values = {**_organisation_values(sql), "updated_at": sql.now}
    entities["organisations"].changed = _update_planned(conn, plan, o, so, o.c.structure_id == so.c.structure_id,
                                                        values)
    entities["organisations"].added = _insert_planned(
        conn, plan, o, so, {"principal_id": principals.c.id, "structure_id": so.c.structure_id, **values},
        so.join(principals, sa.and_(principals.c.national_id == so.c.structure_id,
                                    principals.c.kind == ORGANISATION)))

    values = {**_activity_values(sql), "updated_at": sql.now}
    entities["activities"].changed = _update_planned(conn, plan, a, sa_, a.c.source_key == sa_.c.source_key,
                                                     values)
    entities["activities"].added = _insert_planned(
        conn, plan, a, sa_,
        {"practitioner_id": p.c.principal_id, "organisation_id": o.c.id, "source_key": sa_.c.source_key, **values},
        sa_.join(p, p.c.national_id == sa_.c.national_id).outerjoin(o, o.c.structure_id == sa_.c.structure_id))

    if with_skills:
        entities["skills"] = _apply_skills(conn, sql, plan, "activity", skills_removed)
    return Applied(entities, created)


def apply_skills(conn: sa.Connection, plan: Plan, now: dt.datetime, source: str) -> Applied:
    """Write the plan of a PS_LibreAcces_SavoirFaire / PS_LibreAcces_Dipl_AutExerc file (`plan_skills`)."""
    k = practitioner_skills
    removed = _delete_gone(conn, k, k.c.id, "skill")
    return Applied({"skills": _apply_skills(conn, _Sql(conn, now), plan, source, removed)})


def apply_mailboxes(conn: sa.Connection, report: Report, now: dt.datetime) -> Applied:
    """Extraction_Correspondance_MSSante: the national mailboxes (source "national").

    The address and type of a mailbox never change (REFERENCE.md §1), nor does its holder: a line that
    would change them is rejected and the mailbox stays as it is. A line for a local mailbox is skipped
    with a warning. A national mailbox that left the file is deactivated (counted as removed) and
    reactivated if it comes back (counted as added).
    """
    sql = _Sql(conn, now)
    s, m = stg_mailboxes, mailboxes
    pending = s.c.status.is_(None)

    # Owners: create the principals that do not exist yet, then refuse lines whose owner is of another kind.
    name = sa.func.coalesce(sql.val(s.c.owner_name, principals.c.display_name), s.c.owner_national_id)
    owners = (sa.select(sa.func.min(s.c.owner_kind), s.c.owner_national_id, sa.func.min(name),
                        sa.func.min(sql.text(s.c.owner_name_norm, principals.c.name_norm)), sql.now)
              .where(~sa.exists().where(principals.c.national_id == s.c.owner_national_id))
              .group_by(s.c.owner_national_id))
    created = _rows(conn.execute(sa.insert(principals).from_select(
        ["kind", "national_id", "display_name", "name_norm", "created_at"], owners)))
    conn.execute(sa.update(principals)
                 .where(principals.c.name_norm.is_(None), principals.c.national_id == s.c.owner_national_id,
                        s.c.owner_name_norm.is_not(None))
                 .values(name_norm=sql.text(s.c.owner_name_norm, principals.c.name_norm)))
    conn.execute(
        sa.update(principals)
        .where(principals.c.kind == ORGANISATION, principals.c.organisation.is_(None),
               principals.c.national_id.in_(sa.select(s.c.owner_national_id).where(s.c.owner_kind == ORGANISATION)))
        .values(organisation=principals.c.display_name))

    def mark(status: str, condition: sa.ColumnElement[bool]) -> None:
        conn.execute(sa.update(s).where(pending, condition).values(status=status))

    clash = sa.exists().where(principals.c.national_id == s.c.owner_national_id, principals.c.kind != s.c.owner_kind)
    for line_no, address, owner in conn.execute(
            sa.select(s.c.line_no, s.c.address, s.c.owner_national_id).where(pending, clash)):
        report.reject(line_no, f"mailbox {address}: national id {owner} belongs to a principal of another kind")
    mark("rejected", clash)

    local = sa.exists().where(m.c.address == s.c.address, m.c.source != NATIONAL)
    for line_no, address in conn.execute(sa.select(s.c.line_no, s.c.address).where(pending, local)):
        report.warn(line_no, f"mailbox {address} is managed locally: the national line is not applied")
    mark("local", local)

    existing = s.join(m, sa.and_(m.c.address == s.c.address, m.c.source == NATIONAL))
    for line_no, address, old, new in conn.execute(
            sa.select(s.c.line_no, s.c.address, m.c.mailbox_type, s.c.mailbox_type).select_from(existing)
            .where(pending, m.c.mailbox_type != s.c.mailbox_type)):
        report.reject(line_no, f"mailbox {address}: its type cannot change ({old} → {new})")
    mark("rejected", sa.exists().where(m.c.address == s.c.address, m.c.source == NATIONAL,
                                       m.c.mailbox_type != s.c.mailbox_type))

    holder = existing.join(principals, principals.c.id == m.c.owner_id)
    for line_no, address, old, new in conn.execute(
            sa.select(s.c.line_no, s.c.address, principals.c.national_id, s.c.owner_national_id)
            .select_from(holder).where(pending, principals.c.national_id != s.c.owner_national_id)):
        report.reject(line_no, f"mailbox {address}: its holder cannot change ({old} → {new})")
    mark("rejected", sa.exists().where(
        m.c.address == s.c.address, m.c.source == NATIONAL, principals.c.id == m.c.owner_id,
        principals.c.national_id != s.c.owner_national_id))

    counts = EntityCounts()
    counts.removed = _rows(conn.execute(
        sa.update(m).where(m.c.source == NATIONAL, m.c.active.is_(True),
                           ~sa.exists().where(s.c.address == m.c.address))
        .values(active=False, updated_at=sql.now)))
    values: Values = {
        "service": sql.val(s.c.service, m.c.service),
        "structure_id": sql.val(s.c.structure_id, m.c.structure_id),
        "dematerialisation": sa.case((s.c.dematerialisation == 1, sa.true()),
                                     (s.c.dematerialisation == 0, sa.false()), else_=sa.null()),
        "hosted": sa.case((s.c.hosted == 1, sa.true()), else_=sa.false()),
        "updated_at": sql.now,
    }
    reactivated = _rows(conn.execute(
        sa.update(m).where(m.c.address == s.c.address, m.c.source == NATIONAL, m.c.active.is_(False), pending)
        .values({m.c[k]: v for k, v in {**values, "active": sa.true()}.items()})))
    counts.changed = _update_changed(conn, m, m.c.address == s.c.address, values,
                                     m.c.source == NATIONAL, m.c.active.is_(True), pending)
    columns: Values = {
        "address": s.c.address, "mailbox_type": s.c.mailbox_type, "owner_id": principals.c.id,
        "source": sa.literal(NATIONAL), "liste_rouge": sa.false(), "preference": sa.literal(0),
        "active": sa.true(), "created_at": sql.now, **values,
    }
    counts.added = reactivated + _insert_new(
        conn, m, "address", s.c.address, columns,
        s.join(principals, principals.c.national_id == s.c.owner_national_id), pending)
    return Applied({"mailboxes": counts}, created)
