"""Temporary staging tables an import loads before it applies the difference to the directory.

Each import streams its file into per-connection temporary tables (SQLAlchemy Core executemany on
SQLite, COPY on PostgreSQL with psycopg), in batches of a few thousand rows, with no constraint; then
it indexes them and keeps the first line of each natural key (`dedupe`). The plan of the difference is
written into them too (`action` of each staged row, `stg_gone` for what left the file); the directory
itself is only touched afterwards, in one transaction of set-based INSERT/UPDATE/DELETE statements
(`directory.importers.apply`).

The staging tables live in their own `MetaData`, never in the shared one that Alembic compares.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

staging_metadata = sa.MetaData()
PLAN_COLUMN = "action"
ADD, CHANGE = "add", "change"


def _table(name: str, key: str, *columns: str, ints: Sequence[str] = (), planned: bool = True) -> sa.Table:
    cols: list[sa.Column[Any]] = [sa.Column("line_no", sa.Integer, nullable=False),
                                  sa.Column(key, sa.Text, nullable=False)]
    cols += [sa.Column(c, sa.Integer if c in ints else sa.Text) for c in columns]
    if planned:  # set by the plan, never loaded: "add", "change", or NULL (unchanged)
        cols.append(sa.Column(PLAN_COLUMN, sa.Text))
    table = sa.Table(name, staging_metadata, *cols, prefixes=["TEMPORARY"])
    # The natural key with the line number, so that "the first line of a key" is an index lookup.
    # Created by `index` once the rows are loaded (cheaper than maintaining it during the load).
    sa.Index(f"{name}_key", table.c[key], table.c.line_no)
    return table


PRACTITIONER_FIELDS = (
    "id_type", "identifier", "civility_code", "civility_label", "exercise_civility_code",
    "exercise_civility_label", "last_name", "first_names", "profession_code", "profession_label",
    "category_code", "category_label",
)
stg_practitioners = _table(
    "caducee_stg_practitioners", "national_id",
    "display_name", "name_norm", "given_name_norm", "profession_norm", *PRACTITIONER_FIELDS,
)

ORGANISATION_FIELDS = (
    "technical_id", "finess", "finess_legal", "siret", "siren", "name", "trade_name", "postcode",
    "commune_code", "city", "country_code", "country_label", "department_code", "department_label",
    "phone", "phone2", "fax", "email",
)
stg_organisations = _table(
    "caducee_stg_organisations", "structure_id",
    "display_name", "name_norm", "city_norm", "address", *ORGANISATION_FIELDS,
)

ACTIVITY_FIELDS = (
    "mode_code", "mode_label", "sector_code", "sector_label", "role_code", "role_label", "genre_code",
    "genre_label", "section_code", "section_label", "registration_authority", "phone", "phone2", "fax",
    "email",
)
stg_activities = _table(
    "caducee_stg_activities", "source_key", "national_id", "structure_id", *ACTIVITY_FIELDS,
)

SKILL_FIELDS = ("type_code", "type_label", "code", "label")
stg_skills = _table(
    "caducee_stg_skills", "source_key", "national_id", "kind", "label_norm", *SKILL_FIELDS,
)

MAILBOX_FIELDS = ("service", "structure_id")
stg_mailboxes = _table(
    "caducee_stg_mailboxes", "address",
    "mailbox_type", "owner_kind", "owner_national_id", "owner_name", "owner_name_norm", *MAILBOX_FIELDS,
    "dematerialisation", "hosted", "status",
    ints=("dematerialisation", "hosted"), planned=False,
)

# Ids of the directory rows that left the file, by kind ("practitioner", "organisation", "activity",
# "skill"): found by the plan, deleted by the apply.
stg_gone = sa.Table("caducee_stg_gone", staging_metadata,
                    sa.Column("kind", sa.Text, primary_key=True), sa.Column("id", sa.Integer, primary_key=True),
                    prefixes=["TEMPORARY"])

# The natural key of each staging table (its second column).
KEYS: dict[str, str] = {
    t.name: t.columns[1].name
    for t in (stg_practitioners, stg_organisations, stg_activities, stg_skills, stg_mailboxes)
}


def loaded_columns(table: sa.Table) -> list[sa.Column[Any]]:
    """The columns the parsers fill, in the order of their rows (all but the plan)."""
    return [c for c in table.columns if c.name != PLAN_COLUMN]


def key_of(table: sa.Table) -> sa.Column[Any]:
    return table.c[KEYS[table.name]]


def create(conn: sa.Connection, tables: Sequence[sa.Table]) -> None:
    """Create the temporary tables, without their index (dropping leftovers of an earlier import)."""
    drop(conn, tables)
    for table in tables:
        conn.execute(sa.schema.CreateTable(table))


def drop(conn: sa.Connection, tables: Sequence[sa.Table]) -> None:
    for table in tables:
        conn.execute(sa.schema.DropTable(table, if_exists=True))


class BulkLoader:
    """Collects rows (tuples in table column order, `line_no` first) for one staging table and writes
    them in batches. The hot loop appends to `rows` directly (`append`) and calls `flush_if_full` from
    time to time; `flush` writes what is left."""

    def __init__(self, conn: sa.Connection, table: sa.Table, batch_size: int) -> None:
        self.conn = conn
        self.table = table
        self.batch_size = batch_size
        self.rows: list[tuple[Any, ...]] = []
        self.append = self.rows.append  # the list is emptied in place: this stays valid
        self.loaded = 0
        preparer = conn.dialect.identifier_preparer
        self.columns = loaded_columns(table)
        names = ", ".join(preparer.quote(c.name) for c in self.columns)
        self._copy_sql: str | None = None
        self._insert_sql: str | None = None
        if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg":
            self._copy_sql = f"COPY {preparer.format_table(table)} ({names}) FROM STDIN"
        elif conn.dialect.paramstyle == "qmark":
            marks = ", ".join("?" for _ in self.columns)
            self._insert_sql = f"INSERT INTO {preparer.format_table(table)} ({names}) VALUES ({marks})"

    def flush_if_full(self) -> None:
        if len(self.rows) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self._write(self.rows)
            self.loaded += len(self.rows)
            self.rows.clear()

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        if self._copy_sql is not None:
            driver_conn: Any = self.conn.connection.dbapi_connection  # a psycopg connection
            with driver_conn.cursor() as cursor, cursor.copy(self._copy_sql) as copy:
                for row in rows:
                    copy.write_row(row)
        elif self._insert_sql is not None:
            self.conn.exec_driver_sql(self._insert_sql, rows)
        else:
            names = [c.name for c in self.columns]
            self.conn.execute(sa.insert(self.table), [dict(zip(names, row)) for row in rows])


def index(conn: sa.Connection, table: sa.Table) -> None:
    """Create the index of the natural key, once the rows are loaded."""
    for idx in table.indexes:
        conn.execute(sa.schema.CreateIndex(idx))


def duplicates(conn: sa.Connection, table: sa.Table) -> list[tuple[int, str, int]]:
    """`(line, key, first line)` of every line whose key an earlier line already had."""
    key = key_of(table)
    earlier = table.alias("earlier")
    first = (sa.select(sa.func.min(earlier.c.line_no)).where(earlier.c[key.name] == key)
             .scalar_subquery())
    query = (sa.select(table.c.line_no, key, first)
             .where(sa.exists().where(earlier.c[key.name] == key, earlier.c.line_no < table.c.line_no))
             .order_by(table.c.line_no))
    return [(int(r[0]), str(r[1]), int(r[2])) for r in conn.execute(query)]


def dedupe(conn: sa.Connection, table: sa.Table) -> int:
    """Keep the first line of each key; return how many later lines were dropped."""
    key = key_of(table)
    rows, keys = conn.execute(sa.select(sa.func.count(), sa.func.count(sa.distinct(key)))).one()
    if rows == keys:
        return 0  # the usual case: counting over the index is much cheaper than probing every row
    earlier = table.alias("earlier")
    result = conn.execute(sa.delete(table).where(
        sa.exists().where(earlier.c[key.name] == key, earlier.c.line_no < table.c.line_no)
    ))
    return int(result.rowcount or 0)


def analyze(conn: sa.Connection, table: sa.Table) -> None:
    """Give the planner statistics: PostgreSQL's autovacuum never analyses temporary tables."""
    if conn.dialect.name == "postgresql":
        # Row counts and key distinctness are what the joins need: a small sample gives them (this
        # transaction only).
        conn.exec_driver_sql("SET LOCAL default_statistics_target = 10")
        conn.exec_driver_sql(f"ANALYZE {conn.dialect.identifier_preparer.format_table(table)}")
