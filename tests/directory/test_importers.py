"""Import of the national open-data files (REFERENCE.md §4, research/formats.md §1).

Samples are in tests/fixtures/rpps (see SOURCES there). The `scenario_*` functions take a database URL:
they run here on SQLite and in test_postgres_directory.py on PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from caducee import database
from directory.identifiers import PrincipalKind
from directory.importers import (
    DirectoryImportError,
    FileKind,
    ImportProgress,
    ImportSummary,
    detect,
    import_file,
    import_order,
    read_header,
)
from directory.importers.formats import FormatError, parse_header
from directory.model import (
    CertificateStatus,
    CertificateUsage,
    MailboxSource,
    MailboxType,
    SkillKind,
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
from directory.store import DirectoryStore, ImmutableMailboxField
from mailserver.db import make_engine

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rpps"
ACTIVITY_52 = FIXTURES / "PS_LibreAcces_Personne_activite_52cols_sample.txt"
ACTIVITY_56_FONCTION = FIXTURES / "PS_LibreAcces_Personne_activite_56cols_fonction_sample.txt"
ACTIVITY_56_ROLE = FIXTURES / "PS_LibreAcces_Personne_activite_56cols_role_sample.txt"
SAVOIR_FAIRE = FIXTURES / "PS_LibreAcces_SavoirFaire_sample.txt"
DIPLOMAS = FIXTURES / "PS_LibreAcces_Dipl_AutExerc_sample.txt"
MSSANTE = FIXTURES / "Extraction_Correspondance_MSSante_sample.txt"
PSC = FIXTURES / "ansforge-psc-rass-loader_Extraction_ProSanteConnect_Personne_activite_202112090858.txt"
PSC_INCONSISTENT = FIXTURES / "ansforge-psc-rass-loader_2WorkSituationsOrder1"

DUPRE = "810091234566"  # two activities (hospital, private practice), SM53
ARNAUD = "0759912345"  # ADELI
OZTURK = "810091234560"  # RPPS failing the Luhn check (line 5)
LEFEVRE = "810092345676"  # site abroad
DALMEIDA = "810093456787"  # pharmacist, L'Haÿ-les-Roses
HOSPITAL = "1259999993"  # 1 + FINESS
PRACTICE = "399912345600018"  # 3 + SIRET
LOCAL_DOMAIN = "ch-exemple.mssante.fr"


# -- helpers shared with test_postgres_directory.py and test_search.py --

def engine_for(url: str) -> sa.Engine:
    database.upgrade(url)
    return make_engine(url)


def count(engine: sa.Engine, table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one())


def counts(summary: ImportSummary) -> dict[str, tuple[int, int, int]]:
    return {name: (c.added, c.changed, c.removed) for name, c in summary.entities.items()}


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def write_lines(path: Path, lines: list[str], *, newline: str = "\n", bom: bool = False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + (newline.join(lines) + newline).encode("utf-8"))
    return path


def set_field(header: str, line: str, column: str, value: str) -> str:
    """`line` with the value of the column named `column` (as written in `header`) replaced."""
    names = header.split("|")
    fields = line.split("|")
    fields[names.index(column)] = value
    return "|".join(fields)


def snapshot(engine: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the directory tables, to compare states."""
    tables = (principals, practitioners, practitioner_skills, organisations, activities, mailboxes, directory_imports)
    with engine.connect() as conn:
        return {t.name: sorted(tuple(map(str, r)) for r in conn.execute(sa.select(t))) for t in tables}


def modified_activity_file(tmp_path: Path) -> Path:
    """The 52-column sample with: Öztürk's line removed, the practice's phone changed, Lefèvre's name
    changed, and a new pharmacist at the pharmacy."""
    header, *rows = lines_of(ACTIVITY_52)
    rows = [r for r in rows if "|810091234560|" not in r]
    rows = [set_field(header, r, "Téléphone (coord. structure)", "0381999999") if PRACTICE in r else r for r in rows]
    rows = [set_field(header, r, "Nom d'exercice", "LEFEBVRE") if LEFEVRE in r else r for r in rows]
    newcomer = next(r for r in rows if DALMEIDA in r)
    for column, value in (("Identifiant PP", "10098765430"), ("Identification nationale PP", "810098765430"),
                          ("Nom d'exercice", "MARCHAND"), ("Prénom d'exercice", "AGNÈS")):
        newcomer = set_field(header, newcomer, column, value)
    return write_lines(tmp_path / "PS_LibreAcces_Personne_activite_modified.txt", [header, *rows, newcomer])


# -- scenarios (SQLite here, PostgreSQL in test_postgres_directory.py) --

