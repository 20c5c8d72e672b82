"""Directory search: accent- and case-insensitive prefixes, filters, liste rouge never published."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from directory.identifiers import PrincipalKind
from directory.importers import import_file
from directory.model import MailboxType, SkillKind
from directory.search import SearchError, SearchQuery, build_query, search, to_jsonable
from directory.store import DirectoryStore
from mailserver.db import make_engine
from tests.directory.test_importers import (
    ACTIVITY_52,
    DALMEIDA,
    DIPLOMAS,
    DUPRE,
    HOSPITAL,
    LEFEVRE,
    LOCAL_DOMAIN,
    MSSANTE,
    OZTURK,
    PRACTICE,
    SAVOIR_FAIRE,
    engine_for,
)

EHPAD = "1259999977"
PHARMACY = "399977788800021"
ARNAUD = "0759912345"


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with every sample imported (once for the module; tests work on copies)."""
    path = tmp_path_factory.mktemp("search") / "directory.db"
    engine = engine_for(f"sqlite:///{path}")
    for sample in (ACTIVITY_52, SAVOIR_FAIRE, DIPLOMAS, MSSANTE):
        import_file(engine, sample, local_domains={LOCAL_DOMAIN})
    engine.dispose()
    return path


@pytest.fixture
def engine(imported: Path, tmp_path: Path) -> Iterator[sa.Engine]:
    copy = tmp_path / "directory.db"
    shutil.copyfile(imported, copy)
    e = make_engine(f"sqlite:///{copy}")
    yield e
    e.dispose()


def ids(engine: sa.Engine, **criteria: object) -> list[str]:
    return [e.national_id for e in search(engine, SearchQuery(**criteria))]  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["dupre", "DUPRÉ", "Dupré", "dup", "élodie", "ELODIE DU", "dupre elo"])
def test_names_match_by_prefix_whatever_the_accents_and_case(engine: sa.Engine, name: str) -> None:
    assert ids(engine, name=name) == [DUPRE]


def test_punctuation_in_names_is_a_space(engine: sa.Engine) -> None:
    assert ids(engine, name="d'alm") == [DALMEIDA]
    assert ids(engine, name="D ALMEIDA François") == [DALMEIDA]
    assert ids(engine, name="oztu") == [OZTURK]
    assert ids(engine, name="dalm") == []  # a prefix of the words, not a substring


def test_organisations_are_found_by_name_too(engine: sa.Engine) -> None:
    entries = search(engine, SearchQuery(name="centre hosp"))
    assert [e.national_id for e in entries] == [HOSPITAL]
    hospital = entries[0]
    assert hospital.kind is PrincipalKind.ORGANISATION and hospital.practitioner is None
    assert hospital.organisation is not None and hospital.organisation.city == "Pontarlier"
    assert [m.address for m in hospital.mailboxes] == ["lis@ch-exemple.mssante.fr",
                                                       "secretariat.cardio@ch-exemple.mssante.fr"]


def test_holders_known_only_by_their_mailbox_or_created_here_are_found_by_name(engine: sa.Engine) -> None:
    assert ids(engine, name="hors rp") == ["810097890122"]  # PER holder outside the RPPS sample
    assert ids(engine, name="ehpad") == [EHPAD]  # ORG holder outside the activity sample
    local = DirectoryStore(engine).add_principal(PrincipalKind.PERSON, "810001234565", "Camille Martin")
    assert ids(engine, name="camil") == [local.national_id]


def test_city_and_postcode_reach_practitioners_through_their_sites(engine: sa.Engine) -> None:
    assert set(ids(engine, city="l'hay les")) == {DALMEIDA, PHARMACY}
    assert set(ids(engine, city="PONTARLIER")) == {DUPRE, OZTURK, HOSPITAL}
    assert set(ids(engine, city="besancon")) == {DUPRE, PRACTICE}
    assert set(ids(engine, postcode="253")) == {DUPRE, OZTURK, HOSPITAL}
    assert set(ids(engine, postcode="25")) == {DUPRE, OZTURK, HOSPITAL, PRACTICE}
    assert ids(engine, postcode="gl") == ["399951528300016", LEFEVRE]  # LABORATOIRE… before LEFÈVRE


def test_profession_and_specialty_by_code_or_label(engine: sa.Engine) -> None:
    assert ids(engine, profession="10") == [DUPRE, LEFEVRE]
    assert ids(engine, profession="médecin") == [DUPRE, LEFEVRE]
    assert ids(engine, profession="ortho") == [ARNAUD]
    assert ids(engine, specialty="sm53") == [DUPRE]
    assert ids(engine, specialty="Spécialiste en méd") == [DUPRE]
    assert ids(engine, specialty="capacité de médecine d'urg") == [DUPRE]  # from PS_LibreAcces_SavoirFaire
    assert ids(engine, specialty="AE10") == [LEFEVRE]  # an exercise authorisation
    assert ids(engine, specialty="soins pall") == [OZTURK]


def test_identifiers_and_mailboxes(engine: sa.Engine) -> None:
    assert ids(engine, rpps="10091234566") == [DUPRE]
    assert ids(engine, national_id=HOSPITAL) == [HOSPITAL]
    assert ids(engine, mailbox="Elodie.Dupre@Medecin.mssante.fr") == [DUPRE]
    assert ids(engine, mailbox_type=MailboxType.ORG) == [HOSPITAL, EHPAD]
    assert ids(engine, mailbox_type=MailboxType.APP) == [HOSPITAL]
    assert ids(engine, mailbox_type=MailboxType.CAB) == [DUPRE]
    per = ids(engine, mailbox_type=MailboxType.PER)
    assert per == [ARNAUD, DUPRE, "810097890122"]  # by name: ARNAUD, DUPRÉ, then the principal without RPPS data


