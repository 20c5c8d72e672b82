"""Client certificate validation: each rejection reason, identity mapping, CRL reloading and speed."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from crypto.pki import CaRole, CertUsage, DevPKI, IssuedCertificate
from crypto.validation import (
    CertificateKind,
    CertificateRejected,
    CertificateValidator,
    RejectReason,
    ValidatedCertificate,
)

NATIONAL_ID = "810001234567"
EMAIL = "anne.martin@ch-exemple.caducee.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    return DevPKI.create_or_load(tmp_path_factory.getbasetemp() / "crypto-dev-pki")


@pytest.fixture(scope="module")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    return DevPKI.create_or_load(tmp_path_factory.getbasetemp() / "crypto-foreign-pki")


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("validation-certs")


@pytest.fixture(scope="module")
def person(pki: DevPKI, out_dir: Path) -> IssuedCertificate:
    return pki.issue_person(NATIONAL_ID, "Anne", "Martin", EMAIL, CertUsage.AUTH, out_dir, "person")


@pytest.fixture(scope="module")
def validator(pki: DevPKI) -> CertificateValidator:
    return CertificateValidator.from_files(pki.ca_bundle_path, pki.crl_paths())


def der(issued: IssuedCertificate) -> bytes:
    return issued.certificate.public_bytes(serialization.Encoding.DER)


def rejection(validator: CertificateValidator, data: bytes, **kwargs: object) -> CertificateRejected:
    with pytest.raises(CertificateRejected) as info:
        validator.validate(data, **kwargs)  # type: ignore[arg-type]
    return info.value


# -------------------- accepted


def test_person_is_mapped_by_serial_number(
    validator: CertificateValidator, person: IssuedCertificate
) -> None:
    result = validator.validate(der(person))
    assert result == ValidatedCertificate(
        kind=CertificateKind.PERSON,
        national_id=NATIONAL_ID,
        subject_dn=person.subject_dn,
        issuer_dn=person.certificate.issuer.rfc4514_string(),
        serial=person.serial,
        not_after=person.certificate.not_valid_after_utc,
        fingerprint_sha256=hashlib.sha256(der(person)).hexdigest(),
        emails=(EMAIL,),
    )
    assert "AC PERSONNES" in result.issuer_dn


def test_organisation_is_mapped_by_ou(pki: DevPKI, validator: CertificateValidator, out_dir: Path) -> None:
    issued = pki.issue_organisation(
        "1750000001", "CH Exemple", "LOGICIEL", out_dir, "org", email="app@ch.caducee.test"
    )
    result = validator.validate(der(issued))
    assert result.kind is CertificateKind.ORGANISATION
    assert result.national_id == "1750000001"
    assert result.subject_dn == "CN=LOGICIEL,OU=1750000001,O=CH Exemple,C=FR"
    assert result.emails == ("app@ch.caducee.test",)


def test_operator_server_certificate_is_a_client_too(
    pki: DevPKI, validator: CertificateValidator, out_dir: Path
) -> None:
    issued = pki.issue_server(
        ["mx.op.caducee.test"], [], out_dir, "op", structure_id="312345678900017", organisation="Op"
    )
    result = validator.validate(der(issued))
    assert (result.kind, result.national_id, result.emails) == (
        CertificateKind.ORGANISATION,
        "312345678900017",
        (),
    )


def test_signature_certificate_for_email_protection(
    pki: DevPKI, validator: CertificateValidator, out_dir: Path
) -> None:
    signing = pki.issue_person(NATIONAL_ID, "Anne", "Martin", EMAIL, CertUsage.SIGN, out_dir, "sign")
    assert (
        validator.validate(der(signing), usage=ExtendedKeyUsageOID.EMAIL_PROTECTION).national_id
        == NATIONAL_ID
    )
    assert rejection(validator, der(signing)).reason is RejectReason.WRONG_USAGE


# -------------------- refused


def test_expired(pki: DevPKI, validator: CertificateValidator, out_dir: Path) -> None:
    expired = pki.issue_person(
        NATIONAL_ID,
        "Anne",
        "Martin",
        EMAIL,
        CertUsage.AUTH,
        out_dir,
        "expired",
        not_before=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
        not_after=dt.datetime(2021, 1, 1, tzinfo=dt.UTC),
    )
    refused = rejection(validator, der(expired))
    assert refused.reason is RejectReason.EXPIRED
    assert "expired" in refused.detail and format(expired.serial, "X") in refused.detail


def test_not_yet_valid(pki: DevPKI, validator: CertificateValidator, out_dir: Path) -> None:
    start = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    future = pki.issue_person(
        NATIONAL_ID, "Anne", "Martin", EMAIL, CertUsage.AUTH, out_dir, "future", not_before=start
    )
    refused = rejection(validator, der(future))
    assert refused.reason is RejectReason.EXPIRED and "not yet valid" in refused.detail
    assert validator.validate(der(future), now=start + dt.timedelta(days=1)).national_id == NATIONAL_ID


def test_expiry_is_judged_at_the_given_time(
    validator: CertificateValidator, person: IssuedCertificate
) -> None:
    later = person.certificate.not_valid_after_utc + dt.timedelta(seconds=1)
    assert rejection(validator, der(person), now=later).reason is RejectReason.EXPIRED


def test_foreign_ca_with_identical_names_is_untrusted(
    validator: CertificateValidator, foreign_pki: DevPKI, pki: DevPKI, out_dir: Path
) -> None:
    assert foreign_pki.persons_ca_cert.subject == pki.persons_ca_cert.subject
    foreign = foreign_pki.issue_person(
        NATIONAL_ID, "Anne", "Martin", EMAIL, CertUsage.AUTH, out_dir, "foreign"
    )
    assert rejection(validator, der(foreign)).reason is RejectReason.UNTRUSTED


def test_foreign_ca_with_other_names_is_untrusted(
    validator: CertificateValidator, tmp_path_factory: pytest.TempPathFactory, out_dir: Path
) -> None:
    other = DevPKI.create_or_load(
        tmp_path_factory.getbasetemp() / "crypto-other-pki", organisation="Autre Opérateur"
    )
    foreign = other.issue_organisation(
        "1750000001", "CH", "APP", out_dir, "other", email="app@ch.caducee.test"
    )
    assert rejection(validator, der(foreign)).reason is RejectReason.UNTRUSTED


def test_encryption_certificate_is_wrong_usage(
    pki: DevPKI, validator: CertificateValidator, out_dir: Path
) -> None:
    encryption = pki.issue_person(NATIONAL_ID, "Anne", "Martin", EMAIL, CertUsage.ENC, out_dir, "enc")
    refused = rejection(validator, der(encryption))
    assert refused.reason is RejectReason.WRONG_USAGE and "clientAuth" in refused.detail


def test_authentication_certificate_is_not_for_email(
    validator: CertificateValidator, person: IssuedCertificate
) -> None:
    refused = rejection(validator, der(person), usage=ExtendedKeyUsageOID.EMAIL_PROTECTION)
    assert refused.reason is RejectReason.WRONG_USAGE


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage bytes, not DER", b"\x30\x82\x01\x00" + b"\x00" * 10],
    ids=["empty", "garbage", "truncated"],
)
def test_malformed(validator: CertificateValidator, data: bytes) -> None:
    assert rejection(validator, data).reason is RejectReason.MALFORMED


def test_pem_instead_of_der_is_malformed(validator: CertificateValidator, person: IssuedCertificate) -> None:
    assert rejection(validator, person.cert_path.read_bytes()).reason is RejectReason.MALFORMED


def test_revoked(pki: DevPKI, validator: CertificateValidator, out_dir: Path) -> None:
    issued = pki.issue_person(NATIONAL_ID, "Anne", "Martin", EMAIL, CertUsage.AUTH, out_dir, "revoked")
    assert validator.validate(der(issued)).serial == issued.serial

    pki.revoke(issued.serial)

    refused = rejection(validator, der(issued))
    assert refused.reason is RejectReason.REVOKED
    assert format(issued.serial, "X") in refused.detail and "keyCompromise" in refused.detail


def test_missing_crl_fails_closed(
    pki: DevPKI, person: IssuedCertificate, out_dir: Path, tmp_path: Path
) -> None:
    without_persons = CertificateValidator.from_files(
        pki.ca_bundle_path,
        [pki.crl_path(CaRole.ROOT), pki.crl_path(CaRole.ORGANISATIONS), tmp_path / "absent.crl"],
    )
    assert rejection(without_persons, der(person)).reason is RejectReason.CRL_UNAVAILABLE
    organisation = pki.issue_organisation(
        "1750000009", "CH", "APP", out_dir, "org-crl", email="a@ch.caducee.test"
    )
    assert without_persons.validate(der(organisation)).national_id == "1750000009"


def test_missing_root_crl_fails_closed(pki: DevPKI, person: IssuedCertificate) -> None:
    without_root = CertificateValidator.from_files(
        pki.ca_bundle_path, [pki.crl_path(CaRole.PERSONS), pki.crl_path(CaRole.ORGANISATIONS)]
    )
    refused = rejection(without_root, der(person))
    assert refused.reason is RejectReason.CRL_UNAVAILABLE and "depth 1" in refused.detail


def test_crl_signed_by_a_foreign_ca_is_not_used(
    pki: DevPKI, foreign_pki: DevPKI, person: IssuedCertificate
) -> None:
    # The foreign persons CA has the same name as ours: only the signature check tells the CRLs apart.
    forged = CertificateValidator.from_files(
        pki.ca_bundle_path,
        [pki.crl_path(CaRole.ROOT), foreign_pki.crl_path(CaRole.PERSONS), pki.crl_path(CaRole.ORGANISATIONS)],
    )
    assert rejection(forged, der(person)).reason is RejectReason.CRL_UNAVAILABLE


def test_crl_with_a_forged_signature_is_not_used(
    pki: DevPKI, foreign_pki: DevPKI, person: IssuedCertificate, tmp_path: Path
) -> None:
    # Issuer name and authority key identifier of our persons CA, signed with another key.
    foreign_key = serialization.load_pem_private_key(
        foreign_pki.ca_cert_path(CaRole.PERSONS).with_suffix(".key").read_bytes(), password=None
    )
    our_ski = pki.persons_ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    now = dt.datetime.now(dt.UTC)
    forged = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.persons_ca_cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=7))
        .add_extension(x509.CRLNumber(10**6), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier(our_ski, None, None), critical=False)
        .sign(foreign_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    forged_path = tmp_path / "forged.crl.pem"
    forged_path.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    checker = CertificateValidator.from_files(
        pki.ca_bundle_path, [pki.crl_path(CaRole.ROOT), forged_path, pki.crl_path(CaRole.ORGANISATIONS)]
    )
    assert rejection(checker, der(person)).reason is RejectReason.CRL_UNAVAILABLE


def test_revoked_intermediate(tmp_path: Path) -> None:
    own = DevPKI.create_or_load(tmp_path / "pki")
    leaf = own.issue_person(NATIONAL_ID, "Anne", "Martin", EMAIL, CertUsage.AUTH, tmp_path, "leaf")
    checker = CertificateValidator.from_files(own.ca_bundle_path, own.crl_paths())
    assert checker.validate(der(leaf)).kind is CertificateKind.PERSON
    own.revoke(own.persons_ca_cert_path, reason=x509.ReasonFlags.ca_compromise)
    refused = rejection(checker, der(leaf))
    assert refused.reason is RejectReason.REVOKED and "CA certificate" in refused.detail


def test_details_are_log_safe(foreign_pki: DevPKI, validator: CertificateValidator, out_dir: Path) -> None:
    hostile = foreign_pki.issue_person(
        NATIONAL_ID, "Eve\r\nX-Injected: yes", "Martin", EMAIL, CertUsage.AUTH, out_dir, "hostile"
    )
    refused = rejection(validator, der(hostile))
    assert refused.reason is RejectReason.UNTRUSTED
    assert refused.detail.isascii() and refused.detail.isprintable()
    assert "Eve" not in refused.detail and "Injected" not in refused.detail


# -------------------- CRL reloading


def test_crl_reload_keeps_the_last_valid_crl(
    pki: DevPKI, foreign_pki: DevPKI, out_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    crl_dir = tmp_path / "crls"
    crl_dir.mkdir()
    for path in pki.crl_paths():
        shutil.copy(path, crl_dir / path.name)
    persons_crl = crl_dir / pki.crl_path(CaRole.PERSONS).name
    checker = CertificateValidator.from_files(pki.ca_bundle_path, sorted(crl_dir.iterdir()))
    issued = pki.issue_person(NATIONAL_ID, "Anne", "Martin", EMAIL, CertUsage.AUTH, out_dir, "reload")
    assert checker.validate(der(issued)).serial == issued.serial
    old_crl = persons_crl.read_bytes()

    with caplog.at_level(logging.WARNING, logger="crypto.validation"):
        persons_crl.write_bytes(b"-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n")
        assert checker.validate(der(issued)).serial == issued.serial
        assert any("keeping the last valid CRL" in r.getMessage() for r in caplog.records)
        caplog.clear()

        # Same issuer name, wrong key.
        shutil.copy(foreign_pki.crl_path(CaRole.PERSONS), persons_crl)
        assert checker.validate(der(issued)).serial == issued.serial
        assert any("not signed by any configured CA" in r.getMessage() for r in caplog.records)

    pki.revoke(issued.serial)
    shutil.copy(pki.crl_path(CaRole.PERSONS), persons_crl)
    assert rejection(checker, der(issued)).reason is RejectReason.REVOKED

    # Rolling back to an older CRL (lower CRL number) is refused: still revoked.
    with caplog.at_level(logging.WARNING, logger="crypto.validation"):
        persons_crl.write_bytes(old_crl)
        assert rejection(checker, der(issued)).reason is RejectReason.REVOKED
        assert any("went backwards" in r.getMessage() for r in caplog.records)


def test_missing_file_after_load_keeps_the_last_valid_crl(
    pki: DevPKI, person: IssuedCertificate, tmp_path: Path
) -> None:
    copies = []
    for path in pki.crl_paths():
        copies.append(tmp_path / path.name)
        shutil.copy(path, copies[-1])
    checker = CertificateValidator.from_files(pki.ca_bundle_path, copies)
    for copy in copies:
        copy.unlink()
    assert checker.validate(der(person)).serial == person.serial


def test_stale_crl_is_used_and_logged(
    validator: CertificateValidator, person: IssuedCertificate, pki: DevPKI, caplog: pytest.LogCaptureFixture
) -> None:
    next_update = x509.load_pem_x509_crl(pki.crl_path(CaRole.PERSONS).read_bytes()).next_update_utc
    assert next_update is not None
    with caplog.at_level(logging.WARNING, logger="crypto.validation"):
        result = validator.validate(der(person), now=next_update + dt.timedelta(days=1))
    assert result.national_id == NATIONAL_ID
    assert any("stale" in r.getMessage() for r in caplog.records)


def test_der_crl_files_are_accepted(pki: DevPKI, person: IssuedCertificate, tmp_path: Path) -> None:
    paths = []
    for path in pki.crl_paths():
        crl = x509.load_pem_x509_crl(path.read_bytes())
        paths.append(tmp_path / f"{path.stem}.der")
        paths[-1].write_bytes(crl.public_bytes(serialization.Encoding.DER))
    checker = CertificateValidator.from_files(pki.ca_bundle_path, paths)
    assert checker.validate(der(person)).serial == person.serial


# -------------------- construction, speed


def test_from_files_splits_anchors_and_intermediates(pki: DevPKI, tmp_path: Path) -> None:
    checker = CertificateValidator.from_files(pki.ca_bundle_path, pki.crl_paths())
    assert checker.anchors == (pki.root_cert,)
    only_intermediates = tmp_path / "intermediates.pem"
    only_intermediates.write_bytes(pki.persons_ca_cert_path.read_bytes())
    with pytest.raises(ValueError, match="trust anchor"):
        CertificateValidator.from_files(only_intermediates, [])


def per_validation(checker: CertificateValidator, data: bytes, rounds: int = 300) -> float:
    checker.validate(data)
    start = time.perf_counter()
    for _ in range(rounds):
        checker.validate(data)
    return (time.perf_counter() - start) / rounds


def test_validation_is_fast(pki: DevPKI, validator: CertificateValidator, person: IssuedCertificate) -> None:
    data = der(person)
    uncached = CertificateValidator.from_files(pki.ca_bundle_path, pki.crl_paths(), cache_size=0)
    # A full validation is one chain build (two RSA signature checks) plus parsing and lookups.
    full = per_validation(uncached, data)
    assert full < 0.003, f"{full * 1e6:.0f} µs per uncached validation"
    # A returning certificate: hash, cache lookup, revocation check.
    cached = per_validation(validator, data)
    assert cached < 0.0005, f"{cached * 1e6:.0f} µs per cached validation"
    assert cached < full


def test_validation_is_thread_safe(pki: DevPKI, person: IssuedCertificate, out_dir: Path) -> None:
    others = [
        pki.issue_organisation(
            f"17500000{i}", "CH", f"APP{i}", out_dir, f"thread-{i}", email=f"app{i}@ch.caducee.test"
        )
        for i in range(4)
    ]
    samples = [(der(person), NATIONAL_ID)] + [(der(o), f"17500000{i}") for i, o in enumerate(others)]
    checker = CertificateValidator.from_files(pki.ca_bundle_path, pki.crl_paths(), cache_size=2)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: checker.validate(samples[i % 5][0]).national_id, range(400)))
    assert results == [samples[i % 5][1] for i in range(400)]