def scenario_import_and_reimport(url: str, tmp_path: Path) -> None:
    engine = engine_for(url)
    try:
        first = import_file(engine, ACTIVITY_52)
        assert first.kind is FileKind.ACTIVITY
        assert (first.lines, first.rejected, first.warnings) == (6, 0, 1)
        assert counts(first) == {"practitioners": (5, 0, 0), "organisations": (5, 0, 0), "activities": (6, 0, 0),
                                 "skills": (2, 0, 0)}
        assert first.principals_created == 10

        second = import_file(engine, modified_activity_file(tmp_path))
        assert counts(second) == {"practitioners": (1, 1, 1), "organisations": (0, 1, 0), "activities": (1, 1, 1),
                                  "skills": (0, 0, 0)}
        assert (second.added, second.changed, second.removed) == (2, 3, 2)
        store = DirectoryStore(engine)
        assert store.practitioner(OZTURK) is None
        assert store.principal_by_national_id(OZTURK) is not None  # principals are never deleted
        lefebvre = store.practitioner(LEFEVRE)
        assert lefebvre is not None and lefebvre.last_name == "LEFEBVRE"
        principal = store.principal_by_national_id(LEFEVRE)
        assert principal is not None and principal.display_name == "JEAN-MARIE LEFEBVRE"
        practice = store.organisation(PRACTICE)
        assert practice is not None and practice.phone == "0381999999"
        assert count(engine, activities) == 6
        assert count(engine, directory_imports) == 2

        third = import_file(engine, modified_activity_file(tmp_path))
        assert (third.added, third.changed, third.removed) == (0, 0, 0)
    finally:
        engine.dispose()


def scenario_failed_import_changes_nothing(url: str, tmp_path: Path) -> None:
    engine = engine_for(url)
    try:
        import_file(engine, ACTIVITY_52)
        before = snapshot(engine)

        def fail(conn: sa.Connection, summary: ImportSummary) -> None:
            assert summary.changed == 3  # the changes were made inside this transaction…
            raise RuntimeError("disk full")

        with pytest.raises(RuntimeError, match="disk full"):
            import_file(engine, modified_activity_file(tmp_path), on_applied=fail)
        assert snapshot(engine) == before  # …and rolled back with it

        header, *rows = lines_of(ACTIVITY_52)
        garbage = write_lines(tmp_path / "mostly_bad.txt", [header, rows[0], *("8|1|2|" for _ in range(5))])
        with pytest.raises(DirectoryImportError, match="5 of 6 lines rejected"):
            import_file(engine, garbage)
        assert snapshot(engine) == before
    finally:
        engine.dispose()


def scenario_mailboxes(url: str, tmp_path: Path) -> None:
    engine = engine_for(url)
    try:
        import_file(engine, ACTIVITY_52)
        store = DirectoryStore(engine)
        dupre = store.principal_by_national_id(DUPRE)
        assert dupre is not None
        local = store.add_mailbox("elodie.dupre@ch-exemple.mssante.fr", MailboxType.PER, dupre)

        summary = import_file(engine, MSSANTE, local_domains={LOCAL_DOMAIN})
        assert counts(summary) == {"mailboxes": (7, 0, 0)}
        assert summary.principals_created == 2  # the person outside the RPPS sample, the EHPAD
        assert summary.warnings == 1 and summary.warning_samples[0].line == 2
        assert "managed locally" in summary.warning_samples[0].message
        assert store.mailbox(local.address) == local  # the local mailbox is left as it was

        org = store.mailbox("secretariat.cardio@ch-exemple.mssante.fr")
        assert org is not None and org.source is MailboxSource.NATIONAL and org.hosted
        assert (org.mailbox_type, org.service, org.structure_id, org.dematerialisation) == (
            MailboxType.ORG, "Cardiologie", HOSPITAL, True)
        hospital = store.principal_by_national_id(HOSPITAL)
        assert hospital is not None and org.owner_id == hospital.id
        assert hospital.kind is PrincipalKind.ORGANISATION
        app = store.mailbox("lis@ch-exemple.mssante.fr")
        assert app is not None and app.owner_id == hospital.id  # "1" + FINESS given whole
        personal = store.mailbox("Elodie.Dupre@medecin.mssante.fr")
        assert personal is not None and personal.owner_id == dupre.id
        assert (personal.hosted, personal.dematerialisation) == (False, False)
        cab = store.mailbox("cabinet.dupre@medecin.mssante.fr")
        assert cab is not None and cab.owner_id == dupre.id and cab.structure_id == PRACTICE
        newcomer = store.principal_by_national_id("810097890122")
        assert newcomer is not None and newcomer.display_name == "MAËLLE HORS-RPPS"
        ehpad = store.principal_by_national_id("1259999977")
        assert ehpad is not None and ehpad.kind is PrincipalKind.ORGANISATION
        assert ehpad.display_name == "EHPAD LES TILLEULS EXEMPLE"
        # Logins see the mailboxes hosted here only.
        assert [m.address for m in store.mailboxes_of(dupre.id)] == [local.address]
        assert store.mailbox_by_address("elodie.dupre@medecin.mssante.fr") is None
        assert {m.address for m in store.mailboxes_of(hospital.id)} == {
            "lis@ch-exemple.mssante.fr", "secretariat.cardio@ch-exemple.mssante.fr"}
        # What a login reads, in one go: the same principal and mailboxes, nothing for an unknown id.
        assert store.login_view(HOSPITAL) == (hospital, store.mailboxes_of(hospital.id))
        assert store.login_view(DUPRE) == (dupre, [local])
        assert store.login_view("899999999999") is None

        # The next extraction drops two mailboxes and changes the type of another: the type change is
        # refused (the mailbox stays as it is), the dropped ones are deactivated, the local one stays.
        header, *rows = lines_of(MSSANTE)
        kept = [r for r in rows if "accueil@ehpad" not in r and "cecile.arnaud" not in r]
        kept = [set_field(header, r, "Type de BAL", "CAB") if r.startswith("ORG|secretariat") else r for r in kept]
        kept = [set_field(header, r, "Service de rattachement", "Cardiologie interventionnelle")
                if r.startswith("APP|lis@") else r for r in kept]
        second = import_file(engine, write_lines(tmp_path / "Extraction_Correspondance_MSSante_2.txt",
                                                 [header, *kept]), local_domains={LOCAL_DOMAIN})
        assert counts(second) == {"mailboxes": (0, 1, 2)}
        assert second.rejected == 1
        assert second.errors[0].line == 4 and "type cannot change (ORG → CAB)" in second.errors[0].message
        changed = store.mailbox("secretariat.cardio@ch-exemple.mssante.fr")
        assert changed is not None and changed.mailbox_type is MailboxType.ORG
        assert store.mailbox_by_address("secretariat.cardio@ch-exemple.mssante.fr") is not None
        assert count(engine, mailboxes, mailboxes.c.active.is_(False)) == 2
        assert store.mailbox_by_address(local.address) == local
        app = store.mailbox("lis@ch-exemple.mssante.fr")
        assert app is not None and app.service == "Cardiologie interventionnelle"

        # They come back: reactivated, counted as added.
        third = import_file(engine, MSSANTE, local_domains={LOCAL_DOMAIN})
        assert counts(third) == {"mailboxes": (2, 1, 0)}
        assert count(engine, mailboxes, mailboxes.c.active.is_(False)) == 0
    finally:
        engine.dispose()


