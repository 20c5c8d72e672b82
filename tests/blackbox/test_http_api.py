"""The admin HTTPS API of `caducee serve` driven with the real curl: directory search as JSON and FHIR,
client certificates (none, revoked, another CA's), bad parameters, methods, TLS versions, the request log."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from mailserver.testing import ServerProcess, wait_for

SEARCH = "/api/v1/directory/search"
# curl: --write-out after the body, on its own line
STATUS_MARK = "\n--http-status:"


def curl(server: ServerProcess, path: str, ident: dict[str, Any] | None = None, *args: str,
         cert: tuple[str, str] | None = None) -> tuple[int, Any, subprocess.CompletedProcess[str]]:
    """GET https://localhost:<admin>/path with curl; returns (HTTP status, parsed JSON body, the run)."""
    cmd = ["curl", "--silent", "--show-error", "--cacert", server.ca_bundle, "--write-out",
           STATUS_MARK + "%{http_code}", *args]
    if ident is not None:
        cmd += ["--cert", ident["cert"], "--key", ident["key"]]
    if cert is not None:
        cmd += ["--cert", cert[0], "--key", cert[1]]
    cmd.append(f"https://localhost:{server.port('admin')}{path}")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    body, _, status = run.stdout.rpartition(STATUS_MARK)
    return int(status or 0), (json.loads(body) if body.lstrip().startswith("{") else None), run


def national_ids(body: dict[str, Any]) -> list[str]:
    return [r["national_id"] for r in body["results"]]


def test_health_needs_no_certificate(server: ServerProcess) -> None:
    status, body, _ = curl(server, "/api/v1/health")
    assert (status, body) == (200, {"status": "ok"})


def test_search_by_name_ignores_case_and_accents(server: ServerProcess) -> None:
    camille, sophie = server.identity("PER", 0), server.identity("PER", 2)
    for name in ("MARTIN", "martin", "Camille", "camille%20mart"):
        status, body, _ = curl(server, f"{SEARCH}?name={name}", sophie)
        assert status == 200 and national_ids(body) == [camille["national_id"]], name
    [result] = body["results"]
    assert result["display_name"] == "Camille Martin"
    assert [m["address"] for m in result["mailboxes"]] == [camille["address"]]
    assert result["practitioner"]["profession_label"] == "Médecin"
    # "spécialiste" written without its accent, "MÉDECIN" with one and in capitals
    for query in ("specialty=specialiste", "profession=M%C3%89DECIN", "specialty=SM53&city=paris"):
        status, body, _ = curl(server, f"{SEARCH}?{query}", sophie)
        assert status == 200 and national_ids(body) == [camille["national_id"]], query


def test_search_by_rpps_and_by_organisation(server: ServerProcess) -> None:
    camille, lab = server.identity("PER", 0), server.identity("ORG", 0)
    status, body, _ = curl(server, f"{SEARCH}?rpps={camille['national_id'][1:]}", lab)
    assert status == 200 and national_ids(body) == [camille["national_id"]] and body["count"] == 1
    status, body, _ = curl(server, f"{SEARCH}?postcode=75013&mailbox_type=APP", camille)
    assert national_ids(body) == [lab["national_id"]]


def test_fhir_practitioner_bundle_carries_the_mailbox(server: ServerProcess) -> None:
    camille = server.identity("PER", 0)
    status, bundle, run = curl(server, "/fhir/Practitioner?family=MARTIN", camille, "--include")
    assert status == 200
    assert "content-type: application/fhir+json" in run.stdout.lower()
    bundle = json.loads(run.stdout.rpartition(STATUS_MARK)[0].split("\n\n", 1)[1])  # text mode: \r\n → \n
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset" and bundle["total"] == 1
    [entry] = bundle["entry"]
    assert entry["search"]["mode"] == "match"
    assert entry["fullUrl"].endswith(f"/fhir/Practitioner/{camille['national_id']}")
    resource = entry["resource"]
    assert {"system": "https://rpps.esante.gouv.fr", "value": camille["national_id"][1:]} == {
        k: v for k, v in resource["identifier"][1].items() if k in ("system", "value")}
    [telecom] = resource["telecom"]
    assert (telecom["system"], telecom["value"]) == ("email", camille["address"])
    meta = next(e for e in telecom["extension"] if e["url"].endswith("/as-ext-mailbox-mss-metadata"))
    assert meta["extension"][0]["valueCodeableConcept"]["coding"][0] == {
        "system": "https://mos.esante.gouv.fr/NOS/TRE_R257-TypeBAL/FHIR/TRE-R257-TypeBAL", "code": "PER"}
    status, read, _ = curl(server, f"/fhir/Practitioner/{camille['national_id']}", camille)
    assert status == 200 and read == resource
    status, outcome, _ = curl(server, "/fhir/Practitioner/810000000000", camille)
    assert status == 404 and outcome["resourceType"] == "OperationOutcome"


