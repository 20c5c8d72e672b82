"""Discovery of another operator's encryption certificates in its OpenLDAP directory (a real slapd).

The other operator ("autre.test") runs slapd with base dc=autre,dc=test; its people's certificates come
from the node's dev PKI, which plays IGC-Santé for the whole trust space (one set of trust anchors).
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from caducee import config as config_mod
from caducee.cli import main
from crypto.pki import CertUsage, DevPKI
from crypto.validation import CertificateValidator
from directory.discovery import (
    CertificateDiscovery,
    DiscoveryNotConfigured,
    DiscoveryUnavailable,
    InvalidAddress,
    discovery_endpoint,
    is_encryption_certificate,
)
from directory.testing_slapd import Slapd

BASE = "dc=autre,dc=test"
MAILBOX_CLASSES = ["top", "person", "organizationalPerson", "inetOrgPerson", "caduceeMailbox"]


@dataclass(frozen=True)
class Settings:
    """[discovery] as caducee.config.DiscoveryConfig holds it."""

    url: str
    base: str = BASE
    ca: str = ""
    cache_ttl: int = 60
    timeout: int = 5


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Operator:
    server: Slapd
    pki: DevPKI
    certs: dict[str, x509.Certificate]
    ca_file: Path
    validator: CertificateValidator

    def discovery(self, clock: Clock | None = None, **settings: Any) -> CertificateDiscovery:
        config = Settings(url=settings.pop("url", self.server.ldaps_url), **settings)
        return CertificateDiscovery(config, ca_file=self.ca_file, validator=self.validator,
                                    clock=clock or time.monotonic)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


@pytest.fixture
def operator(slapd_factory: Any, node_state: Path) -> Operator:
    """Another operator's directory holding mailboxes with every kind of certificate."""
    server = slapd_factory(BASE, state=node_state)
    pki = DevPKI.create_or_load(node_state / "pki")
    out = node_state.parent / "autre"
    now = dt.datetime.now(dt.UTC)

    def person(name: str, usage: CertUsage, **validity: Any) -> x509.Certificate:
        national_id = f"8{abs(hash(name)) % 10**11:011d}"
        return pki.issue_person(national_id, name.title(), "Autre", f"{name}@autre.test", usage, out,
                                f"{name}.{usage.value}", **validity).certificate

    certs = {
        "alice": person("alice", CertUsage.ENC),
        "bob": person("bob", CertUsage.ENC),
        "carol-expired": person("carol", CertUsage.ENC, not_before=now - dt.timedelta(days=400),
                                not_after=now - dt.timedelta(days=1)),
        "carol-sign": person("carol", CertUsage.SIGN),
        "dave": person("dave", CertUsage.ENC),
    }
    stranger = DevPKI.create_or_load(node_state.parent / "stranger-pki")
    certs["eve"] = stranger.issue_person("800000000001", "Eve", "Autre", "eve@autre.test", CertUsage.ENC, out,
                                         "eve.enc").certificate
    pki.revoke(certs["dave"].serial_number)

    conn = server.connection()
    try:
        assert conn.add(BASE, ["top", "dcObject", "organization"], {"dc": "autre", "o": "Autre opérateur"})
        assert conn.add(f"ou=mailboxes,{BASE}", ["top", "organizationalUnit"], {"ou": "mailboxes"})

        def mailbox(address: str, **attributes: Any) -> None:
            assert conn.add(f"mail={address},ou=mailboxes,{BASE}", MAILBOX_CLASSES,
                            {"mail": address, "cn": address, "sn": address, "caduceeMailboxType": "PER",
                             "caduceeOwner": "810000000000", **attributes}), conn.result

        mailbox("alice@autre.test", **{"userCertificate;binary": [_der(certs["alice"])]})
        # bob's only in userSMIMECertificate (PKCS#7 certs-only)
        mailbox("bob@autre.test", userSMIMECertificate=[
            pkcs7.serialize_certificates([certs["bob"]], Encoding.DER)])
        mailbox("carol@autre.test", **{"userCertificate;binary": [_der(certs["carol-expired"]),
                                                                   _der(certs["carol-sign"])]})
        mailbox("dave@autre.test", **{"userCertificate;binary": [_der(certs["dave"])]})
        mailbox("eve@autre.test", **{"userCertificate;binary": [_der(certs["eve"])]})
        mailbox("x*y@autre.test", **{"userCertificate;binary": [_der(certs["alice"])]})
        # slapd checks the syntax of userCertificate, not of userSMIMECertificate (binary)
        mailbox("broken@autre.test", userSMIMECertificate=[b"not pkcs7", b"\x30\x03\x02\x01\x01"])
    finally:
        conn.unbind()
    cfg = config_mod.load(node_state)
    validator = CertificateValidator.from_files(cfg.path(cfg.tls.trust_anchors), [cfg.path(p) for p in cfg.tls.crls])
    return Operator(server, pki, certs, pki.ca_bundle_path, validator)