def scenario_parsed_on_two_cores(url: str, tmp_path: Path) -> None:
    """The second half of a file read by a worker process gives the same directory, the same line
    numbers, and finds duplicates across the halves."""
    header, *rows = lines_of(MSSANTE)
    bad = [*rows, set_field(header, rows[0], "Type de BAL", "XYZ"), rows[2]]  # lines 10 and 11
    path = write_lines(tmp_path / "Extraction_Correspondance_MSSante_big.txt", [header, *bad])
    states = []
    for parallel in (False, True):
        engine = engine_for(url if parallel else f"sqlite:///{tmp_path / 'one_core.db'}")
        try:
            import_file(engine, ACTIVITY_52, parallel_parse=parallel)
            summary = import_file(engine, path, local_domains={LOCAL_DOMAIN}, parallel_parse=parallel)
            store = DirectoryStore(engine)
            holders = {m.address: store.principal(m.owner_id) for m in store.all_mailboxes(hosted_only=False)}
            states.append(([(i.line, i.message) for i in summary.errors], counts(summary), summary.lines,
                           sorted((m.address, m.mailbox_type.value, getattr(holders[m.address], "national_id", None),
                                   m.hosted) for m in store.all_mailboxes(hosted_only=False))))
        finally:
            engine.dispose()
    assert states[0] == states[1]
    assert states[1][0] == [(10, "unknown Type de BAL 'XYZ' (expected PER, ORG, APP or CAB)"),
                            (11, "mailbox secretariat.cardio@ch-exemple.mssante.fr already listed on line 4")]
    assert states[1][1] == {"mailboxes": (8, 0, 0)} and states[1][2] == 10