def test_without_a_client_certificate_the_search_is_refused(server: ServerProcess) -> None:
    status, body, run = curl(server, f"{SEARCH}?name=martin")
    assert status == 401 and body["error"] == "unauthorized" and "Traceback" not in run.stdout
    status, body, _ = curl(server, "/fhir/Practitioner?name=martin")
    assert status == 401 and body["resourceType"] == "OperationOutcome"


def test_revoked_and_foreign_certificates_are_refused(server: ServerProcess, tmp_path: Path) -> None:
    from crypto.pki import CertUsage, DevPKI

    louis = server.identity("PER", 1)
    pki = DevPKI.create_or_load(server.state / "pki")
    issued = pki.issue_person(louis["national_id"], "Louis", "Bernard", louis["address"], CertUsage.AUTH,
                              tmp_path, "to-revoke", None)
    cert = (str(issued.cert_path), str(issued.key_path))
    assert curl(server, f"{SEARCH}?name=martin", cert=cert)[0] == 200
    server.caducee("pki", "revoke", str(issued.cert_path))
    status, body, _ = curl(server, f"{SEARCH}?name=martin", cert=cert)
    assert status == 401 and body == {"error": "unauthorized",
                                      "message": "a valid, unrevoked client certificate is required"}
    foreign = DevPKI.create_or_load(tmp_path / "foreign").issue_person(
        louis["national_id"], "Louis", "Bernard", louis["address"], CertUsage.AUTH, tmp_path, "alien", None)
    assert curl(server, f"{SEARCH}?name=martin", cert=(str(foreign.cert_path), str(foreign.key_path)))[0] == 401
    assert any("status=401" in line and "reason=certificate_revoked" in line for line in server.log)


def test_bad_parameters_are_400_json(server: ServerProcess) -> None:
    camille = server.identity("PER", 0)
    status, body, _ = curl(server, f"{SEARCH}?nom=martin", camille)
    assert status == 400 and body["error"] == "bad_request" and "name" in body["known_parameters"]
    status, body, _ = curl(server, f"{SEARCH}?name=martin&limit=100000", camille)
    assert status == 400 and "limit" in body["message"]
    status, body, _ = curl(server, "/fhir/Practitioner?birthdate=1970", camille)
    assert status == 400 and body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "not-supported"


def test_only_get_and_tls_1_2_or_later(server: ServerProcess) -> None:
    camille = server.identity("PER", 0)
    status, _body, run = curl(server, SEARCH, camille, "--request", "POST", "--include")
    assert status == 405 and "\nallow: get\n" in run.stdout.lower()
    old = subprocess.run(["curl", "--silent", "--cacert", server.ca_bundle, "--tlsv1.1", "--tls-max", "1.1",
                          f"https://localhost:{server.port('admin')}/api/v1/health"], capture_output=True,
                         timeout=30, check=False)
    assert old.returncode == 35  # CURLE_SSL_CONNECT_ERROR: the handshake is refused


def test_one_log_line_per_request_without_the_query(server: ServerProcess) -> None:
    camille = server.identity("PER", 0)
    assert curl(server, f"{SEARCH}?name=zzlogcheck", camille)[0] == 200
    line = wait_for(lambda: next((entry for entry in reversed(server.log)
                                  if "event=http_request" in entry and f"principal={camille['national_id']}" in entry
                                  and "status=200" in entry and SEARCH in entry), None))
    assert f"method=GET path={SEARCH} status=200" in line
    assert not any("zzlogcheck" in entry for entry in server.log)