def test_finds_an_encryption_certificate(operator: Operator) -> None:
    discovery = operator.discovery()
    try:
        assert [_der(c) for c in discovery.lookup("alice@autre.test")] == [_der(operator.certs["alice"])]
        assert [_der(c) for c in discovery.lookup("Alice@AUTRE.test")] == [_der(operator.certs["alice"])]
        # from userSMIMECertificate
        assert [_der(c) for c in discovery.lookup("bob@autre.test")] == [_der(operator.certs["bob"])]
    finally:
        discovery.close()


def test_expired_signing_only_revoked_and_untrusted_certificates_are_not_returned(operator: Operator) -> None:
    discovery = operator.discovery()
    try:
        assert discovery.lookup("carol@autre.test") == []  # expired encryption + valid signature-only
        assert discovery.lookup("dave@autre.test") == []  # revoked (the CRL of the persons CA)
        assert discovery.lookup("eve@autre.test") == []  # another CA: not our trust anchors
        assert discovery.lookup("broken@autre.test") == []  # values that do not parse
        assert discovery.lookup("nobody@autre.test") == []
    finally:
        discovery.close()
    assert is_encryption_certificate(operator.certs["dave"])
    assert not is_encryption_certificate(operator.certs["carol-sign"])
    # Without a validator only validity and key usage count: the revoked and the foreign ones come back.
    loose = CertificateDiscovery(Settings(url=operator.server.ldaps_url), ca_file=operator.ca_file)
    try:
        assert [_der(c) for c in loose.lookup("dave@autre.test")] == [_der(operator.certs["dave"])]
        assert [_der(c) for c in loose.lookup("eve@autre.test")] == [_der(operator.certs["eve"])]
        assert loose.lookup("carol@autre.test") == []
    finally:
        loose.close()


def test_answers_are_cached_until_they_expire(operator: Operator) -> None:
    clock = Clock()
    discovery = operator.discovery(clock, cache_ttl=60, timeout=2)
    try:
        first = discovery.lookup("alice@autre.test")
        assert discovery.lookup("nobody@autre.test") == []
        assert discovery.searches == 2
        clock.now += 30
        assert discovery.lookup("alice@autre.test") == first
        assert discovery.lookup("nobody@autre.test") == []  # "none" is cached too
        assert discovery.searches == 2 and discovery.hits == 2

        operator.server.stop()
        clock.now += 29
        assert [_der(c) for c in discovery.lookup("alice@autre.test")] == [_der(c) for c in first]
        assert discovery.searches == 2
        clock.now += 2  # expired: the server is asked, and it is gone
        started = time.monotonic()
        with pytest.raises(DiscoveryUnavailable, match=re.escape(operator.server.ldaps_url)):
            discovery.lookup("alice@autre.test")
        assert time.monotonic() - started < 10
        with pytest.raises(DiscoveryUnavailable, match="Connection refused"):
            discovery.lookup("alice@autre.test")  # a failure is not cached: asked again
    finally:
        discovery.close()


def test_the_cache_is_bounded(operator: Operator) -> None:
    discovery = CertificateDiscovery(Settings(url=operator.server.ldaps_url), ca_file=operator.ca_file,
                                     max_entries=2)
    try:
        for name in ("alice", "bob", "nobody"):
            discovery.lookup(f"{name}@autre.test")
        assert len(discovery._cache) == 2
        discovery.lookup("alice@autre.test")  # the oldest was dropped
        assert discovery.searches == 4
    finally:
        discovery.close()


def test_hostile_addresses_cannot_widen_the_search(operator: Operator) -> None:
    discovery = operator.discovery()
    offset = operator.server.log_size()
    try:
        for hostile in ("*@autre.test", "*)(mail=*@autre.test", "alice*@autre.test", "\\2a@autre.test",
                        "*)(|(objectClass=*)@autre.test", "x*@autre.test"):
            assert discovery.lookup(hostile) == [], hostile
        # '*' in a real local part is matched literally
        assert [_der(c) for c in discovery.lookup("x*y@autre.test")] == [_der(operator.certs["alice"])]
        for invalid in ("*", "alice@autre.test)(mail=*", "alice@autre.test\x00", "al ice@autre.test",
                        "alice@*", "", "a" * 65 + "@autre.test", "élise@autre.test", "alice@autre.test\n"):
            with pytest.raises(InvalidAddress):
                discovery.lookup(invalid)
    finally:
        discovery.close()
    filters = [f.upper() for f in re.findall(r'filter="([^"]*)"', operator.server.log_text(offset))]
    assert "(MAIL=\\2A@AUTRE.TEST)" in filters  # slapd logs the filter it parsed: '*' is a value, not "any"
    assert "(MAIL=\\2A\\29\\28MAIL=\\2A@AUTRE.TEST)" in filters
    assert all(f.count("(") == 1 for f in filters), filters


