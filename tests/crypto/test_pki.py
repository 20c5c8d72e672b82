"""The development PKI: hierarchy, certificate profiles, files, CRLs and revocation (checked with openssl)."""

from __future__ import annotations

import datetime as dt
import shutil
import stat
import subprocess
import threading
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from crypto.pki import CaRole, CertUsage, DevPKI, IssuedCertificate

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")

NATIONAL_ID = "810001234567"  # "8" + RPPS
EMAIL = "anne.martin@ch-exemple.caducee.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    # Shared by the crypto test modules of the session: create_or_load is idempotent.
    return DevPKI.create_or_load(tmp_path_factory.getbasetemp() / "crypto-dev-pki")


@pytest.fixture(scope="module")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    return DevPKI.create_or_load(tmp_path_factory.getbasetemp() / "crypto-foreign-pki")


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pki-certs")


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run([OPENSSL, *args], capture_output=True, text=True, timeout=30, check=False)


ExtensionT = TypeVar("ExtensionT", bound=x509.ExtensionType)


def ext(cert: x509.Certificate, kind: type[ExtensionT]) -> x509.Extension[ExtensionT]:
    return cert.extensions.get_extension_for_class(kind)


def crl_number(path: Path) -> int:
    crl = x509.load_pem_x509_crl(path.read_bytes())
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def issue_auth(pki: DevPKI, out_dir: Path, basename: str, **kwargs: object) -> IssuedCertificate:
    return pki.issue_person(NATIONAL_ID, "Anne", "Martin", EMAIL, CertUsage.AUTH, out_dir, basename, **kwargs)  # type: ignore[arg-type]


# -------------------- creation


def test_create_or_load_is_idempotent_and_rewrites_nothing(tmp_path: Path) -> None:
    first = DevPKI.create_or_load(tmp_path / "pki")
    files = sorted(p for p in (tmp_path / "pki").rglob("*") if p.is_file() and p.name != ".lock")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    assert len(files) == 11  # registry, bundle, 3 certs, 3 keys, 3 CRLs

    second = DevPKI.create_or_load(tmp_path / "pki")

    assert second.root_cert.fingerprint(hashes.SHA256()) == first.root_cert.fingerprint(hashes.SHA256())
    assert second.persons_ca_cert == first.persons_ca_cert
    assert second.organisations_ca_cert == first.organisations_ca_cert
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before
    # The loaded instance can sign with the stored keys.
    issued = issue_auth(second, tmp_path, "after-load")
    issued.certificate.verify_directly_issued_by(first.persons_ca_cert)


def test_concurrent_creation_yields_one_hierarchy(tmp_path: Path) -> None:
    results: list[DevPKI] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            results.append(DevPKI.create_or_load(tmp_path / "shared"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len({pki.root_cert.fingerprint(hashes.SHA256()) for pki in results}) == 1


def test_interrupted_creation_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "pki" / "ca").mkdir(parents=True)
    (tmp_path / "pki" / "ca" / "root.key").write_bytes(b"precious")
    with pytest.raises(RuntimeError, match="refusing to overwrite"):
        DevPKI.create_or_load(tmp_path / "pki")
    assert (tmp_path / "pki" / "ca" / "root.key").read_bytes() == b"precious"


def test_hierarchy(pki: DevPKI) -> None:
    root, persons, organisations = pki.root_cert, pki.persons_ca_cert, pki.organisations_ca_cert
    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    assert "AC RACINE CADUCEE DEV" in root.subject.rfc4514_string()
    for cert in (root, persons, organisations):
        assert cert.subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)[0].value == "FR"
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Caducée"
        key = cert.public_key()
        assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 3072
        constraints = ext(cert, x509.BasicConstraints)
        assert constraints.critical and constraints.value.ca
        usage = ext(cert, x509.KeyUsage)
        assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
        assert not usage.value.digital_signature
        assert (
            ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier
            == ext(root, x509.SubjectKeyIdentifier).value.digest
        )
    assert ext(root, x509.BasicConstraints).value.path_length == 1
    for intermediate in (persons, organisations):
        intermediate.verify_directly_issued_by(root)
        assert ext(intermediate, x509.BasicConstraints).value.path_length == 0
    assert "PERSONNES" in persons.subject.rfc4514_string()
    assert "ORGANISATIONS" in organisations.subject.rfc4514_string()
    bundle = x509.load_pem_x509_certificates(pki.ca_bundle_path.read_bytes())
    assert bundle == [root, persons, organisations]