def scenario_migration(url: str) -> None:
    """0003 upgrades a 0002 database holding mailboxes, folders and messages (the mailboxes become local
    and hosted; no table is rebuilt, which would break the foreign keys of those rows), matches the
    models exactly, and downgrades."""
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    import mailserver.schema  # noqa: F401 - the mail server's tables are on the same metadata
    from directory.schema import metadata

    config = database.alembic_config(url)
    command.upgrade(config, "0002")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO principals (kind, national_id, display_name, created_at) "
                                 "VALUES ('person', :nid, 'Camille Martin', :now)"),
                         {"nid": DUPRE, "now": dt.datetime.now(dt.UTC)})
            conn.execute(sa.text("INSERT INTO mailboxes (address, mailbox_type, owner_id, created_at) "
                                 "SELECT 'camille@caducee.test', 'PER', id, created_at FROM principals"))
            conn.execute(sa.text("INSERT INTO mailbox_access (mailbox_id, principal_id) "
                                 "SELECT id, owner_id FROM mailboxes"))
            conn.execute(sa.text("INSERT INTO folders (mailbox_id, name, uidvalidity) SELECT id, 'INBOX', 1 "
                                 "FROM mailboxes"))
            conn.execute(sa.text("INSERT INTO messages (folder_id, uid, blob, size, internaldate) "
                                 "SELECT id, 1, 'b', 1, :now FROM folders"), {"now": dt.datetime.now(dt.UTC)})
        command.upgrade(config, "head")
        box = DirectoryStore(engine).mailbox_by_address("camille@caducee.test")
        assert box is not None and box.source is MailboxSource.LOCAL and box.hosted
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []
        command.downgrade(config, "0002")
        with engine.connect() as conn:
            assert "practitioners" not in sa.inspect(conn).get_table_names()
            assert "source" not in {c["name"] for c in sa.inspect(conn).get_columns("mailboxes")}
        command.upgrade(config, "head")
    finally:
        engine.dispose()


# -- tests --

def test_migration_0003(url: str) -> None:
    scenario_migration(url)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'directory.db'}"


@pytest.fixture
def engine(url: str) -> Iterator[sa.Engine]:
    e = engine_for(url)
    yield e
    e.dispose()


@pytest.mark.parametrize(("path", "kind"), [
    (ACTIVITY_52, FileKind.ACTIVITY),
    (ACTIVITY_56_FONCTION, FileKind.ACTIVITY),
    (ACTIVITY_56_ROLE, FileKind.ACTIVITY),
    (PSC, FileKind.ACTIVITY),
    (SAVOIR_FAIRE, FileKind.SAVOIR_FAIRE),
    (DIPLOMAS, FileKind.DIPLOMA),
    (MSSANTE, FileKind.MSSANTE),
])
def test_each_file_kind_is_detected_by_its_header(path: Path, kind: FileKind) -> None:
    assert detect(path) is kind


@pytest.mark.parametrize(("path", "width", "role"), [
    (ACTIVITY_52, 52, None),
    (ACTIVITY_56_FONCTION, 56, "Code fonction"),
    (ACTIVITY_56_ROLE, 56, "Code rôle"),
])
def test_every_activity_header_variant_maps_by_name(path: Path, width: int, role: str | None) -> None:
    header = read_header(path)
    assert header.width == width
    assert header.ignored == ()  # every column of the three releases is understood
    for field in ("exercise_civility_label", "street_repeat", "department_code", "structure_id", "email"):
        assert header.has(field), field
    if role is None:
        assert not header.has("role_code") and not header.has("genre_code")
    else:
        assert header.columns[header.index["role_code"]] == role
        assert header.has("genre_label")


def test_headers_that_are_not_national_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="unrecognised header"):
        parse_header("nom|prénom|ville|")
    with pytest.raises(FormatError, match=r"needed \(normalised names\): 'identifiant pp'$"):
        parse_header("Type d'identifiant PP|Identification nationale PP|Nom d'exercice|Code profession|"
                     "Code mode exercice|Ancien identifiant de la structure|")
    with pytest.raises(FormatError, match="not a PS_LibreAcces_SavoirFaire header"):
        parse_header(lines_of(MSSANTE)[0], FileKind.SAVOIR_FAIRE)
    empty = write_lines(tmp_path / "empty.txt", [""])
    with pytest.raises(DirectoryImportError, match="empty"):
        detect(empty)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(lines_of(ACTIVITY_52)[0].encode("latin-1") + b"\n")
    with pytest.raises(DirectoryImportError, match="header is not UTF-8"):
        detect(latin1)
    with pytest.raises(DirectoryImportError, match="cannot read"):
        detect(tmp_path / "missing.txt")