def test_a_server_that_never_answers_is_an_error_not_a_hang(operator: Operator) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        for url in (f"ldaps://127.0.0.1:{port}", f"ldap://127.0.0.1:{port}"):
            discovery = operator.discovery(url=url, timeout=1)
            started = time.monotonic()
            with pytest.raises(DiscoveryUnavailable, match="timed out"):
                discovery.lookup("alice@autre.test")
            assert time.monotonic() - started < 5
            discovery.close()
    finally:
        listener.close()


def test_concurrent_lookups(operator: Operator) -> None:
    discovery = operator.discovery()
    results: dict[int, list[bytes]] = {}

    def look(i: int) -> None:
        name = ("alice", "bob", "nobody")[i % 3]
        results[i] = [_der(c) for c in discovery.lookup(f"{name}@autre.test")]

    threads = [threading.Thread(target=look, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    discovery.close()
    expected = {"alice": [_der(operator.certs["alice"])], "bob": [_der(operator.certs["bob"])], "nobody": []}
    assert results == {i: expected[("alice", "bob", "nobody")[i % 3]] for i in range(24)}
    assert discovery.searches <= 24


def test_configuration_rules() -> None:
    assert discovery_endpoint("ldap://127.0.0.1:3890").starttls is False
    assert discovery_endpoint("ldap://ldap.autre.test").starttls is True  # StartTLS off loopback, always
    assert discovery_endpoint("ldaps://ldap.autre.test").port == 636
    for url, base in (("", BASE), ("ldaps://ldap.autre.test", ""), ("http://x.test", BASE)):
        with pytest.raises(DiscoveryNotConfigured):
            CertificateDiscovery(Settings(url=url, base=base), ca_file=Path("/nonexistent"))
    with pytest.raises(DiscoveryNotConfigured, match="CA bundle"):
        CertificateDiscovery(Settings(url="ldaps://ldap.autre.test"))


@pytest.fixture
def configured_node(node_state: Path, operator: Operator) -> Iterator[Path]:
    """The node's caducee.toml pointing [discovery] at the other operator's directory."""
    path = node_state / "caducee.toml"
    text = path.read_text(encoding="utf-8")
    section = text.index("[discovery]")
    head, tail = text[:section], text[section:]
    tail = tail.replace('url = ""', f'url = "{operator.server.ldaps_url}"', 1)
    tail = tail.replace('base = ""', f'base = "{BASE}"', 1)
    path.write_text(head + tail, encoding="utf-8")
    assert config_mod.load(node_state).discovery.url == operator.server.ldaps_url
    yield node_state


def test_cli_looks_locally_then_remotely(configured_node: Path, operator: Operator, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "alice.pem"
    assert main(["directory", "certificate", "alice@autre.test", "--out", str(out), "--state",
                 str(configured_node)]) == 0
    assert [_der(c) for c in x509.load_pem_x509_certificates(out.read_bytes())] == [_der(operator.certs["alice"])]
    assert f"from the remote directory {operator.server.ldaps_url}" in capsys.readouterr().err

    # A mailbox of this operator: the local directory answers (its encryption certificate, not auth/sign).
    assert main(["directory", "certificate", "camille.martin@caducee.localhost", "--state",
                 str(configured_node)]) == 0
    printed, err = capsys.readouterr()
    enc = x509.load_pem_x509_certificate((configured_node / "demo" / "camille.martin.enc.pem").read_bytes())
    assert [_der(c) for c in x509.load_pem_x509_certificates(printed.encode())] == [_der(enc)]
    assert "from the local directory" in err
    offset = operator.server.log_size()
    assert main(["directory", "certificate", "secretariat@caducee.localhost", "--state", str(configured_node)]) == 1
    assert operator.server.operations(offset)["SRCH"] == 0  # our own domain is never asked elsewhere

    assert main(["directory", "certificate", "carol@autre.test", "--state", str(configured_node)]) == 1
    assert "no usable encryption certificate for carol@autre.test" in capsys.readouterr().err
    assert main(["directory", "certificate", "*)(mail=*", "--state", str(configured_node)]) == 2
    operator.server.stop()
    assert main(["directory", "certificate", "alice@autre.test", "--state", str(configured_node)]) == 2
    assert "Connection refused" in capsys.readouterr().err


def test_cli_without_a_remote_directory(node_state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["directory", "certificate", "alice@autre.test", "--state", str(node_state)]) == 2
    assert "no remote directory is configured ([discovery] url)" in capsys.readouterr().err