def test_ca_keys_are_private(pki: DevPKI) -> None:
    for role in CaRole:
        key_path = pki.ca_cert_path(role).with_suffix(".key")
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert key.public_key().public_numbers() == pki.ca_cert(role).public_key().public_numbers()  # type: ignore[union-attr]


@needs_openssl
def test_initial_crls_verify_with_openssl(tmp_path: Path) -> None:
    pki = DevPKI.create_or_load(tmp_path / "pki", crl_validity=dt.timedelta(days=7))
    assert [p.parent.name for p in pki.crl_paths()] == ["crl"] * 3
    for role, path in zip(CaRole, pki.crl_paths(), strict=True):
        result = openssl("crl", "-in", str(path), "-noout", "-CAfile", str(pki.ca_cert_path(role)))
        assert result.returncode == 0 and "verify OK" in result.stderr, result.stderr
        crl = x509.load_pem_x509_crl(path.read_bytes())
        assert crl.issuer == pki.ca_cert(role).subject
        assert crl.is_signature_valid(pki.ca_cert(role).public_key())  # type: ignore[arg-type]
        assert len(crl) == 0
        assert crl_number(path) == 1
        assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(days=7)  # type: ignore[operator]
        aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
        assert aki == ext(pki.ca_cert(role), x509.SubjectKeyIdentifier).value.digest


# -------------------- persons


def test_person_subject_carries_the_national_id(pki: DevPKI, out_dir: Path) -> None:
    issued = issue_auth(pki, out_dir, "person-subject")
    subject = issued.certificate.subject
    assert subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == NATIONAL_ID
    assert subject.get_attributes_for_oid(NameOID.SURNAME)[0].value == "Martin"
    assert subject.get_attributes_for_oid(NameOID.GIVEN_NAME)[0].value == "Anne"
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Anne Martin"
    assert subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)[0].value == "FR"
    assert subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Caducée"
    assert issued.subject_dn == subject.rfc4514_string()
    assert issued.serial == issued.certificate.serial_number
    assert ext(issued.certificate, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.RFC822Name
    ) == [EMAIL]
    assert issued.certificate.issuer == pki.persons_ca_cert.subject
    issued.certificate.verify_directly_issued_by(pki.persons_ca_cert)
    key = issued.certificate.public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048
    constraints = ext(issued.certificate, x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca


def test_person_organisation_can_be_overridden(pki: DevPKI, out_dir: Path) -> None:
    issued = issue_auth(pki, out_dir, "person-org", organisation="CH Exemple")
    assert (
        issued.certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "CH Exemple"
    )


@pytest.mark.parametrize(
    ("usage", "flags", "ekus"),
    [
        (CertUsage.AUTH, {"digital_signature"}, {ExtendedKeyUsageOID.CLIENT_AUTH}),
        (CertUsage.SIGN, {"digital_signature", "content_commitment"}, {ExtendedKeyUsageOID.EMAIL_PROTECTION}),
        (CertUsage.ENC, {"key_encipherment"}, {ExtendedKeyUsageOID.EMAIL_PROTECTION}),
    ],
)
def test_person_key_usages(
    pki: DevPKI, out_dir: Path, usage: CertUsage, flags: set[str], ekus: set[x509.ObjectIdentifier]
) -> None:
    issued = pki.issue_person(NATIONAL_ID, "Anne", "Martin", EMAIL, usage, out_dir, f"usage-{usage.value}")
    key_usage = ext(issued.certificate, x509.KeyUsage)
    assert key_usage.critical
    all_flags = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
    )
    assert {flag for flag in all_flags if getattr(key_usage.value, flag)} == flags
    assert set(ext(issued.certificate, x509.ExtendedKeyUsage).value) == ekus