def test_activity_file_fills_practitioners_sites_and_activities(engine: sa.Engine) -> None:
    summary = import_file(engine, ACTIVITY_52)
    assert summary.warning_samples[0].line == 5
    assert summary.warning_samples[0].message == "RPPS 10091234560 fails the Luhn check (imported)"
    store = DirectoryStore(engine)

    dupre = store.practitioner(DUPRE)
    assert dupre is not None
    assert (dupre.rpps, dupre.last_name, dupre.first_names) == ("10091234566", "DUPRÉ", "ÉLODIE")
    assert (dupre.exercise_civility_code, dupre.civility_label) == ("DR", "Madame")
    assert (dupre.profession_code, dupre.profession_label, dupre.category_code) == ("10", "Médecin", "C")
    principal = store.principal_by_national_id(DUPRE)
    assert principal is not None and principal.kind is PrincipalKind.PERSON
    assert principal.display_name == "ÉLODIE DUPRÉ" and dupre.principal_id == principal.id
    with engine.connect() as conn:
        norms = conn.execute(sa.select(practitioners.c.name_norm, practitioners.c.given_name_norm)
                             .where(practitioners.c.national_id == DALMEIDA)).one()
    assert tuple(norms) == ("d almeida francois", "francois d almeida")

    sites = {a.mode_code: a for a in store.activities_of(dupre.principal_id)}
    assert set(sites) == {"S", "L"}
    assert (sites["S"].sector_code, sites["S"].sector_label, sites["S"].registration_authority) == (
        "SA01", "Etablissement Public de santé", "CNOM/CNOM/ARS")
    assert sites["L"].phone == "0381111111"
    assert [(s.kind, s.code, s.source) for s in store.skills_of(dupre.principal_id)] == [
        (SkillKind.SAVOIR_FAIRE, "SM53", "activity")]

    hospital = store.organisation(HOSPITAL)
    assert hospital is not None
    assert (hospital.finess, hospital.finess_legal, hospital.technical_id) == ("259999993", "259999985", "F259999993")
    assert hospital.address == "2 Faubourg SAINT ÉTIENNE\nCS 10329\n25304 PONTARLIER CEDEX"
    assert (hospital.postcode, hospital.city, hospital.email) == ("25304", "Pontarlier", "contact@ch-exemple.fr")
    assert sites["S"].organisation_id == hospital.id
    org_principal = store.principal_by_national_id(HOSPITAL)
    assert org_principal is not None and org_principal.kind is PrincipalKind.ORGANISATION
    assert org_principal.organisation == "CENTRE HOSPITALIER EXEMPLE DU HAUT-DOUBS"

    arnaud = store.practitioner(ARNAUD)
    assert arnaud is not None and (arnaud.id_type, arnaud.identifier, arnaud.rpps) == ("0", "759912345", None)
    abroad = store.organisation("399951528300016")
    assert abroad is not None and abroad.address is not None and abroad.address.endswith("Royaume-uni")
    assert abroad.postcode == "GL"
    pharmacy = store.organisation("399977788800021")
    assert pharmacy is not None and pharmacy.city == "L'Haÿ-les-Roses"
    with engine.connect() as conn:
        city_norm = conn.execute(sa.select(organisations.c.city_norm)
                                 .where(organisations.c.id == pharmacy.id)).scalar_one()
        section = conn.execute(sa.select(activities.c.section_label)
                               .where(activities.c.organisation_id == pharmacy.id)).scalar_one()
    assert city_norm == "l hay les roses"
    assert section == "Pharmacien titulaire d'officine"
    assert count(engine, practitioners, practitioners.c.national_id == OZTURK) == 1  # imported despite Luhn


def test_56_column_releases_bring_roles_and_activity_kinds(engine: sa.Engine) -> None:
    summary = import_file(engine, ACTIVITY_56_FONCTION)
    assert counts(summary)["activities"] == (2, 0, 0)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(activities.c.mode_code, activities.c.role_code, activities.c.role_label,
                                      activities.c.genre_code).order_by(activities.c.mode_code)).all()
    assert [tuple(r) for r in rows] == [("L", None, None, "GENR01"), ("S", "FON-09", "Chef de service", "GENR01")]
    store = DirectoryStore(engine)
    nguyen = store.practitioner("810094567897")
    assert nguyen is not None and nguyen.exercise_civility_label == "Professeur"  # "Libellé civilité exercice"

    summary = import_file(engine, ACTIVITY_56_ROLE)  # header without its trailing "|"
    assert (summary.lines, summary.rejected) == (1, 0)
    with engine.connect() as conn:
        row = conn.execute(sa.select(activities.c.role_code, activities.c.role_label, activities.c.genre_label)).one()
    assert tuple(row) == ("FON-05", "Titulaire de cabinet", "Activité standard de soin")


def test_pro_sante_connect_extraction_is_read_and_its_inconsistent_lines_refused(engine: sa.Engine) -> None:
    summary = import_file(engine, PSC)
    assert counts(summary)["practitioners"] == (1, 0, 0)
    assert "Date de naissance" in summary.ignored_columns  # birth data is not kept
    person = DirectoryStore(engine).practitioner("0533100558")
    assert person is not None and person.first_names == "Brigitte"
    assert DirectoryStore(engine).organisation("1510032549") is not None
    with pytest.raises(DirectoryImportError, match=r"no usable line among 2 \(line 2: Identification nationale PP "
                                                    r"810107592544 does not match type 8 \+ 10107582544\)"):
        import_file(engine, PSC_INCONSISTENT)


def test_bom_crlf_and_a_missing_trailing_pipe_are_accepted(engine: sa.Engine, tmp_path: Path) -> None:
    header, *rows = lines_of(ACTIVITY_52)
    rows[1] = rows[1][:-1]  # this line lacks its trailing "|"
    path = write_lines(tmp_path / "bom_crlf.txt", [header, *rows], newline="\r\n", bom=True)
    summary = import_file(engine, path)
    assert (summary.lines, summary.rejected) == (6, 0)
    assert counts(summary)["activities"] == (6, 0, 0)
    practice = DirectoryStore(engine).organisation(PRACTICE)
    assert practice is not None and practice.phone == "0381111111"  # no "\r" left in the last values


