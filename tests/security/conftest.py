"""One real `caducee serve` for the security tests, with capturing next hops standing for other operators.

Next hops (each a `CapturePeer`, its certificate's DN whitelisted for its domain, so that only the
certificate itself can stop the relay):
- `b.test`: a well-behaved operator; its server certificate (serverAuth + clientAuth) is also operator B's
  client certificate on our relay listener;
- `wrongname.test` (RFC 6125 name), `selfsigned.test` (chain), `expired.test` (validity), `revoked.test`
  (CRL), `clientonly.test` (extended key usage clientAuth only): bad in one way each;
- `plain.test`: does not offer STARTTLS (STARTTLS stripping).

Certificates without a next hop: `serveronly.test`, an operator certificate for serverAuth only (whitelisted),
and `person-serverauth`, a person certificate of a known practitioner for serverAuth only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailserver.testing import ServerProcess, free_port
from tests.security.peers import CapturePeer

TOOLS = ("curl", "swaks", "openssl")
BAD_HOPS = ("wrongname.test", "selfsigned.test", "expired.test", "revoked.test", "clientonly.test", "plain.test")


@dataclass
class Cert:
    chain: Path
    key: Path
    dn: str


@dataclass
class Operator:
    """A peer operator: its capture server and the certificate it presents (also as a TLS client)."""

    domain: str
    peer: CapturePeer
    chain: Path
    key: Path
    dn: str


@dataclass
class Space:
    server: ServerProcess
    ops: dict[str, Operator]
    certs: dict[str, Cert] = field(default_factory=dict)

    @property
    def b(self) -> Operator:
        return self.ops["b.test"]


def _self_signed(out: Path) -> Cert:
    key = rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Operateur Autosigne"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "366666666600066"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30)).add_extension(san, critical=False)
            .sign(key, hashes.SHA256()))
    chain, key_path = out / "selfsigned.pem", out / "selfsigned.key"
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Cert(chain, key_path, cert.subject.rfc4514_string())


def _with_usages(pki: object, kind: str, subject: x509.Name, san: list[x509.GeneralName],
                 ekus: Sequence[x509.ObjectIdentifier], out: Path, basename: str) -> Cert:
    """A certificate of the dev PKI with chosen extended key usages (its public methods fix them)."""
    from crypto.pki import _KU_DIGITAL_SIGNATURE, CaRole

    role = CaRole.PERSONS if kind == "person" else CaRole.ORGANISATIONS
    issued = pki._issue(role, subject, san, _KU_DIGITAL_SIGNATURE, ekus, out, basename, None,  # type: ignore[attr-defined]
                        validity=dt.timedelta(days=30), not_before=None, not_after=None)
    return Cert(issued.chain_path, issued.key_path, issued.subject_dn)


def _whitelist(server: ServerProcess, entries: dict[str, str]) -> None:
    """`caducee trust add` for each entry, in this process (one CLI start per entry cost seconds)."""
    from caducee import config as config_mod
    from mailserver.db import Writer, make_engine
    from mailserver.trust import TrustStore

    cfg = config_mod.load(server.state)
    engine = make_engine(cfg.database_url)
    writer = Writer(make_engine(cfg.database_url, writer=True), name="security-trust-writer")
    try:
        store = TrustStore(engine, writer)
        for domain, dn in entries.items():
            store.add(domain, dn, f"peer {domain}", actor="tests.security")
    finally:
        writer.stop()
        writer.engine.dispose()
        engine.dispose()


def _organisation(structure_id: str, organisation: str, cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, structure_id),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@pytest.fixture(scope="session")
def tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"the security tests need {', '.join(missing)} (make test installs them)")


@pytest.fixture(scope="session")
def space(tmp_path_factory: pytest.TempPathFactory, tools: None) -> Iterator[Space]:
    from crypto.pki import DevPKI

    base = tmp_path_factory.mktemp("security")
    domains = ("b.test", *BAD_HOPS)
    hop_ports = {d: free_port() for d in domains}
    server = ServerProcess.create(base / "state", next_hops=hop_ports,
                                  relay={"retry_initial": 1, "retry_max": 2, "connect_timeout": 5})
    pki = DevPKI.create_or_load(server.state / "pki")
    out = base / "peers"
    out.mkdir()
    certs: dict[str, Cert] = {}
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    for domain, structure_id, window in (
        ("b.test", "322222222200022", {}),
        ("expired.test", "333333333300033", {"not_before": past, "not_after": past + dt.timedelta(days=30)}),
        ("revoked.test", "344444444400044", {}),
        ("plain.test", "388888888800088", {}),
    ):
        label = domain.split(".")[0]
        issued = pki.issue_server([f"mx.{domain}", "localhost"], ["127.0.0.1"], out, label,
                                  structure_id=structure_id, organisation=f"Operateur {label}",
                                  **window)  # type: ignore[arg-type]
        certs[domain] = Cert(issued.chain_path, issued.key_path, issued.subject_dn)
        if label == "revoked":
            pki.revoke(issued.serial)
    wrong = pki.issue_server(["mx.somewhere-else.test"], [], out, "wrongname", structure_id="377777777700077",
                             organisation="Operateur Mauvais Nom")
    certs["wrongname.test"] = Cert(wrong.chain_path, wrong.key_path, wrong.subject_dn)
    certs["selfsigned.test"] = _self_signed(out)
    loopback: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    certs["clientonly.test"] = _with_usages(
        pki, "organisation", _organisation("399999999900099", "Operateur Client", "mx.clientonly.test"),
        loopback, (ExtendedKeyUsageOID.CLIENT_AUTH,), out, "clientonly")
    certs["serveronly.test"] = _with_usages(
        pki, "organisation", _organisation("311111111100011", "Operateur Serveur", "mx.serveronly.test"),
        loopback, (ExtendedKeyUsageOID.SERVER_AUTH,), out, "serveronly")
    person = server.identity("PER", 2)
    certs["person-serverauth"] = _with_usages(
        pki, "person", x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
                                  x509.NameAttribute(NameOID.ORGANIZATION_NAME, pki.organisation),
                                  x509.NameAttribute(NameOID.SURNAME, "Petit"),
                                  x509.NameAttribute(NameOID.GIVEN_NAME, "Sophie"),
                                  x509.NameAttribute(NameOID.COMMON_NAME, "Sophie Petit"),
                                  x509.NameAttribute(NameOID.SERIAL_NUMBER, person["national_id"])]),
        [x509.RFC822Name(person["address"])], (ExtendedKeyUsageOID.SERVER_AUTH,), out, "person-serverauth")

    ops: dict[str, Operator] = {}
    try:
        for domain in domains:
            cert = certs[domain]
            peer = CapturePeer(cert.chain, cert.key, hostname=f"mx.{domain}", starttls=domain != "plain.test")
            peer.start(hop_ports[domain])
            ops[domain] = Operator(domain, peer, cert.chain, cert.key, cert.dn)
        _whitelist(server, {**{d: certs[d].dn for d in domains}, "serveronly.test": certs["serveronly.test"].dn})
        with server:
            yield Space(server, ops, certs)
    finally:
        for op in ops.values():
            op.peer.stop()