def test_validity_defaults(pki: DevPKI, out_dir: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    cert = issue_auth(pki, out_dir, "validity").certificate
    assert now - dt.timedelta(minutes=10) < cert.not_valid_before_utc < now - dt.timedelta(minutes=3)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3 * 365) <= lifetime <= dt.timedelta(days=3 * 366)


def test_expired_certificate_can_be_issued(pki: DevPKI, out_dir: Path) -> None:
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    end = dt.datetime(2021, 1, 1, tzinfo=dt.UTC)
    cert = issue_auth(pki, out_dir, "expired", not_before=start, not_after=end).certificate
    assert (cert.not_valid_before_utc, cert.not_valid_after_utc) == (start, end)
    with pytest.raises(ValueError, match="later"):
        issue_auth(pki, out_dir, "backwards", not_before=end, not_after=start)


def test_files_and_pkcs12(pki: DevPKI, out_dir: Path) -> None:
    issued = issue_auth(pki, out_dir, "files", p12_password=b"s3cret")
    assert issued.cert_path == out_dir / "files.pem" and issued.key_path == out_dir / "files.key"
    assert issued.p12_path == out_dir / "files.p12"
    assert x509.load_pem_x509_certificate(issued.cert_path.read_bytes()) == issued.certificate
    chain = x509.load_pem_x509_certificates(issued.chain_path.read_bytes())
    assert chain == [issued.certificate, pki.persons_ca_cert]
    key_pem = issued.key_path.read_bytes()
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # unencrypted PKCS#8
    assert stat.S_IMODE(issued.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(issued.p12_path.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert key.public_key().public_numbers() == issued.certificate.public_key().public_numbers()  # type: ignore[union-attr]

    p12 = pkcs12.load_pkcs12(issued.p12_path.read_bytes(), b"s3cret")
    assert p12.cert is not None and p12.cert.certificate == issued.certificate
    assert p12.key is not None
    assert [c.certificate for c in p12.additional_certs] == [pki.persons_ca_cert, pki.root_cert]
    with pytest.raises(ValueError):
        pkcs12.load_pkcs12(issued.p12_path.read_bytes(), b"wrong")

    without = issue_auth(pki, out_dir, "no-p12")
    assert without.p12_path is None and not (out_dir / "no-p12.p12").exists()


@needs_openssl
def test_pkcs12_opens_with_openssl(pki: DevPKI, out_dir: Path) -> None:
    issued = issue_auth(pki, out_dir, "p12-openssl", p12_password=b"pass phrase")
    result = openssl(
        "pkcs12", "-in", str(issued.p12_path), "-passin", "pass:pass phrase", "-nokeys", "-clcerts"
    )
    assert result.returncode == 0, result.stderr
    assert x509.load_pem_x509_certificates(result.stdout.encode())[0] == issued.certificate


def test_bad_inputs_are_refused(pki: DevPKI, out_dir: Path) -> None:
    with pytest.raises(ValueError):
        pki.issue_person(NATIONAL_ID, "Anne", "Martin", "not-an-address", CertUsage.AUTH, out_dir, "x")
    with pytest.raises(ValueError):
        pki.issue_person("", "Anne", "Martin", EMAIL, CertUsage.AUTH, out_dir, "x")
    with pytest.raises(ValueError):
        issue_auth(pki, out_dir, "../escape")
    with pytest.raises(ValueError):
        pki.issue_server(["not a host"], [], out_dir, "x", structure_id="3", organisation="O")


# -------------------- organisations


def test_organisation_certificate(pki: DevPKI, out_dir: Path) -> None:
    issued = pki.issue_organisation(
        "1750000001", "CH Exemple", "LOGICIEL LABO", out_dir, "org", email="labo@ch-exemple.caducee.test"
    )
    cert = issued.certificate
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "1750000001"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "CH Exemple"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "LOGICIEL LABO"
    assert not cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    assert issued.subject_dn == "CN=LOGICIEL LABO,OU=1750000001,O=CH Exemple,C=FR"
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["labo@ch-exemple.caducee.test"]
    cert.verify_directly_issued_by(pki.organisations_ca_cert)


def test_organisation_san_falls_back_to_host_name(pki: DevPKI, out_dir: Path) -> None:
    issued = pki.issue_organisation("3123456789", "Editeur", "app.editeur.caducee.test", out_dir, "org-dns")
    san = ext(issued.certificate, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["app.editeur.caducee.test"]
    with pytest.raises(ValueError, match="SAN"):
        pki.issue_organisation("3123456789", "Editeur", "LOGICIEL SANS NOM", out_dir, "org-no-san")


def test_server_certificate(pki: DevPKI, out_dir: Path) -> None:
    issued = pki.issue_server(
        ["mx.caducee.test", "localhost"],
        ["127.0.0.1", "::1"],
        out_dir,
        "server",
        structure_id="312345678900017",
        organisation="Caducée Opérateur",
    )
    cert = issued.certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mx.caducee.test"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "312345678900017"
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mx.caducee.test", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert set(ext(cert, x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    cert.verify_directly_issued_by(pki.organisations_ca_cert)


# -------------------- revocation


@needs_openssl
def test_revocation_is_published_and_openssl_sees_it(pki: DevPKI, out_dir: Path) -> None:
    issued = issue_auth(pki, out_dir, "to-revoke")
    crl_path = pki.crl_path(CaRole.PERSONS)
    verify = (
        "verify",
        "-crl_check",
        "-CAfile",
        str(pki.ca_bundle_path),
        "-CRLfile",
        str(crl_path),
        str(issued.cert_path),
    )
    before = openssl(*verify)
    assert before.returncode == 0 and ": OK" in before.stdout, before.stderr
    number = crl_number(crl_path)

    assert pki.revoke(issued.serial) == crl_path

    after = openssl(*verify)
    assert after.returncode != 0
    assert "certificate revoked" in after.stderr
    assert crl_number(crl_path) == number + 1
    check = openssl("crl", "-in", str(crl_path), "-noout", "-CAfile", str(pki.persons_ca_cert_path))
    assert check.returncode == 0 and "verify OK" in check.stderr
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    entry = crl.get_revoked_certificate_by_serial_number(issued.serial)
    assert entry is not None
    assert (
        entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        is x509.ReasonFlags.key_compromise
    )
    assert pki.is_revoked(issued.serial)

    # Idempotent: a second revocation leaves the CRL alone.
    pki.revoke(issued.serial)
    assert crl_number(crl_path) == number + 1


def test_revoke_by_certificate_file_uses_the_issuing_ca(pki: DevPKI, out_dir: Path) -> None:
    issued = pki.issue_organisation(
        "1750000002", "CH", "APP", out_dir, "org-revoke", email="app@ch.caducee.test"
    )
    persons_number = crl_number(pki.crl_path(CaRole.PERSONS))
    organisations_number = crl_number(pki.crl_path(CaRole.ORGANISATIONS))

    path = pki.revoke(issued.cert_path, reason=x509.ReasonFlags.superseded)

    assert path == pki.crl_path(CaRole.ORGANISATIONS)
    assert crl_number(path) == organisations_number + 1
    assert crl_number(pki.crl_path(CaRole.PERSONS)) == persons_number
    entry = x509.load_pem_x509_crl(path.read_bytes()).get_revoked_certificate_by_serial_number(issued.serial)
    assert entry is not None
    assert (
        entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is x509.ReasonFlags.superseded
    )


def test_revoke_by_hexadecimal_serial_string(pki: DevPKI, out_dir: Path) -> None:
    issued = issue_auth(pki, out_dir, "hex-serial")
    colons = ":".join(f"{issued.serial:040x}"[i : i + 2] for i in range(0, 40, 2))
    assert pki.revoke(colons) == pki.crl_path(CaRole.PERSONS)
    assert pki.is_revoked(issued.serial)
    other = issue_auth(pki, out_dir, "hex-serial-2")
    pki.revoke(issued.serial_hex)  # already revoked: no change
    pki.revoke(str(other.cert_path))  # a string naming a file is a path
    assert pki.is_revoked(other.serial)
    with pytest.raises(FileNotFoundError):
        pki.revoke("no-such-file.pem")


def test_revoke_refuses_what_it_did_not_issue(pki: DevPKI, foreign_pki: DevPKI, out_dir: Path) -> None:
    foreign = issue_auth(foreign_pki, out_dir, "foreign-leaf")
    with pytest.raises(ValueError, match="not issued by this PKI"):
        pki.revoke(foreign.cert_path)
    with pytest.raises(KeyError):
        pki.revoke(foreign.serial)
    with pytest.raises(ValueError):
        pki.revoke(pki.root_cert_path)


@needs_openssl
def test_revoked_intermediate_goes_to_the_root_crl(tmp_path: Path) -> None:
    pki = DevPKI.create_or_load(tmp_path / "pki")
    leaf = issue_auth(pki, tmp_path, "leaf")
    crls = [arg for path in pki.crl_paths() for arg in ("-CRLfile", str(path))]
    verify = ("verify", "-crl_check_all", "-CAfile", str(pki.ca_bundle_path), *crls, str(leaf.cert_path))
    assert openssl(*verify).returncode == 0

    path = pki.revoke(pki.persons_ca_cert_path, reason=x509.ReasonFlags.ca_compromise)

    assert path == pki.crl_path(CaRole.ROOT) and crl_number(path) == 2
    result = openssl(*verify)
    assert result.returncode != 0 and "certificate revoked" in result.stderr


def test_refresh_crls_advances_every_number(tmp_path: Path) -> None:
    pki = DevPKI.create_or_load(tmp_path / "pki")
    before = [crl_number(path) for path in pki.crl_paths()]
    assert pki.refresh_crls() == pki.crl_paths()
    assert [crl_number(path) for path in pki.crl_paths()] == [n + 1 for n in before]


@needs_openssl
def test_foreign_pki_is_independent(pki: DevPKI, foreign_pki: DevPKI, out_dir: Path) -> None:
    assert foreign_pki.root_cert.fingerprint(hashes.SHA256()) != pki.root_cert.fingerprint(hashes.SHA256())
    # Same names (same default organisation), different keys: only signatures tell them apart.
    assert foreign_pki.persons_ca_cert.subject == pki.persons_ca_cert.subject
    foreign = issue_auth(foreign_pki, out_dir, "foreign-verify")
    result = openssl("verify", "-CAfile", str(pki.ca_bundle_path), str(foreign.cert_path))
    assert result.returncode != 0
    own = openssl("verify", "-CAfile", str(foreign_pki.ca_bundle_path), str(foreign.cert_path))
    assert own.returncode == 0, own.stderr


@needs_openssl
def test_openssl_reports_expired_certificate(pki: DevPKI, out_dir: Path) -> None:
    issued = issue_auth(
        pki,
        out_dir,
        "expired-openssl",
        not_before=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
        not_after=dt.datetime(2021, 1, 1, tzinfo=dt.UTC),
    )
    result = openssl("verify", "-CAfile", str(pki.ca_bundle_path), str(issued.cert_path))
    assert result.returncode != 0 and "certificate has expired" in result.stderr
