"""The directory import, re-import and search on PostgreSQL, on a fresh database created and dropped here.

The same scenarios as test_importers.py (staging in temporary tables loaded with COPY, UPDATE … FROM,
IS DISTINCT FROM, foreign keys dropped and added back around a bulk insert), plus what only PostgreSQL
has: byte-wise ("C") collation of the normalised columns, so that prefix ranges are exact and indexed.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from directory.importers import import_file
from directory.model import MailboxType
from directory.schema import practitioners
from directory.search import SearchQuery, search
from directory.store import DirectoryStore
from tests.directory.test_importers import (
    ACTIVITY_52,
    DALMEIDA,
    DUPRE,
    HOSPITAL,
    LOCAL_DOMAIN,
    MSSANTE,
    SAVOIR_FAIRE,
    count,
    engine_for,
    lines_of,
    scenario_failed_import_changes_nothing,
    scenario_import_and_reimport,
    scenario_mailboxes,
    scenario_migration,
    scenario_parsed_on_two_cores,
    set_field,
    write_lines,
)

ADMIN_URL = os.environ.get("CADUCEE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def pg_url() -> Iterator[str]:
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"caducee_dir_{secrets.token_hex(4)}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {ADMIN_URL}: {type(exc).__name__}")
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.dispose()


def test_migration_0003(pg_url: str) -> None:
    scenario_migration(pg_url)


def test_import_and_reimport(pg_url: str, tmp_path: Path) -> None:
    scenario_import_and_reimport(pg_url, tmp_path)


def test_a_failed_import_changes_nothing(pg_url: str, tmp_path: Path) -> None:
    scenario_failed_import_changes_nothing(pg_url, tmp_path)


def test_mailboxes(pg_url: str, tmp_path: Path) -> None:
    scenario_mailboxes(pg_url, tmp_path)


def test_a_file_parsed_on_two_cores(pg_url: str, tmp_path: Path) -> None:
    scenario_parsed_on_two_cores(pg_url, tmp_path)  # the worker's rows arrive through COPY


def test_search_and_the_byte_wise_collation(pg_url: str) -> None:
    engine = engine_for(pg_url)
    try:
        for sample in (ACTIVITY_52, SAVOIR_FAIRE, MSSANTE):
            import_file(engine, sample, local_domains={LOCAL_DOMAIN})
        with engine.connect() as conn:
            collations = dict(conn.execute(sa.text(
                "SELECT column_name, collation_name FROM information_schema.columns "
                "WHERE table_name = 'practitioners' AND column_name LIKE '%norm'")).all())
        assert collations == {"name_norm": "C", "given_name_norm": "C", "profession_norm": "C"}
        assert [e.national_id for e in search(engine, SearchQuery(name="DUPRÉ"))] == [DUPRE]
        assert [e.national_id for e in search(engine, SearchQuery(name="d'alm"))] == [DALMEIDA]
        assert [e.national_id for e in search(engine, SearchQuery(city="pont", mailbox_type=MailboxType.APP))] == [
            HOSPITAL]
        assert [e.national_id for e in search(engine, SearchQuery(specialty="capacite"))] == [DUPRE]
        (entry,) = search(engine, SearchQuery(mailbox="elodie.dupre@medecin.mssante.fr"))
        assert entry.practitioner is not None and entry.practitioner.first_names == "ÉLODIE"
        assert count(engine, practitioners) == 5
        with engine.connect() as conn:  # the foreign keys dropped for the bulk insert are back
            keys = conn.execute(sa.text(
                "SELECT conname FROM pg_constraint WHERE conrelid = 'activities'::regclass AND contype = 'f' "
                "ORDER BY conname")).scalars().all()
        assert keys == ["fk_activities_organisation_id_organisations", "fk_activities_practitioner_id_practitioners"]
    finally:
        engine.dispose()


def test_overlong_values_are_cut_or_rejected_never_fatal(pg_url: str, tmp_path: Path) -> None:
    header, *rows = lines_of(ACTIVITY_52)
    long_name = "CENTRE " + "TRÈS " * 100  # 507 characters: organisations.name is VARCHAR(300)
    rows[0] = set_field(header, rows[0], "Raison sociale site", long_name)
    rows[1] = set_field(header, rows[1], "Ancien identifiant de la structure", "3" * 40)
    engine = engine_for(pg_url)
    try:
        summary = import_file(engine, write_lines(tmp_path / "long.txt", [header, *rows]))
        assert [i.line for i in summary.errors] == [3]
        assert summary.errors[0].message.startswith("structure identifier or activity codes too long (81009123456")
        hospital = DirectoryStore(engine).organisation(HOSPITAL)
        assert hospital is not None and hospital.name == long_name[:300]
        principal = DirectoryStore(engine).principal_by_national_id(HOSPITAL)
        assert principal is not None and principal.display_name == long_name[:200]
    finally:
        engine.dispose()
