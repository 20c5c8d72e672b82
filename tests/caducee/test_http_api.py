"""The admin HTTPS API (caducee.http_api) without sockets: a demo node's state folder, its real certificates
and CRLs, requests handed to `DirectoryApi.handle` as the Twisted shell does, and the parameter parsing."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from caducee import config as config_mod
from caducee.http_api import (
    SEARCH_PARAMETERS,
    BadRequest,
    CertificateAuthoriser,
    DirectoryApi,
    Handled,
    Token,
    fhir_search,
    json_search_query,
    log_path,
    person_national_id,
    split_target,
    structure_national_id,
)
from caducee.state import DEMO_ORG_FINESS, DEMO_PERSONS, init_state
from crypto.pki import CertUsage, DevPKI
from crypto.validation import CertificateValidator
from directory import fhir
from directory.model import MailboxType
from directory.store import DirectoryStore
from mailserver.auth import CertificateAuthenticator
from mailserver.db import make_engine

BASE = "https://localhost:8025"
MARTIN = DEMO_PERSONS[0]
LAB = "1" + DEMO_ORG_FINESS


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("http-api") / "state"
    init_state(path, demo=True, say=lambda _text: None)
    return path


@pytest.fixture(scope="module")
def api(state: Path) -> Iterator[DirectoryApi]:
    cfg = config_mod.load(state)
    engine = make_engine(cfg.database_url)
    validator = CertificateValidator.from_files(cfg.path(cfg.tls.trust_anchors), [cfg.path(p) for p in cfg.tls.crls])
    authoriser = CertificateAuthoriser(CertificateAuthenticator(validator, DirectoryStore(engine)))
    yield DirectoryApi(engine, authoriser, max_results=20)
    engine.dispose()


def der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)


@pytest.fixture(scope="module")
def martin(state: Path) -> bytes:
    return der(state / "demo" / f"{MARTIN.local_part}.auth.pem")


def call(api: DirectoryApi, target: str, cert: bytes | None) -> tuple[Handled, Any]:
    handled = api.handle(target.encode("ascii"), cert, BASE)
    return handled, json.loads(handled.response.body)


# -- authentication ---------------------------------------------------------------------------------------------

def test_no_certificate_is_401_without_detail(api: DirectoryApi) -> None:
    handled, body = call(api, "/api/v1/directory/search?name=martin", None)
    assert handled.response.status == 401 and handled.reason == "no_client_certificate"
    assert body == {"error": "unauthorized", "message": "a valid, unrevoked client certificate is required"}
    handled, body = call(api, "/fhir/Practitioner?name=martin", None)
    assert handled.response.status == 401 and body["resourceType"] == "OperationOutcome"
    assert handled.response.content_type.startswith("application/fhir+json")


def test_person_and_organisation_certificates_may_search(api: DirectoryApi, martin: bytes, state: Path) -> None:
    handled, body = call(api, "/api/v1/directory/search?name=MARTIN", martin)
    assert handled.response.status == 200 and handled.principal == MARTIN.national_id
    assert [r["national_id"] for r in body["results"]] == [MARTIN.national_id] and body["count"] == 1
    handled, _ = call(api, "/api/v1/directory/search?name=martin", der(state / "demo" / "laboratoire.pem"))
    assert handled.response.status == 200 and handled.principal == LAB


def test_revoked_unknown_and_wrong_usage_certificates_are_refused(api: DirectoryApi, state: Path,
                                                                   tmp_path: Path) -> None:
    pki = DevPKI.create_or_load(state / "pki")
    sophie = DEMO_PERSONS[2]
    issued = pki.issue_person(sophie.national_id, sophie.given_name, sophie.surname, "s@caducee.localhost",
                              CertUsage.AUTH, tmp_path, "revoked", None)
    cert = der(issued.cert_path)
    assert call(api, "/api/v1/directory/search?name=petit", cert)[0].response.status == 200
    pki.revoke(issued.serial)
    handled, body = call(api, "/api/v1/directory/search?name=petit", cert)
    assert handled.response.status == 401 and handled.reason == "certificate_revoked"
    assert "revoked" not in body["message"].replace("unrevoked", "")  # the reason stays in the log
    stranger = pki.issue_person("8" + "10009999990", "Nobody", "Known", "n@caducee.localhost", CertUsage.AUTH,
                                tmp_path, "stranger", None)
    handled, body = call(api, "/api/v1/directory/search?name=petit", der(stranger.cert_path))
    assert handled.response.status == 403 and handled.reason == "unknown_principal"
    assert body["error"] == "forbidden"
    enc = der(state / "demo" / f"{sophie.local_part}.enc.pem")
    assert call(api, "/api/v1/directory/search?name=petit", enc)[0].reason == "certificate_wrong_usage"


# -- the JSON search ---------------------------------------------------------------------------------------------

def test_json_search_by_name_rpps_specialty_city(api: DirectoryApi, martin: bytes) -> None:
    for query in ("name=martin", "name=CAMILLE", f"rpps={MARTIN.rpps}", f"national_id={MARTIN.national_id}",
                  "specialty=SM53", "specialty=sp%C3%A9cialiste", "profession=m%C3%A9decin", "profession=MEDECIN"):
        _, body = call(api, f"/api/v1/directory/search?{query}", martin)
        assert [r["national_id"] for r in body["results"]] == [MARTIN.national_id], query
    _, body = call(api, "/api/v1/directory/search?city=PARIS&mailbox_type=per", martin)
    assert {r["national_id"] for r in body["results"]} == {p.national_id for p in DEMO_PERSONS}
    _, body = call(api, "/api/v1/directory/search?postcode=75013&mailbox_type=ORG", martin)
    assert [r["national_id"] for r in body["results"]] == [LAB]
    result = body["results"][0]
    assert "id" not in result["organisation"] and "principal_id" not in result  # no database ids
    assert {m["address"] for m in result["mailboxes"]} == {"secretariat@caducee.localhost", "resultats@caducee.localhost"}


def test_json_search_errors_are_400_with_a_clear_message(api: DirectoryApi, martin: bytes) -> None:
    handled, body = call(api, "/api/v1/directory/search?nom=martin", martin)
    assert handled.response.status == 400 and body["known_parameters"] == list(SEARCH_PARAMETERS)
    assert "nom" in body["message"]
    for query, words in (("name=martin&limit=21", "between 1 and 20"), ("name=martin&limit=x", "number"),
                         ("mailbox_type=XXX", "PER, ORG, APP, CAB"), ("", "at least one criterion"),
                         ("name=%2D", "no letter or digit"), ("name=a&name=b", "more than once"),
                         ("name=%FF", "UTF-8")):
        handled, body = call(api, f"/api/v1/directory/search?{query}", martin)
        assert handled.response.status == 400 and words in body["message"], (query, body)
    handled, body = call(api, "/api/v1/nothing", martin)
    assert handled.response.status == 404


def test_limit_within_the_configured_maximum(api: DirectoryApi, martin: bytes) -> None:
    _, body = call(api, "/api/v1/directory/search?city=paris&limit=1", martin)
    assert body["count"] == 1 and body["limit"] == 1
    assert json_search_query([("name", "x")], 20).limit == 20  # default 50 capped by http_max_results


# -- FHIR -------------------------------------------------------------------------------------------------------

def test_fhir_practitioner_bundle_with_the_mailbox(api: DirectoryApi, martin: bytes) -> None:
    handled, bundle = call(api, "/fhir/Practitioner?family=MARTIN&given=camille", martin)
    assert handled.response.status == 200 and handled.response.content_type.startswith("application/fhir+json")
    assert bundle["type"] == "searchset" and bundle["total"] == 1
    [entry] = bundle["entry"]
    assert entry["fullUrl"] == f"{BASE}/fhir/Practitioner/{MARTIN.national_id}" and entry["search"]["mode"] == "match"
    [telecom] = entry["resource"]["telecom"]
    assert telecom["value"] == f"{MARTIN.local_part}@caducee.localhost"
    assert telecom["extension"][1]["extension"][0]["valueCodeableConcept"]["coding"][0]["code"] == "PER"
    handled, bundle = call(api, f"/fhir/Practitioner?identifier=https://rpps.esante.gouv.fr|{MARTIN.rpps}", martin)
    assert [e["resource"]["id"] for e in bundle["entry"]] == [MARTIN.national_id]


def test_fhir_reads_and_not_found(api: DirectoryApi, martin: bytes) -> None:
    handled, resource = call(api, f"/fhir/Practitioner/{MARTIN.national_id}", martin)
    assert handled.response.status == 200 and resource["resourceType"] == "Practitioner"
    handled, resource = call(api, f"/fhir/Organization/{LAB}", martin)
    assert resource["name"] == "Laboratoire Demo"
    handled, resource = call(api, f"/fhir/PractitionerRole/{MARTIN.national_id}-{LAB}", martin)
    assert resource["organization"]["reference"] == f"Organization/{LAB}"
    for target in ("/fhir/Practitioner/810000000000", f"/fhir/Organization/{MARTIN.national_id}", "/fhir/Patient",
                   "/fhir/Practitioner/1/2"):
        handled, outcome = call(api, target, martin)
        assert handled.response.status == 404 and outcome["issue"][0]["code"] == "not-found", target
    handled, statement = call(api, "/fhir/metadata", martin)
    assert statement["resourceType"] == "CapabilityStatement"


def test_fhir_unsupported_parameters_are_400_operation_outcomes(api: DirectoryApi, martin: bytes) -> None:
    for query in ("foo=bar", "name:contains=mar", "name=a,b", "name=a&name=b", "_sort=name", "_format=xml",
                  "identifier=http://example.org|1", "mailbox-mss-type=http://example.org|PER", "_count=x",
                  "_revinclude=Practitioner:organization", ""):
        handled, outcome = call(api, f"/fhir/Practitioner?{query}", martin)
        assert handled.response.status == 400, query
        assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["details"]["text"], query


def test_fhir_roles_organizations_and_count(api: DirectoryApi, martin: bytes) -> None:
    _, bundle = call(api, f"/fhir/PractitionerRole?organization=Organization/{LAB}&_count=2"
                          "&_include=PractitionerRole:organization", martin)
    assert bundle["total"] == 3
    modes = [(e["resource"]["resourceType"], e["search"]["mode"]) for e in bundle["entry"]]
    assert modes == [("PractitionerRole", "match")] * 2 + [("Organization", "include")]
    _, bundle = call(api, f"/fhir/Organization?identifier=http://finess.sante.gouv.fr|{DEMO_ORG_FINESS}", martin)
    assert [e["resource"]["id"] for e in bundle["entry"]] == [LAB]
    _, bundle = call(api, "/fhir/Organization?address-postalcode=75&mailbox-mss-type=APP", martin)
    assert bundle["total"] == 1
    _, bundle = call(api, "/fhir/Organization?name=martin", martin)  # persons are not organizations
    assert bundle["total"] == 0 and bundle["entry"] == []


def test_fhir_too_many_candidates_warns_instead_of_a_total(state: Path, martin: bytes) -> None:
    cfg = config_mod.load(state)
    engine = make_engine(cfg.database_url)
    try:
        api = DirectoryApi(engine, lambda _cert: DirectoryStore(engine).principal_by_national_id(  # type: ignore[arg-type,return-value]
            MARTIN.national_id), max_results=2)
        _, bundle = call(api, "/fhir/Practitioner?address-city=paris", martin)
        assert "total" not in bundle and len([e for e in bundle["entry"] if e["search"]["mode"] == "match"]) == 2
        assert bundle["entry"][-1]["resource"]["issue"][0]["code"] == "too-costly"
    finally:
        engine.dispose()


def test_internal_errors_give_a_reference_not_the_exception(api: DirectoryApi, martin: bytes,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    broken = DirectoryApi(sa.create_engine("sqlite:///file:nowhere?mode=ro&uri=true"), api.authorise)
    with caplog.at_level(logging.ERROR, logger="caducee.http_api"):
        handled, body = call(broken, "/api/v1/directory/search?name=secret-patient-name", martin)
    assert handled.response.status == 500 and body["error"] == "internal_error"
    assert body["message"].startswith("internal error, ref ")
    assert "secret" not in json.dumps(body) and "sqlite" not in json.dumps(body).lower()
    [record] = [r for r in caplog.records if "http_internal_error" in r.getMessage()]
    assert "secret-patient-name" not in record.getMessage() and "exception=OperationalError" in record.getMessage()


# -- parsing ----------------------------------------------------------------------------------------------------

def test_split_target_and_log_path() -> None:
    assert split_target(b"/fhir/Practitioner?name=H%C3%A9l%C3%A8ne&x=") == (
        "/fhir/Practitioner", [("name", "Hélène"), ("x", "")])
    with pytest.raises(BadRequest):
        split_target(b"/a?name=%C3")
    assert log_path(b"/api/v1/directory/search?name=secret") == "/api/v1/directory/search"
    assert log_path(b"/a\x1b[31mb") == "/a?[31mb"


def test_identifier_tokens() -> None:
    assert person_national_id(Token.parse("urn:oid:1.2.250.1.71.4.2.1|810001234565")) == "810001234565"
    assert person_national_id(Token.parse("https://rpps.esante.gouv.fr|10001234565")) == "810001234565"
    assert person_national_id(Token.parse("10001234565")) == "810001234565"
    assert person_national_id(Token.parse("|0759912345")) == "0759912345"
    assert structure_national_id(Token.parse("http://finess.sante.gouv.fr|750000127")) == "1750000127"
    assert structure_national_id(Token.parse("https://finess.esante.gouv.fr|750000127")) == "1750000127"
    assert structure_national_id(Token.parse("http://sirene.fr|99912345600018")) == "399912345600018"
    with pytest.raises(BadRequest, match="SIREN"):
        structure_national_id(Token.parse("http://sirene.fr|999123456"))


def test_fhir_search_parsing() -> None:
    spec = fhir_search("Practitioner", [("family", "Dupré"), ("given", "Élodie"), ("_count", "500"),
                                        ("mailbox-mss:exact", "A@B.fr"), ("mailbox-mss-type", "PER")], 20)
    assert (spec.family, spec.given, spec.count) == ("dupre", "elodie", 20)
    assert spec.query.name == "dupre" and spec.query.mailbox == "a@b.fr" and spec.mailbox == "a@b.fr"
    assert spec.mailbox_type is MailboxType.PER
    role = fhir_search("PractitionerRole", [("organization.identifier", "urn:oid:1.2.250.1.71.4.2.2|1750000127"),
                                            ("role", "10"), ("_include", "PractitionerRole:practitioner"),
                                            ("_include", "PractitionerRole:organization")], 20)
    assert role.sites == frozenset({"1750000127"}) and role.query.profession == "10"
    assert role.include_practitioner and role.include_organization
    assert fhir_search("Practitioner", [("qualification-code", "SM53")], 20).query.specialty == "SM53"
    with pytest.raises(BadRequest):
        fhir_search("PractitionerRole", [("specialty", f"{fhir.PROFESSION}|10")], 20)