def test_bad_lines_are_reported_with_their_number_and_the_rest_goes_in(engine: sa.Engine, tmp_path: Path) -> None:
    header, *rows = lines_of(ACTIVITY_52)
    good = rows[0]
    bad = {
        3: set_field(header, good, "Identifiant PP", "1009123456"),
        4: set_field(header, good, "Type d'identifiant PP", "5"),
        5: set_field(header, good, "Identification nationale PP", "810000000000"),
        6: good.rsplit("|", 3)[0] + "|",
        7: good + "extra|",
        8: set_field(header, set_field(header, set_field(header, good, "Identifiant PP", "10096789010"),
                                       "Identification nationale PP", "810096789010"), "Nom d'exercice", ""),
    }
    lines = [header, good, *bad.values()]
    path = tmp_path / "bad.txt"
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8") + b"8|\xff\xfe|broken|\n" + "\n".join(rows[1:]).encode())
    with pytest.raises(DirectoryImportError, match="7 of 13 lines rejected"):
        import_file(engine, path)  # more than half: the wrong file, most likely
    summary = import_file(engine, path, max_rejected_ratio=0.6)
    assert summary.lines == 13
    assert summary.rejected == 7
    assert [(i.line, i.message) for i in summary.errors] == [
        (3, "RPPS '1009123456' is not 11 digits"),
        (4, "unsupported identifier type '5' (expected 8 RPPS or 0 ADELI)"),
        (5, "Identification nationale PP 810000000000 does not match type 8 + 10091234566"),
        (6, "50 fields instead of 52"),
        (7, "53 fields instead of 52"),
        (8, "no Nom d'exercice"),
        (9, "not valid UTF-8 (byte 0xff at column 3)"),
    ]
    assert counts(summary)["practitioners"] == (5, 0, 0)
    assert counts(summary)["activities"] == (6, 0, 0)


def test_a_file_parsed_on_two_cores_gives_the_same_result(url: str, tmp_path: Path) -> None:
    scenario_parsed_on_two_cores(url, tmp_path)


def test_the_worker_reports_bad_lines_with_their_numbers(engine: sa.Engine, tmp_path: Path) -> None:
    header, *rows = lines_of(ACTIVITY_52)
    lines = [header, *rows, *rows[:2], "8|1|2|", rows[0].replace("|810091234566|", "|8123|")]
    summary = import_file(engine, write_lines(tmp_path / "halves.txt", lines), parallel_parse=True)
    assert summary.lines == 10
    assert [(i.line, i.message) for i in summary.errors] == [
        (10, "3 fields instead of 52"),
        (11, "Identification nationale PP 8123 does not match type 8 + 10091234566")]
    assert [i.line for i in summary.warning_samples] == [5]
    assert counts(summary)["activities"] == (6, 0, 0)


def test_reimport_applies_the_difference(url: str, tmp_path: Path) -> None:
    scenario_import_and_reimport(url, tmp_path)


def test_a_failed_import_changes_nothing(url: str, tmp_path: Path) -> None:
    scenario_failed_import_changes_nothing(url, tmp_path)


def test_an_import_applied_while_another_was_planned_is_refused(engine: sa.Engine) -> None:
    import_file(engine, ACTIVITY_52)
    before = snapshot(engine)

    def meanwhile(progress: ImportProgress) -> None:
        if progress.phase == "applying":  # between the plan and the write transaction
            with engine.begin() as conn:
                conn.execute(sa.insert(directory_imports).values(
                    kind="PS_LibreAcces_SavoirFaire", file_name="other.txt",
                    started_at=dt.datetime.now(dt.UTC), lines=0))

    with pytest.raises(DirectoryImportError, match="another import was applied while this one was being prepared"):
        import_file(engine, ACTIVITY_56_FONCTION, progress=meanwhile)
    after = snapshot(engine)
    assert len(after["directory_imports"]) == len(before["directory_imports"]) + 1  # only the other one
    assert {k: v for k, v in after.items() if k != "directory_imports"} == {
        k: v for k, v in before.items() if k != "directory_imports"}


def test_a_file_without_usable_lines_is_refused(engine: sa.Engine, tmp_path: Path) -> None:
    header = lines_of(ACTIVITY_52)[0]
    with pytest.raises(DirectoryImportError, match="no usable line among 0"):
        import_file(engine, write_lines(tmp_path / "header_only.txt", [header]))
    assert count(engine, directory_imports) == 0 and count(engine, principals) == 0