def test_criteria_combine(engine: sa.Engine) -> None:
    assert ids(engine, name="dupre", city="pontarlier") == [DUPRE]
    assert ids(engine, name="dupre", city="paris") == []
    assert ids(engine, profession="10", postcode="25", mailbox_type=MailboxType.CAB) == [DUPRE]
    assert ids(engine, city="pontarlier", profession="60") == [OZTURK]


def test_an_entry_carries_sites_skills_and_published_mailboxes(engine: sa.Engine) -> None:
    (entry,) = search(engine, SearchQuery(rpps="10091234566"))
    assert entry.practitioner is not None and entry.practitioner.profession_label == "Médecin"
    assert {(s.kind, s.code) for s in entry.skills} == {
        (SkillKind.SAVOIR_FAIRE, "SM53"), (SkillKind.SAVOIR_FAIRE, "CAPA16"), (SkillKind.DIPLOMA, "DE09")}
    assert len(entry.skills) == 3  # SM53 comes from two files, listed once
    cities = sorted((s.activity.mode_label, s.organisation.city if s.organisation else None) for s in entry.sites)
    assert cities == [("Libéral", "Besançon"), ("Salarié", "Pontarlier")]
    assert [m.address for m in entry.mailboxes] == [
        "cabinet.dupre@medecin.mssante.fr", "elodie.dupre@ch-exemple.mssante.fr", "elodie.dupre@medecin.mssante.fr"]
    document = json.loads(json.dumps(to_jsonable(entry), ensure_ascii=False))
    assert document["kind"] == "person" and document["national_id"] == DUPRE
    assert document["practitioner"]["last_name"] == "DUPRÉ"
    assert document["mailboxes"][0] == {
        "address": "cabinet.dupre@medecin.mssante.fr", "mailbox_type": "CAB", "description": None,
        "liste_rouge": False, "preference": 0, "service": None, "responsible": None,
        "structure_id": PRACTICE, "dematerialisation": None, "source": "national", "hosted": False}
    assert "principal_id" not in document and "id" not in document["sites"][0]["activity"]


def test_liste_rouge_and_inactive_mailboxes_are_never_published(engine: sa.Engine) -> None:
    store = DirectoryStore(engine)
    store.update_mailbox("cabinet.dupre@medecin.mssante.fr", liste_rouge=True)
    store.update_mailbox("elodie.dupre@medecin.mssante.fr", active=False)
    (entry,) = search(engine, SearchQuery(rpps="10091234566"))
    assert [m.address for m in entry.mailboxes] == ["elodie.dupre@ch-exemple.mssante.fr"]
    assert ids(engine, mailbox="cabinet.dupre@medecin.mssante.fr") == []
    assert ids(engine, mailbox="elodie.dupre@medecin.mssante.fr") == []
    assert ids(engine, mailbox_type=MailboxType.CAB) == []
    assert ids(engine, name="dupre") == [DUPRE]  # the practitioner stays public (RPPS open data)


def test_limit_and_order(engine: sa.Engine) -> None:
    assert ids(engine, mailbox_type=MailboxType.PER, limit=2) == [ARNAUD, DUPRE]
    assert ids(engine, mailbox_type=MailboxType.PER, limit=1) == [ARNAUD]


@pytest.mark.parametrize(("query", "message"), [
    (SearchQuery(), "at least one criterion"),
    (SearchQuery(name="'-'"), "no letter or digit"),
    (SearchQuery(name="dupre", limit=0), "between 1 and 1000"),
    (SearchQuery(city="…"), "no letter or digit"),
])
def test_unsearchable_criteria_are_refused(engine: sa.Engine, query: SearchQuery, message: str) -> None:
    with pytest.raises(SearchError, match=message):
        search(engine, query)


def test_values_are_bound_never_formatted(engine: sa.Engine) -> None:
    statement = build_query(SearchQuery(name="dupré", mailbox="x' OR '1'='1", national_id="1; DROP TABLE principals"))
    sql = str(statement.compile(dialect=engine.dialect))
    assert "dupre" not in sql and "DROP" not in sql and "OR '1'" not in sql
    assert ids(engine, mailbox="x' OR '1'='1") == []
    assert ids(engine, national_id="1; DROP TABLE principals") == []
    assert ids(engine, name="dupre") == [DUPRE]


@pytest.mark.parametrize(("query", "index"), [
    (SearchQuery(name="dup"), "ix_practitioners_name_norm"),
    (SearchQuery(name="dup"), "ix_practitioners_given_name_norm"),
    (SearchQuery(name="dup"), "ix_organisations_name_norm"),
    (SearchQuery(name="dup"), "ix_principals_name_norm"),
    (SearchQuery(city="pont"), "ix_organisations_city_norm"),
    (SearchQuery(postcode="25"), "ix_organisations_postcode"),
    (SearchQuery(specialty="sm53"), "ix_practitioner_skills_code"),
    (SearchQuery(specialty="sm53"), "ix_practitioner_skills_label_norm"),
    (SearchQuery(profession="medecin"), "ix_practitioners_profession_norm"),
    (SearchQuery(mailbox_type=MailboxType.ORG), "ix_mailboxes_mailbox_type"),
])
def test_prefix_searches_use_the_indexes(engine: sa.Engine, query: SearchQuery, index: str) -> None:
    statement = build_query(query).compile(dialect=engine.dialect, compile_kwargs={})
    with engine.connect() as conn:
        plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(statement),
                                    tuple(statement.params[k] for k in statement.positiontup or ())).all()
    assert any(index in row[-1] for row in plan), plan
