"""FHIR R4 mapping of the directory (directory.fhir): identifiers, MSSanté telecom as the ANS example writes
it, where each mailbox goes, liste rouge never published, searchset bundles and the search behind them."""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from directory import fhir
from directory.identifiers import PrincipalKind
from directory.importers import import_file
from directory.model import (
    Activity,
    Mailbox,
    MailboxType,
    Organisation,
    Practitioner,
    Skill,
    SkillKind,
)
from directory.search import DirectoryEntry, SearchError, SearchQuery, Site, search
from directory.store import DirectoryStore
from mailserver.db import make_engine
from tests.directory.test_importers import (
    ACTIVITY_52,
    ARNAUD,
    DIPLOMAS,
    DUPRE,
    HOSPITAL,
    LOCAL_DOMAIN,
    MSSANTE,
    OZTURK,
    PRACTICE,
    SAVOIR_FAIRE,
    engine_for,
)

ANS_EXAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "mssante"
HOSPITAL_PER = "elodie.dupre@ch-exemple.mssante.fr"
PERSONAL_PER = "elodie.dupre@medecin.mssante.fr"
CABINET = "cabinet.dupre@medecin.mssante.fr"


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fhir") / "directory.db"
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


def entry(engine: sa.Engine, national_id: str) -> DirectoryEntry:
    [found] = search(engine, SearchQuery(national_id=national_id))
    return found