def test_columns_are_found_by_name_whatever_their_order(engine: sa.Engine, tmp_path: Path) -> None:
    header, *rows = lines_of(ACTIVITY_52)
    order = list(range(52))
    random.Random(7).shuffle(order)

    def shuffle(line: str) -> str:
        fields = line.split("|")[:52]
        return "|".join(fields[i] for i in order) + "|"

    summary = import_file(engine, write_lines(tmp_path / "shuffled.txt", [shuffle(header), *map(shuffle, rows)]))
    assert counts(summary)["activities"] == (6, 0, 0)
    shuffled = snapshot(engine)
    assert import_file(engine, ACTIVITY_52).changed == 0  # the same content, in the usual order
    assert snapshot(engine)["practitioners"] == shuffled["practitioners"]


def test_savoir_faire_and_diplomas_attach_to_known_practitioners(engine: sa.Engine, tmp_path: Path) -> None:
    import_file(engine, ACTIVITY_52)
    summary = import_file(engine, SAVOIR_FAIRE)
    assert counts(summary) == {"skills": (4, 0, 0)}
    assert summary.warnings == 2
    assert [i.line for i in summary.warning_samples] == [4, 5]
    assert "not in the directory" in summary.warning_samples[1].message
    store = DirectoryStore(engine)
    dupre = store.practitioner(DUPRE)
    assert dupre is not None
    assert {(s.code, s.source) for s in store.skills_of(dupre.principal_id)} == {
        ("SM53", "activity"), ("SM53", "savoir_faire"), ("CAPA16", "savoir_faire")}

    summary = import_file(engine, DIPLOMAS)
    assert counts(summary) == {"skills": (4, 0, 0)}
    lefevre = store.practitioner(LEFEVRE)
    assert lefevre is not None
    assert {(s.kind, s.code, s.type_code) for s in store.skills_of(lefevre.principal_id) if s.source == "diploma"} == {
        (SkillKind.DIPLOMA, "DU12", "DU"), (SkillKind.AUTHORISATION, "AE10", "AE")}

    header, *rows = lines_of(SAVOIR_FAIRE)
    shorter = write_lines(tmp_path / "PS_LibreAcces_SavoirFaire_2.txt", [header, *(r for r in rows if "CAPA16" not in r)])
    summary = import_file(engine, shorter)
    assert counts(summary) == {"skills": (0, 0, 1)}
    assert count(engine, practitioner_skills, practitioner_skills.c.source == "activity") == 2  # untouched
    assert count(engine, practitioner_skills, practitioner_skills.c.source == "diploma") == 4


def test_mailboxes_from_the_mssante_extraction(url: str, tmp_path: Path) -> None:
    scenario_mailboxes(url, tmp_path)


def test_bad_mailbox_lines_are_rejected_with_their_number(engine: sa.Engine, tmp_path: Path) -> None:
    header, *rows = lines_of(MSSANTE)
    first = rows[0]
    lines = [
        header,
        set_field(header, first, "Type de BAL", "XYZ"),
        set_field(header, first, "Adresse BAL", "not-an-address"),
        set_field(header, set_field(header, first, "Identifiant PP", ""), "Identification nationale PP", ""),
        first,
        first.replace("|True|", "|Peut-être|"),
        *rows[1:],
    ]
    summary = import_file(engine, write_lines(tmp_path / "Extraction_bad.txt", lines))
    assert [(i.line, i.message) for i in summary.errors] == [
        (2, "unknown Type de BAL 'XYZ' (expected PER, ORG, APP or CAB)"),
        (3, "invalid mailbox address 'not-an-address'"),
        (4, "PER mailbox elodie.dupre@ch-exemple.mssante.fr without Identification nationale PP"),
        (6, "mailbox elodie.dupre@ch-exemple.mssante.fr already listed on line 5"),
    ]
    assert [(i.line, i.message) for i in summary.warning_samples] == [
        (6, "Dématérialisation 'Peut-être' is neither True nor False (left empty)")]
    assert counts(summary) == {"mailboxes": (8, 0, 0)}


def test_progress_reports_phases_and_bytes(engine: sa.Engine) -> None:
    seen: list[ImportProgress] = []
    import_file(engine, ACTIVITY_52, progress=seen.append)
    assert [p.phase for p in seen] == ["indexing", "planning", "applying", "done"]
    assert seen[-1].bytes_done == seen[-1].bytes_total == ACTIVITY_52.stat().st_size
    assert seen[0].bytes_done == ACTIVITY_52.stat().st_size and seen[0].lines == 6
    assert seen[-1].fraction == 1.0


