"""The directory over LDAPS against `caducee serve`, with the OpenLDAP command-line tools and ldap3.

The URL names 127.0.0.1, not localhost: for "localhost" libldap checks the certificate against the reverse
name of the connected address (on these machines 127.0.0.1 is also "vm"), which the node's certificate
does not carry. The node certificate names 127.0.0.1 (subjectAltName IP address), so the check is real.
"""

from __future__ import annotations

import base64
import os
import ssl
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from crypto.tls import client_context
from mailserver.testing import ServerProcess

with warnings.catch_warnings():  # ldap3 imports pyasn1 APIs that warn of their deprecation
    warnings.simplefilter("ignore", DeprecationWarning)
    import ldap3

BASE = "dc=caducee,dc=localhost"  # Config.ldap_base for the default domain caducee.localhost


def ldapsearch(server: ServerProcess, *args: str, scheme: str = "ldaps") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LDAPTLS_CACERT=server.ca_bundle, LDAPTLS_REQCERT="demand")
    return subprocess.run(["ldapsearch", "-H", f"{scheme}://127.0.0.1:{server.port('ldaps')}", "-x", "-LLL",
                           "-o", "ldif-wrap=no", "-o", "nettimeout=10", *args],
                          capture_output=True, text=True, env=env, timeout=30, check=False)


def entries(ldif: str) -> list[dict[str, list[str | bytes]]]:
    """LDIF records as {attribute: values}; base64 values (name::) decoded to bytes, "dn" included."""
    out: list[dict[str, list[str | bytes]]] = []
    for record in ldif.strip().split("\n\n"):
        if not record.strip():
            continue
        attrs: dict[str, list[str | bytes]] = {}
        for line in record.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            name, _, value = line.partition(":")
            if value.startswith(":"):
                decoded: str | bytes = base64.b64decode(value[1:].strip())
                if name != "userCertificate;binary" and not name.startswith("userSMIME"):
                    decoded = decoded.decode("utf-8")  # type: ignore[union-attr]
                attrs.setdefault(name, []).append(decoded)
            else:
                attrs.setdefault(name, []).append(value.strip())
        out.append(attrs)
    return out


def der(pem_path: str) -> bytes:
    return x509.load_pem_x509_certificate(Path(pem_path).read_bytes()).public_bytes(Encoding.DER)


def test_find_a_mailbox_by_mail_and_its_encryption_certificate(server: ServerProcess) -> None:
    alice = server.identity("PER", 0)
    r = ldapsearch(server, "-b", BASE, f"(mail={alice['address']})", "userCertificate;binary", "mail",
                   "caduceeMailboxType", "caduceeOwner")
    assert r.returncode == 0, r.stderr
    (entry,) = entries(r.stdout)
    assert entry["dn"] == [f"mail={alice['address']},ou=mailboxes,{BASE}"]
    assert entry["caduceeMailboxType"] == ["PER"] and entry["caduceeOwner"] == [alice["national_id"]]
    assert entry["userCertificate;binary"] == [der(alice["enc_cert"])]
    assert der(alice["cert"]) not in entry["userCertificate;binary"]  # never the authentication certificate


def test_people_by_cn_prefix_and_organisation_mailboxes(server: ServerProcess) -> None:
    bob = server.identity("PER", 1)
    person_dn = f"uid={bob['national_id']},ou=people,{BASE}"
    r = ldapsearch(server, "-b", person_dn, "-s", "base", "(objectClass=inetOrgPerson)", "cn")
    assert r.returncode == 0, r.stderr
    cn = str(entries(r.stdout)[0]["cn"][0])
    r = ldapsearch(server, "-b", f"ou=people,{BASE}", "-s", "one", f"(cn={cn[:4].lower()}*)", "1.1")
    assert r.returncode == 0, r.stderr
    assert person_dn in [e["dn"][0] for e in entries(r.stdout)]
    org, app = server.identity("ORG", 0), server.identity("APP", 0)
    r = ldapsearch(server, "-b", BASE, "(caduceeMailboxType=ORG)", "mail")
    assert r.returncode == 0, r.stderr
    found = [e["mail"][0] for e in entries(r.stdout)]
    assert org["address"] in found and app["address"] not in found


def test_size_limit(server: ServerProcess) -> None:
    r = ldapsearch(server, "-b", BASE, "-z", "1", "(objectClass=*)", "1.1")
    assert r.returncode == 4, r.stderr
    assert "Size limit exceeded (4)" in r.stdout + r.stderr
    assert len(entries(r.stdout)) == 1


def test_root_dse(server: ServerProcess) -> None:
    r = ldapsearch(server, "-b", "", "-s", "base", "(objectClass=*)", "+")
    assert r.returncode == 0, r.stderr
    (dse,) = entries(r.stdout)
    assert dse["namingContexts"] == [BASE] and dse["supportedLDAPVersion"] == ["3"]
    assert "supportedControl" not in dse


def test_plain_ldap_is_not_served(server: ServerProcess) -> None:
    r = ldapsearch(server, "-b", BASE, "(objectClass=*)", scheme="ldap")
    assert r.returncode != 0 and "dn:" not in r.stdout


def test_password_bind_and_writes_are_refused(server: ServerProcess) -> None:
    alice = server.identity("PER", 0)
    r = ldapsearch(server, "-D", f"uid={alice['national_id']},ou=people,{BASE}", "-w", "secret", "-b", BASE,
                   "(mail=*)")
    assert r.returncode == 53 and "Server is unwilling to perform (53)" in r.stderr, r.stderr
    ldif = (f"dn: mail=intruder@caducee.localhost,ou=mailboxes,{BASE}\nobjectClass: inetOrgPerson\n"
            "cn: Intruder\nsn: Intruder\nmail: intruder@caducee.localhost\n")
    env = dict(os.environ, LDAPTLS_CACERT=server.ca_bundle)
    r = subprocess.run(["ldapadd", "-H", f"ldaps://127.0.0.1:{server.port('ldaps')}", "-x"], input=ldif,
                       capture_output=True, text=True, env=env, timeout=30, check=False)
    assert r.returncode == 53 and "Server is unwilling to perform (53)" in r.stderr, r.stderr
    assert ldapsearch(server, "-b", BASE, "(mail=intruder@caducee.localhost)").stdout.strip() == ""


class _Tls(ldap3.Tls):  # type: ignore[misc]
    def __init__(self, ca: str) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED, ca_certs_file=ca)
        self._context = client_context(Path(ca))

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        connection.socket = self._context.wrap_socket(connection.socket, server_side=False,
                                                      do_handshake_on_connect=do_handshake,
                                                      server_hostname="localhost")


@pytest.mark.parametrize("attribute", ["userCertificate;binary", "userCertificate"])
def test_ldap3_gets_the_certificate_under_either_name(server: ServerProcess, attribute: str) -> None:
    carol = server.identity("PER", 2)
    conn = ldap3.Connection(ldap3.Server("localhost", server.port("ldaps"), use_ssl=True, tls=_Tls(server.ca_bundle),
                                         get_info=ldap3.NONE, connect_timeout=10),
                            auto_bind=ldap3.AUTO_BIND_NO_TLS, receive_timeout=10, raise_exceptions=False)
    try:
        assert conn.search(BASE, f"(mail={carol['address']})", attributes=[attribute])
        (entry,) = conn.response
        assert entry["raw_attributes"]["userCertificate;binary"] == [der(carol["enc_cert"])]
    finally:
        conn.unbind()