def telecoms(resource: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The MSSanté mailboxes of a resource (e-mail telecoms typed MSSANTE), by address."""
    return {t["value"]: t for t in resource.get("telecom", [])
            if t["system"] == "email" and any(e["url"] == fhir.EMAIL_TYPE_EXTENSION for e in t.get("extension", []))}


def metadata(telecom: dict[str, Any]) -> dict[str, Any]:
    [ext] = [e for e in telecom["extension"] if e["url"] == fhir.MAILBOX_METADATA_EXTENSION]
    return {e["url"]: e for e in ext["extension"]}


def ans_example_practitioner() -> dict[str, str]:
    """The assignments of the first Practitioner instance of the ANS example (FSH), path → value."""
    text = (ANS_EXAMPLES / "ansforge_AsExamplePractitionerBalMssPer.fsh").read_text(encoding="utf-8")
    block = text.split("Instance:")[1]
    rules: dict[str, str] = {}
    for line in block.splitlines():
        m = re.match(r"\* (\S+) = (.+)$", line.strip())
        if m:
            rules[m.group(1)] = m.group(2).strip().strip('"')
    return rules


# -- mapping -------------------------------------------------------------------------------------------------

def test_practitioner_identifiers_use_the_ans_systems(engine: sa.Engine) -> None:
    resource = fhir.practitioner_resource(entry(engine, DUPRE))
    assert resource["resourceType"] == "Practitioner" and resource["id"] == DUPRE
    ids = {(i["system"], i["value"], i["type"]["coding"][0]["code"]) for i in resource["identifier"]}
    assert ids == {("urn:oid:1.2.250.1.71.4.2.1", DUPRE, "IDNPS"),
                   ("https://rpps.esante.gouv.fr", DUPRE[1:], "RPPS")}
    assert resource["name"] == [{"use": "official", "family": "DUPRÉ", "given": ["ÉLODIE"], "prefix": ["MME"],
                                 "suffix": ["DR"]}]


def test_adeli_practitioner_has_no_rpps_identifier(engine: sa.Engine) -> None:
    resource = fhir.practitioner_resource(entry(engine, ARNAUD))
    assert [(i["system"], i["value"]) for i in resource["identifier"]] == [("urn:oid:1.2.250.1.71.4.2.1", ARNAUD)]


def test_mailbox_telecom_is_written_as_in_the_ans_example(engine: sa.Engine) -> None:
    example = ans_example_practitioner()
    telecom = telecoms(fhir.practitioner_resource(entry(engine, DUPRE)))[PERSONAL_PER]
    assert telecom["system"] == example["telecom[0].system"].lstrip("#") == "email"
    meta_ext = next(e for e in telecom["extension"] if e["url"] == example["telecom[=].extension[0].url"])
    sub = {e["url"]: e for e in meta_ext["extension"]}
    system, code = example["telecom[=].extension[=].extension[=].valueCodeableConcept"].split("#")
    assert sub["type"]["valueCodeableConcept"]["coding"] == [{"system": system, "code": code}]
    assert (system, code) == (fhir.TYPE_BAL, "PER")
    assert sub["listeRouge"] == {"url": "listeRouge", "valueBoolean": False}
    assert example["identifier[0].system"] == fhir.PERSON_ID_SYSTEM
    # and the FR Core e-mail type extension that makes it an MSSanté address
    email_type = next(e for e in telecom["extension"] if e["url"] == fhir.EMAIL_TYPE_EXTENSION)
    assert email_type["valueCoding"]["code"] == "MSSANTE"
    assert email_type["valueCoding"]["system"].endswith("TRE_R256-TypeMessagerie/FHIR/TRE-R256-TypeMessagerie")


def test_per_at_a_site_goes_on_the_role_cab_and_personal_per_on_the_practitioner(engine: sa.Engine) -> None:
    dupre = entry(engine, DUPRE)
    practitioner = telecoms(fhir.practitioner_resource(dupre))
    assert set(practitioner) == {PERSONAL_PER, CABINET}
    assert metadata(practitioner[CABINET])["type"]["valueCodeableConcept"]["coding"][0]["code"] == "CAB"
    assert sorted(t["rank"] for t in practitioner.values()) == [1, 2]
    roles = {r.id: r for r in fhir.roles_of(dupre)}
    assert set(roles) == {f"{DUPRE}-{HOSPITAL}", f"{DUPRE}-{PRACTICE}"}
    hospital = fhir.practitioner_role_resource(roles[f"{DUPRE}-{HOSPITAL}"])
    assert set(telecoms(hospital)) == {HOSPITAL_PER}
    assert {"system": "email", "value": "contact@ch-exemple.fr", "use": "work"} in hospital["telecom"]  # site's
    assert hospital["practitioner"]["reference"] == f"Practitioner/{DUPRE}"
    assert hospital["organization"]["reference"] == f"Organization/{HOSPITAL}"
    assert telecoms(fhir.practitioner_role_resource(roles[f"{DUPRE}-{PRACTICE}"])) == {}


def test_profession_and_savoir_faire_are_coded_with_the_nos_tables(engine: sa.Engine) -> None:
    resource = fhir.practitioner_resource(entry(engine, DUPRE))
    codings = [(c.get("system"), c["code"]) for q in resource["qualification"] for c in q["code"]["coding"]]
    nos = "https://mos.esante.gouv.fr/NOS/"
    assert (nos + "TRE_G15-ProfessionSante/FHIR/TRE-G15-ProfessionSante", "10") in codings
    assert (nos + "TRE_R04-TypeSavoirFaire/FHIR/TRE-R04-TypeSavoirFaire", "S") in codings
    assert (nos + "TRE_R38-SpecialiteOrdinale/FHIR/TRE-R38-SpecialiteOrdinale", "SM53") in codings
    assert (nos + "TRE_R43-CapaciteSavoirFaire/FHIR/TRE-R43-CapaciteSavoirFaire", "CAPA16") in codings
    assert (nos + "TRE_R48-DiplomeEtatFrancais/FHIR/TRE-R48-DiplomeEtatFrancais", "DE09") in codings
    role = fhir.practitioner_role_resource(fhir.roles_of(entry(engine, DUPRE))[0])
    specialties = {c["code"] for s in role["specialty"] for c in s["coding"]}
    assert {"SM53", "CAPA16"} <= specialties and "DE09" not in specialties  # diplomas are not specialties
    role_codes = {c["code"] for c in role["code"][0]["coding"]}
    assert {"10", "S"} <= role_codes  # profession, mode d'exercice salarié


def test_organization_identifiers_address_and_mailboxes(engine: sa.Engine) -> None:
    resource = fhir.organization_resource(entry(engine, HOSPITAL))
    assert resource["id"] == HOSPITAL and resource["name"] == "CENTRE HOSPITALIER EXEMPLE DU HAUT-DOUBS"
    ids = {(i["system"], i["value"], i["type"]["coding"][0]["code"]) for i in resource["identifier"]}
    assert ("urn:oid:1.2.250.1.71.4.2.2", HOSPITAL, "IDNST") in ids
    assert ("http://finess.sante.gouv.fr", HOSPITAL[1:], "FINEG") in ids
    assert ("http://finess.sante.gouv.fr", "259999985", "FINEJ") in ids
    mss = telecoms(resource)
    assert set(mss) == {"secretariat.cardio@ch-exemple.mssante.fr", "lis@ch-exemple.mssante.fr"}
    org = metadata(mss["secretariat.cardio@ch-exemple.mssante.fr"])
    assert org["type"]["valueCodeableConcept"]["coding"][0]["code"] == "ORG"
    assert org["service"] == {"url": "service", "valueString": "Cardiologie"}
    assert resource["address"][0]["postalCode"] == "25304" and resource["address"][0]["city"] == "Pontarlier"
    assert {"system": "phone", "value": "0381000000", "use": "work"} in resource["telecom"]


def test_liste_rouge_mailboxes_are_never_published(engine: sa.Engine) -> None:
    DirectoryStore(engine).update_mailbox(PERSONAL_PER, liste_rouge=True)
    resource = fhir.practitioner_resource(entry(engine, DUPRE))
    assert set(telecoms(resource)) == {CABINET}
    assert PERSONAL_PER not in str(resource)
    # the mapping refuses one even when handed one directly
    listed = Mailbox(1, "secret@medecin.mssante.fr", MailboxType.PER, 1, liste_rouge=True)
    shown = Mailbox(2, "shown@medecin.mssante.fr", MailboxType.PER, 1)
    person = DirectoryEntry(PrincipalKind.PERSON, 1, "810001234565", "Camille Martin", mailboxes=(listed, shown))
    assert set(telecoms(fhir.practitioner_resource(person))) == {"shown@medecin.mssante.fr"}
    org = DirectoryEntry(PrincipalKind.ORGANISATION, 2, "1750000127", "Labo", mailboxes=(listed,))
    assert "telecom" not in fhir.organization_resource(org)


def test_ids_are_national_ids_never_database_rows() -> None:
    practitioner = Practitioner(41, "810001234565", "8", "10001234565", "Martin", "Camille")
    org = Organisation(7, 42, "1750000127", name="Labo")
    site = Site(Activity(99, 41, 7, mode_code="S"), org)
    person = DirectoryEntry(PrincipalKind.PERSON, 41, "810001234565", "Camille Martin", practitioner=practitioner,
                            sites=(site, dataclasses.replace(site, activity=Activity(100, 41, 7, mode_code="L"))))
    assert fhir.practitioner_resource(person)["id"] == "810001234565"
    assert [r.id for r in fhir.roles_of(person)] == ["810001234565-1750000127", "810001234565-1750000127-2"]
    assert "41" not in fhir.practitioner_resource(person)["id"]
    assert fhir.fhir_id("0A/B c") == "0A.B.c"


def test_unknown_savoir_faire_type_keeps_the_code_without_inventing_a_system() -> None:
    concept = fhir.skill_concept(Skill(SkillKind.SAVOIR_FAIRE, "XYZ1", "Quelque chose", "ZZ", "Autre"))
    assert concept is not None
    assert concept["coding"][1] == {"code": "XYZ1", "display": "Quelque chose"}
    assert fhir.skill_concept(Skill(SkillKind.AUTHORISATION, "AE10")) is None


def test_bundle_is_a_searchset_like_the_ans_example() -> None:
    text = (ANS_EXAMPLES / "ansforge_AsExampleBundleBalMssPer.fsh").read_text(encoding="utf-8")
    assert "* type = #searchset" in text and "search.mode = #match" in text
    resource = {"resourceType": "Practitioner", "id": "810001234565"}
    included = {"resourceType": "PractitionerRole", "id": "810001234565-1750000127"}
    b = fhir.bundle("https://h:8025/fhir", [resource], total=7, self_url="https://h:8025/fhir/Practitioner?x=y",
                    includes=[included], outcome=fhir.operation_outcome("too-costly", "more", severity="warning"))
    assert b["resourceType"] == "Bundle" and b["type"] == "searchset" and b["total"] == 7
    assert b["link"] == [{"relation": "self", "url": "https://h:8025/fhir/Practitioner?x=y"}]
    assert [(e.get("fullUrl"), e["search"]["mode"]) for e in b["entry"]] == [
        ("https://h:8025/fhir/Practitioner/810001234565", "match"),
        ("https://h:8025/fhir/PractitionerRole/810001234565-1750000127", "include"),
        (None, "outcome")]
    assert "total" not in fhir.bundle("b", [], total=None, self_url="b")


def test_subset_keeps_the_named_elements_and_tags_subsetted() -> None:
    resource = {"resourceType": "Practitioner", "id": "1", "identifier": [1], "telecom": [2], "name": [3]}
    assert fhir.subset(resource, ["identifier", "telecom"]) == {
        "resourceType": "Practitioner", "id": "1", "identifier": [1], "telecom": [2],
        "meta": {"tag": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                          "code": "SUBSETTED"}]}}


# -- search and read -------------------------------------------------------------------------------------------

def run(engine: sa.Engine, resource: str, cap: int = 50, **spec: Any) -> fhir.SearchResult:
    return fhir.run_search(engine, fhir.FhirSearch(resource, **spec), cap)


def test_practitioner_search_by_family_and_given_ignores_accents_and_case(engine: sa.Engine) -> None:
    result = run(engine, "Practitioner", query=SearchQuery(name="dupre"), family="dupre", given="elodie")
    assert [r["id"] for r in result.matches] == [DUPRE] and result.total == 1 and result.complete
    assert run(engine, "Practitioner", query=SearchQuery(name="dupre"), given="paul").total == 0
    # organisations never come back as Practitioners
    assert run(engine, "Practitioner", query=SearchQuery(name="centre")).total == 0
    assert [r["id"] for r in run(engine, "Organization", query=SearchQuery(name="centre")).matches] == [HOSPITAL]


def test_mailbox_criteria_match_the_resource_that_shows_the_mailbox(engine: sa.Engine) -> None:
    by_hospital_box: dict[str, Any] = {"query": SearchQuery(mailbox=HOSPITAL_PER), "mailbox": HOSPITAL_PER}
    assert run(engine, "Practitioner", **by_hospital_box).total == 0  # it is on the role
    roles = run(engine, "PractitionerRole", **by_hospital_box)
    assert [r["id"] for r in roles.matches] == [f"{DUPRE}-{HOSPITAL}"]
    cab = run(engine, "Practitioner", query=SearchQuery(mailbox_type=MailboxType.CAB), mailbox_type=MailboxType.CAB)
    assert [r["id"] for r in cab.matches] == [DUPRE]


def test_roles_at_an_organisation_with_includes(engine: sa.Engine) -> None:
    result = run(engine, "PractitionerRole", extra=(fhir.working_at([HOSPITAL]),), sites=frozenset({HOSPITAL}),
                 include_practitioner=True, include_organization=True)
    ids = [r["id"] for r in result.matches]
    assert f"{DUPRE}-{HOSPITAL}" in ids and f"{DUPRE}-{PRACTICE}" not in ids
    assert all(r["organization"]["reference"] == f"Organization/{HOSPITAL}" for r in result.matches)
    included = {(r["resourceType"], r["id"]) for r in result.includes}
    assert ("Organization", HOSPITAL) in included and ("Practitioner", DUPRE) in included
    assert ("Practitioner", OZTURK) in included  # the nurse works there too


def test_count_pages_and_cap_makes_the_total_unknown(engine: sa.Engine) -> None:
    everyone = run(engine, "Practitioner", query=SearchQuery(profession="10"))
    assert everyone.total is not None and everyone.total >= 2
    first = run(engine, "Practitioner", query=SearchQuery(profession="10"), count=1)
    assert len(first.matches) == 1 and first.total == everyone.total
    capped = run(engine, "Practitioner", cap=1, query=SearchQuery(profession="10"))
    assert capped.total is None and not capped.complete


def test_revinclude_and_elements(engine: sa.Engine) -> None:
    result = run(engine, "Practitioner", extra=(fhir.with_national_ids([DUPRE]),), revinclude_roles=True,
                 elements=("identifier",))
    assert [r["id"] for r in result.matches] == [DUPRE]
    assert set(result.matches[0]) == {"resourceType", "id", "identifier", "meta"}
    assert {r["id"] for r in result.includes} == {f"{DUPRE}-{HOSPITAL}", f"{DUPRE}-{PRACTICE}"}


def test_a_search_needs_a_criterion(engine: sa.Engine) -> None:
    with pytest.raises(SearchError):
        run(engine, "Organization")


def test_read_by_logical_id(engine: sa.Engine) -> None:
    assert fhir.read(engine, "Practitioner", DUPRE)["id"] == DUPRE  # type: ignore[index]
    assert fhir.read(engine, "Organization", HOSPITAL)["resourceType"] == "Organization"  # type: ignore[index]
    role = fhir.read(engine, "PractitionerRole", f"{DUPRE}-{HOSPITAL}")
    assert role is not None and set(telecoms(role)) == {HOSPITAL_PER}
    assert fhir.read(engine, "Practitioner", HOSPITAL) is None  # an organisation is not a Practitioner
    assert fhir.read(engine, "Organization", DUPRE) is None
    assert fhir.read(engine, "PractitionerRole", f"{DUPRE}-1000000000") is None
    assert fhir.read(engine, "Practitioner", "810000000000") is None
    assert fhir.read(engine, "Patient", DUPRE) is None
    assert fhir.read(engine, "Practitioner", "../etc") is None


def test_capability_statement_lists_the_three_resources() -> None:
    statement = fhir.capability_statement("https://h:8025/fhir")
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert set(resources) == {"Practitioner", "PractitionerRole", "Organization"}
    assert {"name", "family", "given", "identifier", "mailbox-mss"} <= {
        p["name"] for p in resources["Practitioner"]["searchParam"]}