def test_the_applied_hook_runs_inside_the_import_transaction(engine: sa.Engine) -> None:
    seen: list[int] = []

    def hook(conn: sa.Connection, summary: ImportSummary) -> None:
        seen.append(conn.execute(sa.select(sa.func.count()).select_from(practitioners)).scalar_one())
        assert summary.import_id is not None

    import_file(engine, ACTIVITY_52, on_applied=hook)
    assert seen == [5]
    with engine.connect() as conn:
        row = conn.execute(sa.select(directory_imports)).one()
    assert (row.kind, row.file_name, row.lines, row.added, row.warnings) == (
        "PS_LibreAcces_Personne_activite", ACTIVITY_52.name, 6, 18, 1)
    assert row.finished_at is not None


def test_files_are_applied_practitioners_first(tmp_path: Path) -> None:
    broken = write_lines(tmp_path / "broken.txt", ["a|b|"])
    ordered = import_order([MSSANTE, DIPLOMAS, broken, SAVOIR_FAIRE, ACTIVITY_52])
    assert [p for p, _ in ordered] == [broken, ACTIVITY_52, SAVOIR_FAIRE, DIPLOMAS, MSSANTE]
    assert isinstance(ordered[0][1], DirectoryImportError)


# -- the store: immutable address and type, hosted mailboxes, certificates --

def test_mailbox_address_type_and_holder_cannot_change(engine: sa.Engine) -> None:
    store = DirectoryStore(engine)
    person = store.add_principal(PrincipalKind.PERSON, DUPRE, "Élodie Dupré")
    other = store.add_principal(PrincipalKind.PERSON, LEFEVRE, "Jean-Marie Lefèvre")
    box = store.add_mailbox("Elodie@Caducee.Test", MailboxType.PER, person, service="Urgences")
    assert box.address == "elodie@caducee.test" and box.source is MailboxSource.LOCAL and box.hosted
    for change in ({"mailbox_type": MailboxType.ORG}, {"address": "x@caducee.test"}, {"owner_id": other.id}):
        with pytest.raises(ImmutableMailboxField, match="cannot change after creation"):
            store.update_mailbox(box.address, **change)
    with pytest.raises(ValueError, match="unknown mailbox field"):
        store.update_mailbox(box.address, colour="blue")
    updated = store.update_mailbox(box.address, service="Cardiologie", liste_rouge=True, dematerialisation=True)
    assert (updated.address, updated.mailbox_type, updated.owner_id) == (box.address, MailboxType.PER, person.id)
    assert (updated.service, updated.liste_rouge, updated.dematerialisation) == ("Cardiologie", True, True)
    with pytest.raises(ValueError, match="another type or owner"):
        store.add_mailbox(box.address, MailboxType.ORG, person)
    assert store.add_mailbox(box.address, MailboxType.PER, person).id == box.id
    with pytest.raises(LookupError):
        store.update_mailbox("nobody@caducee.test", service="x")


def _certificate(common_name: str, not_after: dt.datetime) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(0x1A2B3C).not_valid_before(not_after - dt.timedelta(days=365)).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))
    from cryptography.hazmat.primitives.serialization import Encoding
    return cert.public_bytes(Encoding.DER)


def test_certificates_of_a_principal(engine: sa.Engine) -> None:
    store = DirectoryStore(engine)
    person = store.add_principal(PrincipalKind.PERSON, DUPRE, "Élodie Dupré")
    org = store.add_principal(PrincipalKind.ORGANISATION, HOSPITAL, "CH Exemple")
    box = store.add_mailbox("elodie@caducee.test", MailboxType.PER, person)
    future = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=30)
    der = _certificate("ÉLODIE DUPRÉ", future)
    cert = store.add_certificate(person, der, CertificateUsage.SIGN, box)
    assert (cert.usage, cert.status, cert.serial, cert.mailbox_id) == (
        CertificateUsage.SIGN, CertificateStatus.VALID, "1A2B3C", box.id)
    assert cert.subject_dn == "CN=ÉLODIE DUPRÉ" and cert.issuer_dn == cert.subject_dn
    assert cert.not_after == future and cert.der == der
    assert store.add_certificate(person, der, CertificateUsage.SIGN).id == cert.id  # idempotent
    assert store.certificate_by_fingerprint(cert.fingerprint.upper()) == cert
    with pytest.raises(ValueError, match="belongs to a organisation"):
        store.add_certificate(person, _certificate("x", future), CertificateUsage.ORG)
    with pytest.raises(ValueError, match="is not one of"):
        store.add_certificate(org, _certificate("lis", future), CertificateUsage.ORG, box)
    expired = store.add_certificate(person, _certificate("old", future - dt.timedelta(days=60)), CertificateUsage.AUTH)
    assert expired.status is CertificateStatus.EXPIRED
    assert [c.id for c in store.certificates_of(person.id)] == [cert.id, expired.id]
    assert store.certificates_of(person.id, CertificateUsage.AUTH, valid_only=True) == []
    assert store.set_certificate_status(cert.fingerprint, CertificateStatus.REVOKED)
    assert store.certificates_of(person.id, valid_only=True) == []
    assert not store.set_certificate_status("0" * 64, CertificateStatus.REVOKED)
