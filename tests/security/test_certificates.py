"""Certificate chain pitfalls of row 24 that need a CA of their own (docs/security.md): name constraints of
an intermediate, and a leaf certificate used as a CA. They run against `crypto.validation`, the one
validator behind SMTP AUTH EXTERNAL, IMAP AUTHENTICATE EXTERNAL, the relay listener and the HTTPS API;
the black-box refusals of the other certificate rows are in test_relay.py and test_auth.py."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from crypto.pki import CaRole, CertUsage, DevPKI
from crypto.validation import CertificateRejected, CertificateValidator, RejectReason

NOW = dt.datetime.now(dt.UTC)
_CA_USAGE = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False)
_LEAF_USAGE = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                            encipher_only=False, decipher_only=False)


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def _crl(issuer: x509.Name, key: rsa.RSAPrivateKey, path: Path) -> Path:
    crl = (x509.CertificateRevocationListBuilder().issuer_name(issuer).last_update(NOW - dt.timedelta(minutes=1))
           .next_update(NOW + dt.timedelta(days=7)).add_extension(x509.CRLNumber(1), critical=False)
           .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
           .sign(key, hashes.SHA256()))
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path


def _leaf(issuer: x509.Name, issuer_key: rsa.RSAPrivateKey, host: str, *, ca: bool = False) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Operateur Contraint"),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "399999999900009"),
                         x509.NameAttribute(NameOID.COMMON_NAME, host)])
    key = _key()
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(_LEAF_USAGE, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                           critical=False)
            .sign(issuer_key, hashes.SHA256()))


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    return DevPKI.create_or_load(tmp_path_factory.mktemp("pki") / "pki")


def test_leaf_outside_the_name_constraints_of_its_intermediate_is_refused(pki: DevPKI, tmp_path: Path) -> None:
    """An intermediate CA permitted only `allowed.test`; a certificate it issues for `mx.evil.test` is
    refused (UNTRUSTED), while one for `mx.allowed.test` passes — the same chain, CRLs and policy."""
    root_key = pki._private_key(CaRole.ROOT)
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "AC contrainte")])
    constrained = (x509.CertificateBuilder().subject_name(name).issuer_name(pki.root_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=300))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(_CA_USAGE, critical=True)
                   .add_extension(x509.NameConstraints(permitted_subtrees=[x509.DNSName("allowed.test")],
                                                       excluded_subtrees=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
                                  critical=False)
                   .sign(root_key, hashes.SHA256()))
    validator = CertificateValidator([pki.root_cert], [pki.persons_ca_cert, pki.organisations_ca_cert, constrained],
                                     [*pki.crl_paths(), _crl(name, key, tmp_path / "constrained.crl.pem")])
    assert validator.validate(_der(_leaf(name, key, "mx.allowed.test"))).national_id == "399999999900009"
    with pytest.raises(CertificateRejected) as refused:
        validator.validate(_der(_leaf(name, key, "mx.evil.test")))
    assert refused.value.reason is RejectReason.UNTRUSTED


def test_a_leaf_certificate_cannot_act_as_a_ca(pki: DevPKI, tmp_path: Path) -> None:
    """A practitioner's certificate (CA:FALSE) signing another one, even when offered as an intermediate,
    does not make a chain (RFC 5280 §4.2.1.9); nor does a leaf that claims CA:TRUE without being issued as a
    CA by the trust anchors' hierarchy."""
    issued = pki.issue_person("810012345678", "Camille", "Martin", "camille@caducee.localhost", CertUsage.AUTH,
                              tmp_path, "leaf")
    leaf_key = serialization.load_pem_private_key(issued.key_path.read_bytes(), None)
    assert isinstance(leaf_key, rsa.RSAPrivateKey)
    validator = CertificateValidator([pki.root_cert],
                                     [pki.persons_ca_cert, pki.organisations_ca_cert, issued.certificate],
                                     pki.crl_paths())
    assert validator.validate(_der(issued.certificate)).national_id == "810012345678"
    for ca in (False, True):
        forged = _leaf(issued.certificate.subject, leaf_key, "mx.forged.test", ca=ca)
        with pytest.raises(CertificateRejected) as refused:
            validator.validate(_der(forged))
        assert refused.value.reason is RejectReason.UNTRUSTED
