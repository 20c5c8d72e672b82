"""IMAP server tests: the real server on 127.0.0.1:0, driven by imaplib, raw sockets and curl.

The Twisted asyncio reactor runs in a background thread with its own event loop (installed once per
test session); the tests talk to it from the main thread as any client would.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import imaplib
import ipaddress
import logging
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer

from mailserver.audit_api import AuditEvent
from mailserver.imap_server import (
    FETCH_BATCH,
    BodySection,
    CommandBad,
    CommandNo,
    FetchItem,
    ImapLogin,
    SequenceSet,
    StoreAccount,
    body_structure,
    build_imap_factory,
    compress_uids,
    envelope,
    parse_fetch_items,
    parse_mime,
    parse_search,
    render,
    render_flags,
    section_bytes,
    split_message,
    tokenize,
)
from mailserver.store_api import FolderInfo, StoredMessage
from tests.mailserver.memstore import MemoryMailStore

ADDRESS = "dr.smith@example.org"
PRINCIPAL = "810012345678"
MAILBOX_ID = 1
TIMEOUT = 10

# Response codes and texts the server must use (RFC 3501, RFC 4315, RFC 5530, RFC 7889).
AUTH_FAILED = b"NO [AUTHENTICATIONFAILED] Authentication failed"
PRIVACY_REQUIRED = b"NO [PRIVACYREQUIRED]"
TOOBIG = b"NO [TOOBIG]"
SERVERBUG_RE = re.compile(rb"NO \[SERVERBUG\] Internal server error \(ref ([0-9A-F]{10})\)")

# -- messages -----------------------------------------------------------------------------------------------

MSG_LAB = (
    b"Received: from relay.example.org by mx.example.org; Mon, 6 Jan 2025 09:00:01 +0100\r\n"
    b"Received: from lab.example.org by relay.example.org; Mon, 6 Jan 2025 09:00:00 +0100\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org;\r\n"
    b"\tb=AbCdEf==\r\n"
    b"From: Dr A <a@example.org>\r\n"
    b"To: dr.smith@example.org\r\n"
    b"Subject: =?utf-8?q?R=C3=A9sultats_labo?= 7\r\n"
    b"Message-ID: <m1@example.org>\r\n"
    b"X-Odd-CASE: value\r\n"
    b"Date: Mon, 06 Jan 2025 09:00:00 +0100\r\n"
    b"\r\n"
    b"Hemoglobine 13.5 g/dL\r\n"
)
MSG_NO_FROM = (
    b"To: x@example.org\r\n"
    b"Subject: No sender\r\n"
    b"Message-ID: <m2@example.org>\r\n"
    b"\r\n"
    b"plain text\r\n"
)
MSG_MULTIPART = (
    b"From: Labo Central <labo@example.org>\r\n"
    b"To: dr.smith@example.org\r\n"
    b"Cc: secretariat@example.org\r\n"
    b"Subject: Compte rendu\r\n"
    b"Message-ID: <m3@example.org>\r\n"
    b"Date: Sat, 01 Mar 2025 12:00:00 +0000\r\n"
    b"X-Priority: urgent\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n'
    b"\r\n"
    b"preamble\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Cr=C3=A9atinine normale\r\n"
    b"--b1\r\n"
    b"Content-Type: application/pdf; name=\"cr.pdf\"\r\n"
    b"Content-Disposition: attachment; filename=\"cr.pdf\"\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"JVBERi0xLjQK\r\n"
    b"--b1--\r\n"
)
SEEDED = [
    (MSG_LAB, dt.datetime(2025, 1, 6, 8, 0, tzinfo=dt.timezone.utc)),
    (MSG_NO_FROM, dt.datetime(2025, 2, 10, 8, 0, tzinfo=dt.timezone.utc)),
    (MSG_MULTIPART, dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.timezone.utc)),
]


def new_message(subject: str, body: str = "hello") -> bytes:
    return (f"From: peer@example.org\r\nTo: {ADDRESS}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@example.org>\r\n\r\n{body}\r\n").encode()


# -- the reactor thread --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def reactor_loop() -> Iterator[tuple[Any, asyncio.AbstractEventLoop]]:
    """Twisted's asyncio reactor on its own loop, running in a daemon thread for the whole session."""
    from twisted.internet import asyncioreactor

    reactor: Any
    if "twisted.internet.reactor" in sys.modules:
        from twisted.internet import reactor

        if not isinstance(reactor, asyncioreactor.AsyncioSelectorReactor):
            pytest.fail("another test installed a non-asyncio Twisted reactor before the IMAP tests")
        loop = reactor._asyncioEventloop
    else:
        loop = asyncio.new_event_loop()
        asyncioreactor.install(loop)
        from twisted.internet import reactor
    if reactor.running:
        yield reactor, loop
        return

    def run() -> None:
        asyncio.set_event_loop(loop)
        reactor.run(installSignalHandlers=False)

    thread = threading.Thread(target=run, name="twisted-reactor", daemon=True)
    thread.start()
    started = threading.Event()
    reactor.callFromThread(started.set)
    assert started.wait(TIMEOUT)
    yield reactor, loop
    reactor.callFromThread(reactor.stop)
    thread.join(TIMEOUT)
    if not thread.is_alive():
        loop.close()


# -- a throwaway PKI ----------------------------------------------------------------------------------


@dataclass
class Pki:
    ca_path: Path
    server_cert: x509.Certificate
    server_key: ec.EllipticCurvePrivateKey
    client_cert_path: Path
    client_key_path: Path
    client_fingerprint: str
    stranger_cert_path: Path
    stranger_key_path: Path


def _name(cn: str, **extra: str) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if "serial" in extra:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, extra["serial"]))
    attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Clinic"))
    return x509.Name(attrs)


def _issue(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
           issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
           san: list[x509.GeneralName] | None = None, eku: list[x509.ObjectIdentifier] | None = None
           ) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                       critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False), critical=True)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pair(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("Test Health CA")
    ca = _issue(ca_name, ca_key, ca_name, ca_key, ca=True)
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(_name("localhost"), server_key, ca_name, ca_key,
                    san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                    eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue(_name("dr.smith", serial=PRINCIPAL), client_key, ca_name, ca_key,
                    eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    stranger = _issue(_name("someone.else", serial="899999999999"), stranger_key, ca_name, ca_key,
                      eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    client_cert_path, client_key_path = _write_pair(directory, "client", client, client_key)
    stranger_cert_path, stranger_key_path = _write_pair(directory, "stranger", stranger, stranger_key)
    return Pki(
        ca_path=ca_path,
        server_cert=server,
        server_key=server_key,
        client_cert_path=client_cert_path,
        client_key_path=client_key_path,
        client_fingerprint=hashlib.sha256(client.public_bytes(serialization.Encoding.DER)).hexdigest(),
        stranger_cert_path=stranger_cert_path,
        stranger_key_path=stranger_key_path,
    )


@implementer(IOpenSSLContextFactory)
class ServerTLS:
    """What the crypto package supplies in production: requests any client certificate, accepts it."""

    def __init__(self, pki: Pki) -> None:
        self._pki = pki
        self._context: SSL.Context | None = None

    def getContext(self) -> SSL.Context:
        if self._context is None:
            ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
            ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
            ctx.use_certificate(self._pki.server_cert)
            ctx.use_privatekey(self._pki.server_key)
            ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: True)
            ctx.set_session_id(b"caducee-imap-tests")
            self._context = ctx
        return self._context


def client_context(pki: Pki, identity: str | None = "client") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_path))
    if identity == "client":
        ctx.load_cert_chain(str(pki.client_cert_path), str(pki.client_key_path))
    elif identity == "stranger":
        ctx.load_cert_chain(str(pki.stranger_cert_path), str(pki.stranger_key_path))
    return ctx


# -- audit and the harness ---------------------------------------------------------------------------


class ListAudit:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def record(self, event: AuditEvent, *, actor: str, protocol: str | None = None, mailbox: str | None = None,
               message_id: str | None = None, detail: dict[str, str] | None = None) -> None:
        self.events.append({"event": event, "actor": actor, "protocol": protocol, "mailbox": mailbox,
                            "message_id": message_id, "detail": detail or {}})

    def of(self, event: AuditEvent) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e["event"] is event]


@dataclass
class Harness:
    reactor: Any
    loop: asyncio.AbstractEventLoop
    store: MemoryMailStore
    audit: ListAudit
    pki: Pki
    inbox: FolderInfo
    plain_port: int = 0
    tls_port: int = 0
    ports: list[Any] = field(default_factory=list)

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from twisted.internet.threads import blockingCallFromThread

        return blockingCallFromThread(self.reactor, fn, *args, **kwargs)

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    def deliver(self, raw: bytes, folder_id: int | None = None, flags: tuple[str, ...] = (),
                when: dt.datetime | None = None) -> int:
        uid: int = self.run(self.store.append(folder_id or self.inbox.id, raw, flags, when))
        return uid

    def messages(self, folder_id: int | None = None) -> list[StoredMessage]:
        found: list[StoredMessage] = self.call(self.store.messages, folder_id or self.inbox.id)
        return found

    def folder(self, name: str) -> FolderInfo | None:
        info: FolderInfo | None = self.call(self.store.get_folder, MAILBOX_ID, name)
        return info


def make_authenticator(pki: Pki) -> Any:
    login = ImapLogin(mailbox_id=MAILBOX_ID, address=ADDRESS, principal=PRINCIPAL)

    async def authenticate(cert_der: bytes | None, authzid: str) -> ImapLogin | None:
        if authzid == "boom":
            raise RuntimeError("directory unreachable password=hunter2")
        if cert_der is None or hashlib.sha256(cert_der).hexdigest() != pki.client_fingerprint:
            return None
        # curl sends its user name as the authorization identity: accept our own address.
        if authzid not in ("", ADDRESS):
            return None
        return login

    return authenticate


def start_harness(reactor_loop: tuple[Any, asyncio.AbstractEventLoop], pki: Pki,
                  max_append_size: int = 10 * 1024 * 1024) -> Harness:
    reactor, loop = reactor_loop
    store = MemoryMailStore()
    audit = ListAudit()
    h = Harness(reactor, loop, store, audit, pki, inbox=store.add_mailbox(MAILBOX_ID))
    for raw, when in SEEDED:
        h.deliver(raw, when=when)
    tls = ServerTLS(pki)
    authenticator = make_authenticator(pki)
    plain = build_imap_factory(store, authenticator, audit, tls, implicit_tls=False,
                               max_append_size=max_append_size, hostname="imap.test")
    implicit = build_imap_factory(store, authenticator, audit, tls, implicit_tls=True,
                                  max_append_size=max_append_size, hostname="imap.test")
    plain_port = h.call(reactor.listenTCP, 0, plain, interface="127.0.0.1")
    tls_port = h.call(reactor.listenSSL, 0, implicit, tls, interface="127.0.0.1")
    h.ports = [plain_port, tls_port]
    h.plain_port = plain_port.getHost().port
    h.tls_port = tls_port.getHost().port
    return h


@pytest.fixture
def server(reactor_loop: tuple[Any, asyncio.AbstractEventLoop], pki: Pki) -> Iterator[Harness]:
    h = start_harness(reactor_loop, pki)
    yield h
    for port in h.ports:
        h.call(port.stopListening)


# -- clients -------------------------------------------------------------------------------------------


@contextmanager
def imaps(h: Harness, identity: str | None = "client", authenticate: bool = True) -> Iterator[imaplib.IMAP4_SSL]:
    client = imaplib.IMAP4_SSL("127.0.0.1", h.tls_port, ssl_context=client_context(h.pki, identity),
                               timeout=TIMEOUT)
    try:
        if authenticate:
            typ, _ = client.authenticate("EXTERNAL", lambda _challenge: b"")
            assert typ == "OK"
        yield client
    finally:
        try:
            client.logout()
        except Exception:
            client.shutdown()


class RawClient:
    """Line-level client for what imaplib cannot send (pipelining, SASL-IR, bad literals, IDLE)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self, timeout: float = TIMEOUT) -> bytes:
        self.sock.settimeout(timeout)
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by server")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def until_tagged(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def command(self, tag: bytes, text: bytes) -> list[bytes]:
        self.send(tag + b" " + text + b"\r\n")
        return self.until_tagged(tag)

    def read_to_eof(self, timeout: float = TIMEOUT) -> bytes:
        self.sock.settimeout(timeout)
        data = self.buffer
        self.buffer = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                return data
            if not chunk:
                return data
            data += chunk

    def starttls(self, ctx: ssl.SSLContext) -> None:
        self.sock = ctx.wrap_socket(self.sock, server_hostname="127.0.0.1")


@contextmanager
def raw_plain(h: Harness) -> Iterator[RawClient]:
    with socket.create_connection(("127.0.0.1", h.plain_port), timeout=TIMEOUT) as sock:
        client = RawClient(sock)
        assert client.line().startswith(b"* OK [CAPABILITY")
        try:
            yield client
        finally:
            client.sock.close()


@contextmanager
def raw_tls(h: Harness, identity: str | None = "client", authenticate: bool = True) -> Iterator[RawClient]:
    ctx = client_context(h.pki, identity)
    with socket.create_connection(("127.0.0.1", h.tls_port), timeout=TIMEOUT) as plain:
        with ctx.wrap_socket(plain, server_hostname="127.0.0.1") as sock:
            client = RawClient(sock)
            assert client.line().startswith(b"* OK [CAPABILITY")
            if authenticate:
                assert client.command(b"A0", b"AUTHENTICATE EXTERNAL =")[-1].startswith(b"A0 OK")
            yield client


def capabilities(client: imaplib.IMAP4) -> set[str]:
    typ, data = client.capability()
    assert typ == "OK"
    return set(data[0].decode().upper().split())


def fetch_parts(data: list[Any]) -> dict[bytes, bytes]:
    """imaplib FETCH results as {label-prefix: literal}."""
    out: dict[bytes, bytes] = {}
    for item in data:
        if isinstance(item, tuple):
            out[item[0]] = item[1]
    return out


# ---------------------------------------------------------------------------------------------------------
# Greeting, capabilities, authentication
# ---------------------------------------------------------------------------------------------------------


def test_capabilities_before_and_after_starttls(server: Harness) -> None:
    client = imaplib.IMAP4("127.0.0.1", server.plain_port, timeout=TIMEOUT)
    try:
        before = capabilities(client)
        assert {"IMAP4REV1", "STARTTLS", "LOGINDISABLED"} <= before
        assert not any(c.startswith("AUTH=") for c in before)
        assert "SASL-IR" not in before
        typ, _ = client.starttls(client_context(server.pki))
        assert typ == "OK"
        after = capabilities(client)
        assert {"AUTH=EXTERNAL", "SASL-IR", "LOGINDISABLED", "UIDPLUS", "MOVE", "IDLE", "ID", "ENABLE",
                "UNSELECT", "NAMESPACE", "CHILDREN", "APPENDLIMIT=10485760"} <= after
        assert "STARTTLS" not in after
        assert [c for c in after if c.startswith("AUTH=")] == ["AUTH=EXTERNAL"]
        status, _ = client.authenticate("EXTERNAL", lambda _challenge: b"")
        assert status == "OK"
        authed = capabilities(client)
        assert "AUTH=EXTERNAL" not in authed and "LOGINDISABLED" not in authed and "MOVE" in authed
    finally:
        client.logout()


def test_implicit_tls_greeting_advertises_only_external(server: Harness) -> None:
    with imaps(server, authenticate=False) as client:
        caps = capabilities(client)
        assert {"AUTH=EXTERNAL", "SASL-IR", "LOGINDISABLED"} <= caps
        assert "STARTTLS" not in caps and "AUTH=PLAIN" not in caps and "AUTH=LOGIN" not in caps
        assert client.welcome.startswith(b"* OK [CAPABILITY IMAP4rev1 ")


def test_login_is_refused_with_and_without_tls(server: Harness) -> None:
    with raw_plain(server) as raw:
        reply = raw.command(b"L1", b'LOGIN dr.smith "secret"')[-1]
        assert reply.startswith(b"L1 " + PRIVACY_REQUIRED)
    with imaps(server, authenticate=False) as client:
        with pytest.raises(imaplib.IMAP4.error, match=r"CANNOT"):
            client.login("dr.smith", "secret")
        assert client.state == "NONAUTH"
    failures = server.audit.of(AuditEvent.LOGIN_FAILED)
    assert [f["detail"]["mechanism"] for f in failures] == ["LOGIN", "LOGIN"]
    assert not server.audit.of(AuditEvent.LOGIN)


def test_authenticate_refused_before_starttls(server: Harness) -> None:
    with raw_plain(server) as raw:
        assert raw.command(b"A1", b"AUTHENTICATE EXTERNAL =")[-1].startswith(b"A1 " + PRIVACY_REQUIRED)
        assert raw.command(b"A2", b"AUTHENTICATE PLAIN")[-1].startswith(b"A2 " + PRIVACY_REQUIRED)
        assert raw.command(b"A3", b"SELECT INBOX")[-1].startswith(b"A3 BAD")
    assert not server.audit.of(AuditEvent.LOGIN)


def test_authenticate_external_continuation_form(server: Harness) -> None:
    with imaps(server) as client:
        assert client.state == "AUTH"
        typ, data = client.select("INBOX")
        assert (typ, data) == ("OK", [b"3"])
    logins = server.audit.of(AuditEvent.LOGIN)
    assert len(logins) == 1
    assert logins[0]["actor"] == PRINCIPAL and logins[0]["protocol"] == "imap" and logins[0]["mailbox"] == ADDRESS


def test_authenticate_external_sasl_ir(server: Harness) -> None:
    with raw_tls(server, authenticate=False) as raw:
        reply = raw.command(b"A1", b"AUTHENTICATE EXTERNAL =")[-1]
        assert reply.startswith(b"A1 OK [CAPABILITY IMAP4rev1 ")
        assert raw.command(b"A2", b"SELECT INBOX")[-1] == b"A2 OK [READ-WRITE] SELECT completed"
    with raw_tls(server, authenticate=False) as raw:
        authzid = base64.b64encode(ADDRESS.encode())
        assert raw.command(b"B1", b"AUTHENTICATE EXTERNAL " + authzid)[-1].startswith(b"B1 OK")
    with raw_tls(server, authenticate=False) as raw:
        other = base64.b64encode(b"someone.else@example.org")
        assert raw.command(b"C1", b"AUTHENTICATE EXTERNAL " + other)[-1] == b"C1 " + AUTH_FAILED
        assert raw.command(b"C2", b"AUTHENTICATE EXTERNAL !!notbase64")[-1].startswith(b"C2 BAD")
    with raw_tls(server, authenticate=False) as raw:
        raw.send(b"D1 AUTHENTICATE EXTERNAL\r\n")
        assert raw.line() == b"+ "
        raw.send(b"*\r\n")
        assert raw.line().startswith(b"D1 BAD")
    assert len(server.audit.of(AuditEvent.LOGIN)) == 2


def test_authenticate_without_certificate_fails(server: Harness) -> None:
    with raw_tls(server, identity=None, authenticate=False) as raw:
        assert raw.command(b"A1", b"AUTHENTICATE EXTERNAL =")[-1] == b"A1 " + AUTH_FAILED
        assert raw.command(b"A2", b"SELECT INBOX")[-1].startswith(b"A2 BAD")
    with imaps(server, identity="stranger", authenticate=False) as client:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.authenticate("EXTERNAL", lambda _challenge: b"")
    failures = server.audit.of(AuditEvent.LOGIN_FAILED)
    assert [f["detail"]["reason"] for f in failures] == ["no_certificate", "rejected"]
    assert all(f["actor"] == "unknown" and f["protocol"] == "imap" for f in failures)
    assert "cert_sha256" in failures[1]["detail"]


def test_repeated_authentication_failures_disconnect(server: Harness) -> None:
    with raw_tls(server, identity=None, authenticate=False) as raw:
        for n in range(2):
            assert raw.command(b"F%d" % n, b"AUTHENTICATE EXTERNAL =")[-1] == b"F%d " % n + AUTH_FAILED
        raw.send(b"F9 AUTHENTICATE EXTERNAL =\r\n")
        rest = raw.read_to_eof()
        assert b"F9 " + AUTH_FAILED in rest and b"* BYE" in rest


def test_authenticator_error_is_generic(server: Harness, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="mailserver.imap_server"):
        with raw_tls(server, authenticate=False) as raw:
            reply = raw.command(b"A1", b"AUTHENTICATE EXTERNAL " + base64.b64encode(b"boom"))[-1]
    assert reply.startswith(b"A1 NO [UNAVAILABLE] Authentication temporarily unavailable (ref ")
    assert b"hunter2" not in reply
    ref = reply.rsplit(b"ref ", 1)[1].rstrip(b")").decode()
    assert any(ref in r.getMessage() and r.exc_info for r in caplog.records)


# ---------------------------------------------------------------------------------------------------------
# STARTTLS injection (security.md row 8)
# ---------------------------------------------------------------------------------------------------------


def test_starttls_command_injection_regression(server: Harness) -> None:
    with raw_plain(server) as raw:
        raw.send(b"a1 STARTTLS\r\na2 NOOP\r\n")
        assert raw.line() == b"a1 OK Begin TLS negotiation now"
        assert raw.buffer == b""
        raw.starttls(client_context(server.pki))
        raw.sock.settimeout(1.0)
        with pytest.raises(socket.timeout):
            raw.sock.recv(65536)  # nothing may arrive for the injected a2
        lines = raw.command(b"a3", b"NOOP")
        assert lines == [b"a3 OK NOOP completed"]
    assert not any(b"a2" in line for line in lines)


def test_starttls_injection_of_authenticate_is_discarded(server: Harness) -> None:
    with raw_plain(server) as raw:
        raw.send(b"a1 STARTTLS\r\na2 AUTHENTICATE EXTERNAL =\r\n")
        assert raw.line() == b"a1 OK Begin TLS negotiation now"
        raw.starttls(client_context(server.pki))
        assert raw.command(b"a3", b"SELECT INBOX")[-1].startswith(b"a3 BAD")
    assert not server.audit.of(AuditEvent.LOGIN)


# ---------------------------------------------------------------------------------------------------------
# SEARCH (Twisted crashed on header keys)
# ---------------------------------------------------------------------------------------------------------


def test_search_keys(server: Harness) -> None:
    with imaps(server) as client:
        client.select("INBOX")

        def search(*criteria: str) -> list[int]:
            typ, data = client.search(None, *criteria)
            assert typ == "OK"
            return [int(n) for n in data[0].split()]

        def uid_search(*criteria: str) -> list[int]:
            typ, data = client.uid("SEARCH", *criteria)
            assert typ == "OK"
            return [int(n) for n in data[0].split()]

        assert search("ALL") == [1, 2, 3]
        assert search("SUBJECT", "LABO") == [1]  # RFC 2047 decoded, case-insensitive
        assert search("SUBJECT", '"compte rendu"') == [3]
        assert search("FROM", "labo@example.org") == [3]
        assert search("FROM", '"Dr A"') == [1]
        assert search("TO", "x@example.org") == [2]
        assert search("CC", "secretariat") == [3]
        assert search("HEADER", "X-Priority", "urgent") == [3]
        assert search("HEADER", "X-Odd-Case", '""') == [1]
        assert search("SINCE", "1-Feb-2025") == [2, 3]
        assert search("BEFORE", "1-Feb-2025") == [1]
        assert search("ON", "10-Feb-2025") == [2]
        assert search("SENTSINCE", "1-Mar-2025") == [3]
        assert search("SENTBEFORE", "7-Jan-2025") == [1]
        assert search("BODY", "creatinine") == []  # the text is "Créatinine" (QP, UTF-8)
        assert search("BODY", "hemoglobine") == [1]
        assert search("TEXT", "secretariat") == [3]
        assert search("LARGER", "400") == [1, 3]
        assert search("SMALLER", "200") == [2]
        assert search("UID", "2:3") == [2, 3]
        assert search("2:*") == [2, 3]
        assert search("OR", "FROM", "labo", "SUBJECT", "sender") == [2, 3]
        assert search("NOT", "FROM", "labo") == [1, 2]
        assert search("(OR", "SEEN", "UNSEEN)", "NOT", "UID", "1") == [2, 3]
        assert search("UNSEEN") == [1, 2, 3] and search("SEEN") == [] and search("FLAGGED") == []
        assert search("NEW") == [] and search("OLD") == [1, 2, 3] and search("RECENT") == []
        assert uid_search("SUBJECT", "labo") == [1]
        typ, _ = client.store("2", "+FLAGS", r"(\Flagged \Answered $Urgent)")
        assert search("FLAGGED", "ANSWERED") == [2] and search("KEYWORD", "$Urgent") == [2]
        assert search("UNKEYWORD", "$Urgent", "UNFLAGGED") == [1, 3]


def test_search_utf8_literal_and_charset(server: Harness) -> None:
    with raw_tls(server) as raw:
        raw.command(b"S0", b"SELECT INBOX")
        word = "créatinine".encode("utf-8")
        raw.send(b"S1 SEARCH CHARSET UTF-8 BODY {%d}\r\n" % len(word))
        assert raw.line().startswith(b"+ ")
        raw.send(word + b"\r\n")
        assert raw.until_tagged(b"S1") == [b"* SEARCH 3", b"S1 OK SEARCH completed"]
        subject = "Résultats".encode("utf-8")
        raw.send(b"S2 SEARCH CHARSET UTF-8 SUBJECT {%d}\r\n" % len(subject))
        raw.line()
        raw.send(subject + b"\r\n")
        assert raw.until_tagged(b"S2") == [b"* SEARCH 1", b"S2 OK SEARCH completed"]
        assert raw.command(b"S3", b"SEARCH CHARSET X-UNKNOWN ALL")[-1].startswith(b"S3 NO [BADCHARSET")
        assert raw.command(b"S4", b"SEARCH FOO")[-1].startswith(b"S4 BAD")
        assert raw.command(b"S5", b"SEARCH SINCE 31-Feb-2025")[-1].startswith(b"S5 BAD")


# ---------------------------------------------------------------------------------------------------------
# APPEND
# ---------------------------------------------------------------------------------------------------------


def test_append_without_flags_answers_appenduid(server: Harness) -> None:
    raw_message = new_message("appended without flags")
    with imaps(server) as client:
        typ, data = client.append("INBOX", None, None, raw_message)
        assert typ == "OK"
        assert data[0] == b"[APPENDUID %d 4] APPEND completed" % server.inbox.uidvalidity
        typ, data = client.append("INBOX", r"(\Seen \Flagged)", '"01-Feb-2025 10:00:00 +0100"',
                                  new_message("with flags and date"))
        assert typ == "OK" and data[0].startswith(b"[APPENDUID %d 5]" % server.inbox.uidvalidity)
        typ, data = client.append("Nowhere", None, None, raw_message)
        assert typ == "NO" and data[0].startswith(b"[TRYCREATE]")
    stored = {m.uid: m for m in server.messages()}
    assert stored[4].flags == frozenset()
    assert stored[5].flags == frozenset({"\\Seen", "\\Flagged"})
    assert stored[5].internaldate == dt.datetime(2025, 2, 1, 9, 0, tzinfo=dt.timezone.utc)
    assert server.call(server.store.read_blob, stored[4].blob) == raw_message
    appends = server.audit.of(AuditEvent.APPEND)
    assert [a["message_id"] for a in appends] == ["<appended.without.flags@example.org>",
                                                  "<with.flags.and.date@example.org>"]


def test_append_to_selected_folder_reports_exists(server: Harness) -> None:
    with raw_tls(server) as raw:
        raw.command(b"P0", b"SELECT INBOX")
        body = new_message("seen by selected session")
        raw.send(b"P1 APPEND INBOX {%d}\r\n" % len(body))
        assert raw.line().startswith(b"+ ")
        raw.send(body + b"\r\n")
        lines = raw.until_tagged(b"P1")
        assert lines[0] == b"* 4 EXISTS"
        assert lines[-1].startswith(b"P1 OK [APPENDUID ")
        assert raw.command(b"P2", b"UID FETCH 4 (UID)")[0] == b"* 4 FETCH (UID 4)"


def test_append_over_the_cap_is_refused_before_the_literal(server: Harness) -> None:
    with raw_tls(server) as raw:
        raw.send(b"T1 APPEND INBOX {10485761}\r\n")
        reply = raw.line()
        assert reply.startswith(b"T1 " + TOOBIG)  # no "+" continuation was sent
        assert raw.command(b"T2", b"NOOP") == [b"T2 OK NOOP completed"]
        raw.send(b"T3 APPEND INBOX (\\Seen) {0}\r\n")
        assert raw.line().startswith(b"T3 NO")
    assert len(server.messages()) == 3


def test_small_cap_with_imaplib(reactor_loop: tuple[Any, asyncio.AbstractEventLoop], pki: Pki) -> None:
    h = start_harness(reactor_loop, pki, max_append_size=1000)
    try:
        with imaps(h) as client:
            assert "APPENDLIMIT=1000" in capabilities(client)
            typ, data = client.append("INBOX", None, None, b"X-Pad: " + b"a" * 2000 + b"\r\n\r\nbody\r\n")
            assert typ == "NO" and data[0].startswith(b"[TOOBIG]")
            typ, _ = client.append("INBOX", None, None, new_message("small"))
            assert typ == "OK"
    finally:
        for port in h.ports:
            h.call(port.stopListening)


def test_nonsynchronizing_literal_closes_the_connection(server: Harness) -> None:
    injected = b"From: x@example.org\r\n\r\nhi\r\n"
    with raw_tls(server) as raw:
        raw.send(b"N1 APPEND INBOX {%d+}\r\n" % len(injected) + injected + b"N2 NOOP\r\n")
        rest = raw.read_to_eof()
    assert rest.startswith(b"N1 BAD")
    assert b"* BYE" in rest and b"N2" not in rest
    assert len(server.messages()) == 3


def test_malformed_literals_get_bad(server: Harness) -> None:
    with raw_tls(server) as raw:
        raw.command(b"M0", b"SELECT INBOX")
        for n, literal in enumerate((b"{-1}", b"{}", b"{abc}", b"{99999999999}")):
            tag = b"M%d" % (n + 1)
            raw.send(tag + b" SEARCH SUBJECT " + literal + b"\r\n")
            assert raw.line().startswith(tag + b" BAD")
        raw.send(b"M8 SEARCH SUBJECT {70000}\r\n")
        assert raw.line().startswith(b"M8 BAD")
        assert raw.command(b"M9", b"NOOP") == [b"M9 OK NOOP completed"]


# ---------------------------------------------------------------------------------------------------------
# FETCH
# ---------------------------------------------------------------------------------------------------------


def test_envelope_without_from_is_nil(server: Harness) -> None:
    with imaps(server) as client:
        client.select("INBOX")
        typ, data = client.fetch("2", "(ENVELOPE)")
        assert typ == "OK"
        assert data[0] == (b'2 (ENVELOPE (NIL "No sender" NIL NIL NIL ((NIL NIL "x" "example.org")) '
                           b'NIL NIL NIL "<m2@example.org>"))')
        typ, data = client.fetch("1", "(ENVELOPE)")
        assert data[0] == (
            b'1 (ENVELOPE ("Mon, 06 Jan 2025 09:00:00 +0100" "=?utf-8?q?R=C3=A9sultats_labo?= 7" '
            b'(("Dr A" NIL "a" "example.org")) (("Dr A" NIL "a" "example.org")) '
            b'(("Dr A" NIL "a" "example.org")) ((NIL NIL "dr.smith" "example.org")) NIL NIL NIL '
            b'"<m1@example.org>"))'
        )


def test_body_is_byte_exact(server: Harness) -> None:
    header, body = MSG_LAB.split(b"\r\n\r\n", 1)
    with imaps(server) as client:
        client.select("INBOX")
        typ, data = client.fetch("1", "(BODY.PEEK[])")
        assert fetch_parts(data)[b"1 (BODY[] {%d}" % len(MSG_LAB)] == MSG_LAB
        typ, data = client.fetch("1", "(BODY.PEEK[HEADER])")
        assert list(fetch_parts(data).values()) == [header + b"\r\n\r\n"]
        typ, data = client.fetch("1", "(BODY.PEEK[TEXT])")
        assert list(fetch_parts(data).values()) == [body]
        typ, data = client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (RECEIVED X-ODD-CASE)])")
        got = list(fetch_parts(data).items())[0]
        assert got[0].startswith(b"1 (BODY[HEADER.FIELDS (RECEIVED X-ODD-CASE)]")
        assert got[1] == (b"Received: from relay.example.org by mx.example.org; Mon, 6 Jan 2025 09:00:01 +0100\r\n"
                          b"Received: from lab.example.org by relay.example.org; Mon, 6 Jan 2025 09:00:00 +0100\r\n"
                          b"X-Odd-CASE: value\r\n\r\n")
        typ, data = client.fetch("1", "(BODY.PEEK[HEADER.FIELDS.NOT (RECEIVED)])")
        assert list(fetch_parts(data).values())[0].startswith(b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org;\r\n\tb=")
        typ, data = client.fetch("1", "(BODY.PEEK[]<0.8> RFC822.SIZE UID)")
        assert fetch_parts(data) == {b"1 (BODY[]<0> {8}": MSG_LAB[:8]}
        assert data[1] == b" RFC822.SIZE %d UID 1)" % len(MSG_LAB)
        typ, data = client.fetch("1", "(BODY.PEEK[]<%d.100>)" % (len(MSG_LAB) - 4))
        assert list(fetch_parts(data).values()) == [MSG_LAB[-4:]]
        typ, data = client.fetch("1", "(RFC822.HEADER)")
        assert list(fetch_parts(data).values()) == [header + b"\r\n\r\n"]
        typ, data = client.fetch("1", "(FLAGS)")
        assert data == [b"1 (FLAGS ())"]  # nothing above set \Seen


def test_multipart_sections_and_bodystructure(server: Harness) -> None:
    with imaps(server) as client:
        client.select("INBOX")
        typ, data = client.fetch("3", "(BODY.PEEK[1] BODY.PEEK[2.MIME] BODY.PEEK[3])")
        parts = list(fetch_parts(data).values())
        assert parts[0] == b"Cr=C3=A9atinine normale"
        assert parts[1] == (b'Content-Type: application/pdf; name="cr.pdf"\r\n'
                            b'Content-Disposition: attachment; filename="cr.pdf"\r\n'
                            b"Content-Transfer-Encoding: base64\r\n\r\n")
        assert b"BODY[3] NIL" in b"".join(x if isinstance(x, bytes) else x[0] for x in data if x is not None)
        typ, data = client.fetch("3", "(BODYSTRUCTURE)")
        assert data[0] == (
            b'3 (BODYSTRUCTURE (("text" "plain" ("charset" "utf-8") NIL NIL "QUOTED-PRINTABLE" 23 1 NIL NIL NIL NIL)'
            b'("application" "pdf" ("name" "cr.pdf") NIL NIL "BASE64" 12 NIL ("attachment" ("filename" "cr.pdf")) '
            b'NIL NIL) "mixed" ("boundary" "b1") NIL NIL NIL))'
        )
        typ, data = client.fetch("1", "(BODY)")
        assert data[0] == b'1 (BODY ("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 23 1))'


def test_fetch_body_sets_seen_and_audits_read(server: Harness) -> None:
    with imaps(server) as client:
        client.select("INBOX")
        typ, data = client.fetch("1:2", "(BODY.PEEK[TEXT])")
        assert not server.audit.of(AuditEvent.READ)
        typ, data = client.fetch("1", "(BODY[])")
        assert typ == "OK"
        assert data[1] == b" FLAGS (\\Seen))"
        typ, data = client.fetch("1", "(FLAGS)")
        assert data == [b"1 (FLAGS (\\Seen))"]
        client.select("INBOX", readonly=True)
        client.fetch("2", "(RFC822)")
        typ, data = client.fetch("2", "(FLAGS)")
        assert data == [b"2 (FLAGS ())"]  # EXAMINE never sets \Seen
    reads = server.audit.of(AuditEvent.READ)
    assert [r["message_id"] for r in reads] == ["<m1@example.org>", "<m2@example.org>"]
    assert all(r["actor"] == PRINCIPAL and r["mailbox"] == ADDRESS for r in reads)


def test_fetch_macros_and_invalid_sets(server: Harness) -> None:
    with raw_tls(server) as raw:
        raw.command(b"F0", b"SELECT INBOX")
        lines = raw.command(b"F1", b"FETCH 2 FAST")
        assert lines[0] == b'* 2 FETCH (FLAGS () INTERNALDATE "10-Feb-2025 08:00:00 +0000" RFC822.SIZE %d)' % len(MSG_NO_FROM)
        assert raw.command(b"F2", b"FETCH 9 FLAGS")[-1].startswith(b"F2 BAD")
        assert raw.command(b"F3", b"FETCH 1 (BOGUS)")[-1].startswith(b"F3 BAD")
        assert raw.command(b"F4", b"UID FETCH 2:* (FLAGS)")[:2] == [b"* 2 FETCH (UID 2 FLAGS ())",
                                                                   b"* 3 FETCH (UID 3 FLAGS ())"]
        assert raw.command(b"F5", b"UID FETCH 99 (FLAGS)") == [b"F5 OK FETCH completed"]


# ---------------------------------------------------------------------------------------------------------
# STORE, EXPUNGE, COPY, MOVE
# ---------------------------------------------------------------------------------------------------------


def test_store_expunge_and_uid_expunge(server: Harness) -> None:
    with imaps(server) as client:
        client.select("INBOX")
        typ, data = client.store("1:3", "+FLAGS", r"(\Deleted)")
        assert typ == "OK" and data == [b"1 (FLAGS (\\Deleted))", b"2 (FLAGS (\\Deleted))", b"3 (FLAGS (\\Deleted))"]
        typ, data = client.uid("STORE", "1", "-FLAGS.SILENT", r"(\Deleted)")
        assert typ == "OK" and data == [None]
        typ, _ = client.uid("EXPUNGE", "3")
        assert typ == "OK" and client.response("EXPUNGE") == ("EXPUNGE", [b"3"])
        assert [m.uid for m in server.messages()] == [1, 2]
        typ, data = client.expunge()
        assert typ == "OK" and data == [b"2"]
        assert [m.uid for m in server.messages()] == [1]
        typ, data = client.store("1", "FLAGS", r"(\Seen)")
        assert data == [b"1 (FLAGS (\\Seen))"]
        with pytest.raises(imaplib.IMAP4.error, match="Recent"):
            client.store("1", "+FLAGS", r"(\Recent)")
    deletes = server.audit.of(AuditEvent.DELETE)
    assert [d["message_id"] for d in deletes] == ["<m3@example.org>", "<m2@example.org>"]
    assert [r["message_id"] for r in server.audit.of(AuditEvent.READ)] == ["<m1@example.org>"]


def test_store_refused_in_examine(server: Harness) -> None:
    with raw_tls(server) as raw:
        assert raw.command(b"E1", b"EXAMINE INBOX")[-1] == b"E1 OK [READ-ONLY] EXAMINE completed"
        assert raw.command(b"E2", b"STORE 1 +FLAGS (\\Seen)")[-1].startswith(b"E2 NO")
        assert raw.command(b"E3", b"EXPUNGE")[-1].startswith(b"E3 NO")
        assert raw.command(b"E4", b"MOVE 1 INBOX")[-1].startswith(b"E4 NO")
    assert all(m.flags == frozenset() for m in server.messages())


def test_copy_answers_copyuid(server: Harness) -> None:
    with imaps(server) as client:
        assert client.create("Archive")[0] == "OK"
        archive = server.folder("Archive")
        assert archive is not None
        client.select("INBOX")
        typ, data = client.copy("1,3", "Archive")
        assert typ == "OK"
        assert data[0] == b"[COPYUID %d 1,3 1:2] COPY completed" % archive.uidvalidity
        typ, _ = client.uid("COPY", "2", "Archive")
        assert typ == "OK"
        typ, data = client.copy("1", "Missing")
        assert typ == "NO" and data[0].startswith(b"[TRYCREATE]")
    assert len(server.messages(archive.id)) == 3 and len(server.messages()) == 3


def test_move_and_uid_move(server: Harness) -> None:
    with raw_tls(server) as raw:
        assert raw.command(b"V0", b"CREATE Archive")[-1] == b"V0 OK CREATE completed"
        archive = server.folder("Archive")
        assert archive is not None
        raw.command(b"V1", b"SELECT INBOX")
        lines = raw.command(b"V2", b"MOVE 2 Archive")
        assert lines == [b"* OK [COPYUID %d 2 1] Moved" % archive.uidvalidity, b"* 2 EXPUNGE",
                         b"V2 OK MOVE completed"]
        lines = raw.command(b"V3", b"UID MOVE 1,3 Archive")
        assert lines == [b"* OK [COPYUID %d 1,3 2:3] Moved" % archive.uidvalidity, b"* 2 EXPUNGE",
                         b"* 1 EXPUNGE", b"V3 OK MOVE completed"]
        assert raw.command(b"V4", b"SEARCH ALL") == [b"* SEARCH", b"V4 OK SEARCH completed"]
    assert server.messages() == [] and len(server.messages(archive.id)) == 3


def test_pipelined_commands_run_in_order(server: Harness) -> None:
    with raw_tls(server) as raw:
        raw.command(b"Q0", b"SELECT INBOX")
        raw.send(b"Q1 STORE 1 +FLAGS.SILENT (\\Flagged)\r\nQ2 FETCH 1 (FLAGS)\r\nQ3 NOOP\r\n")
        lines = raw.until_tagged(b"Q3")
    assert lines == [b"Q1 OK STORE completed", b"* 1 FETCH (FLAGS (\\Flagged))", b"Q2 OK FETCH completed",
                     b"Q3 OK NOOP completed"]


# ---------------------------------------------------------------------------------------------------------
# Folders, IDLE, ID, ENABLE, errors
# ---------------------------------------------------------------------------------------------------------


def test_folder_management(server: Harness) -> None:
    with imaps(server) as client:
        assert client.create("Projets/2025/Janvier")[0] == "OK"
        assert client.create("Projets")[0] == "NO"
        assert client.create("R&AOk-unions")[0] == "OK"  # "Réunions" in modified UTF-7 (RFC 3501 §5.1.3)
        assert server.folder("Réunions") is not None
        typ, data = client.list('""', "*")
        names = [line.decode() for line in data if isinstance(line, bytes)]
        assert '(\\HasNoChildren) "/" INBOX' in names
        assert '(\\HasChildren) "/" Projets' in names
        assert '(\\HasNoChildren) "/" Projets/2025/Janvier' in names
        typ, data = client.list('""', "%")
        assert data and all(isinstance(line, bytes) and b"/" not in line.split(b'"/" ')[1] for line in data)
        typ, data = client.list('""', '""')
        assert data == [b'(\\Noselect) "/" ""']
        typ, data = client.lsub('""', "Projets/*")
        assert len(data) == 2
        typ, data = client.status("INBOX", "(MESSAGES UNSEEN UIDNEXT UIDVALIDITY RECENT)")
        assert data == [b"INBOX (MESSAGES 3 UNSEEN 3 UIDNEXT 4 UIDVALIDITY %d RECENT 0)" % server.inbox.uidvalidity]
        assert client.rename("Projets", "Archives/Projets")[0] == "OK"
        assert server.folder("Archives/Projets/2025/Janvier") is not None
        assert server.folder("Projets/2025") is None
        assert client.delete("Archives/Projets")[0] == "NO"  # has children
        assert client.delete("Archives/Projets/2025/Janvier")[0] == "OK"
        assert client.delete("INBOX")[0] == "NO"
        assert client.subscribe("Archives")[0] == "OK"
        assert client.unsubscribe("Archives")[0] == "NO"
        assert client.unsubscribe("Never/Existed")[0] == "OK"
        typ, data = client.namespace()
        assert data == [b'(("" "/")) NIL NIL']
        with pytest.raises(imaplib.IMAP4.error, match="BAD"):
            client.create("Bad*Name")  # "*" is not an atom character: a syntax error
        assert client.create('"Bad*Name"')[0] == "NO"  # quoted, but wildcards are refused in names
        typ, data = client.list('""', "*")
        assert b'(\\HasNoChildren) "/" R&AOk-unions' in data


def test_idle_receives_exists_when_the_store_adds_a_message(server: Harness) -> None:
    with raw_tls(server) as raw:
        raw.command(b"I0", b"SELECT INBOX")
        raw.send(b"I1 IDLE\r\n")
        assert raw.line() == b"+ idling"
        server.deliver(new_message("arrives during idle"))
        assert raw.line(timeout=5) == b"* 4 EXISTS"
        assert raw.line(timeout=5) == b"* 1 RECENT"
        raw.send(b"DONE\r\n")
        assert raw.until_tagged(b"I1") == [b"I1 OK IDLE terminated"]
        assert raw.command(b"I2", b"SEARCH NEW") == [b"* SEARCH 4", b"I2 OK SEARCH completed"]
        raw.send(b"I3 IDLE\r\n")
        raw.line()
        raw.send(b"NOT-DONE\r\n")
        assert raw.line().startswith(b"I3 BAD")
    assert server.call(server.store.listener_count, server.inbox.id) == 0


def test_other_session_expunge_is_reported_at_noop(server: Harness) -> None:
    with raw_tls(server) as watcher, imaps(server) as actor:
        watcher.command(b"W0", b"SELECT INBOX")
        actor.select("INBOX")
        actor.store("2", "+FLAGS", r"(\Deleted)")
        actor.expunge()
        assert watcher.command(b"W1", b"FETCH 2 (UID)") == [b"W1 OK FETCH completed"]  # no EXPUNGE here
        assert watcher.command(b"W2", b"NOOP") == [b"* 2 EXPUNGE", b"W2 OK NOOP completed"]
        assert watcher.command(b"W3", b"FETCH 2 (UID)")[0] == b"* 2 FETCH (UID 3)"


def test_noop_reports_other_sessions_expunge_and_arrivals_together(server: Harness) -> None:
    with raw_tls(server) as watcher, imaps(server) as actor:
        watcher.command(b"W0", b"SELECT INBOX")
        assert watcher.command(b"W1", b"NOOP") == [b"W1 OK NOOP completed"]  # nothing changed: nothing said
        actor.select("INBOX")
        actor.store("2", "+FLAGS", r"(\Deleted)")
        actor.expunge()
        server.deliver(new_message("after the expunge"))
        assert watcher.command(b"W2", b"NOOP") == [b"* 2 EXPUNGE", b"* 3 EXISTS", b"* 1 RECENT",
                                                   b"W2 OK NOOP completed"]
        assert watcher.command(b"W3", b"UID FETCH 1:* (UID)") == [
            b"* 1 FETCH (UID 1)", b"* 2 FETCH (UID 3)", b"* 3 FETCH (UID 4)", b"W3 OK FETCH completed"]
        assert watcher.command(b"W4", b"NOOP") == [b"W4 OK NOOP completed"]


def test_large_folder_select_and_header_listing_are_exact(server: Harness) -> None:
    """More messages than one store batch of a streamed FETCH (FETCH_BATCH): every response in order, byte
    for byte, flags as stored; SELECT's FLAGS, EXISTS and UNSEEN from one listing."""
    extra = 2 * FETCH_BATCH + 37
    for i in range(extra):
        flags = ("\\Seen",) if i % 3 else ("$Label%d" % (i % 2),) if i % 5 == 0 else ()
        server.deliver(new_message(f"bulk {i}", "x" * (i % 50)), flags=flags)
    stored = server.messages()
    assert len(stored) == len(SEEDED) + extra
    expected = []
    for seq, m in enumerate(stored, 1):
        header = split_message(server.call(server.store.read_blob, m.blob))[0]
        expected.append(b"* %d FETCH (UID %d FLAGS %s RFC822.SIZE %d BODY[HEADER] {%d}\r\n%s)"
                        % (seq, m.uid, render_flags(m.flags), m.size, len(header), header))
    with raw_tls(server) as raw:
        lines = raw.command(b"L1", b"SELECT INBOX")
        assert lines[0] == b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Label0 $Label1)"
        assert b"* %d EXISTS" % len(stored) in lines
        assert b"* OK [UNSEEN 1] First unseen" in lines
        server.store.calls.clear()
        lines = raw.command(b"L2", b"UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER])")
        assert b"\r\n".join(lines) == b"\r\n".join(expected) + b"\r\nL2 OK FETCH completed"
        # The small bodies are read together, one store read per batch, never one per message.
        batches = -(-len(stored) // FETCH_BATCH)
        assert server.store.calls["read_small"] == batches and server.store.calls["read_header"] == 0
        lines = raw.command(b"L3", b"FETCH %d:* (FLAGS)" % (len(stored) - 1))
        assert lines == [b"* %d FETCH (FLAGS %s)" % (seq, render_flags(m.flags))
                         for seq, m in enumerate(stored[-2:], len(stored) - 1)] + [b"L3 OK FETCH completed"]
        assert server.store.calls["read_small"] == batches  # flags only: no body read


def test_id_enable_unselect_and_unknown_commands(server: Harness) -> None:
    with raw_tls(server, authenticate=False) as raw:
        lines = raw.command(b"D1", b'ID ("name" "Thunderbird" "version" "128.0")')
        assert lines == [b'* ID ("name" {8}', b'Caduc\xc3\xa9e)', b"D1 OK ID completed"]
        assert raw.command(b"D2", b"ID NIL")[-1] == b"D2 OK ID completed"
        assert raw.command(b"D3", b"ENABLE UTF8=ACCEPT")[-1].startswith(b"D3 BAD")  # not authenticated yet
        raw.command(b"D4", b"AUTHENTICATE EXTERNAL =")
        assert raw.command(b"D5", b"ENABLE CONDSTORE") == [b"* ENABLED", b"D5 OK ENABLE completed"]
        raw.command(b"D6", b"SELECT INBOX")
        assert raw.command(b"D7", b"UNSELECT") == [b"D7 OK UNSELECT completed"]
        assert raw.command(b"D8", b"FETCH 1 FLAGS")[-1] == b"D8 BAD Command not valid in this state"
        assert raw.command(b"D9", b"XYZZY")[-1] == b"D9 BAD Unknown command"


def test_internal_error_gives_generic_reply_with_reference(server: Harness,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    with imaps(server) as client:
        client.select("INBOX")
        server.store.faults["messages"] = RuntimeError("db password=hunter2 at /var/lib/secret")
        with caplog.at_level(logging.ERROR, logger="mailserver.imap_server"):
            typ, data = client.search(None, "ALL")
        assert typ == "NO"
        match = SERVERBUG_RE.fullmatch(b"NO " + data[0])
        assert match is not None
        assert b"hunter2" not in data[0] and b"RuntimeError" not in data[0]
        typ, data = client.search(None, "ALL")
        assert typ == "OK" and data == [b"1 2 3"]
    ref = match.group(1).decode()
    logged = [r for r in caplog.records if ref in r.getMessage()]
    assert logged and logged[0].exc_info is not None and "hunter2" in str(logged[0].exc_info[1])


# ---------------------------------------------------------------------------------------------------------
# curl (the real tool users have)
# ---------------------------------------------------------------------------------------------------------

CURL = shutil.which("curl")


def run_curl(h: Harness, url: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
    assert CURL is not None
    cmd = [CURL, "-sS", "--max-time", "20", "--cacert", str(h.pki.ca_path), "--cert", str(h.pki.client_cert_path),
           "--key", str(h.pki.client_key_path), "--login-options", "AUTH=EXTERNAL", "-u", f"{ADDRESS}:",
           *extra, url]
    return subprocess.run(cmd, capture_output=True, timeout=30, check=False)


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
@pytest.mark.parametrize("sasl_ir", [False, True])
def test_curl_implicit_tls_external(server: Harness, sasl_ir: bool) -> None:
    extra = ("--sasl-ir",) if sasl_ir else ()
    done = run_curl(server, f"imaps://127.0.0.1:{server.tls_port}/INBOX/;UID=1", *extra)
    assert done.returncode == 0, done.stderr
    assert done.stdout == MSG_LAB
    done = run_curl(server, f"imaps://127.0.0.1:{server.tls_port}/INBOX?SUBJECT%20labo", *extra)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == b"* SEARCH 1"
    assert len(server.audit.of(AuditEvent.LOGIN)) == 2


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_starttls_external(server: Harness) -> None:
    done = run_curl(server, f"imap://127.0.0.1:{server.plain_port}/INBOX/;UID=3", "--ssl-reqd")
    assert done.returncode == 0, done.stderr
    assert done.stdout == MSG_MULTIPART
    assert server.audit.of(AuditEvent.LOGIN)[0]["actor"] == PRINCIPAL


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_without_certificate_is_denied(server: Harness) -> None:
    assert CURL is not None
    cmd = [CURL, "-sS", "--max-time", "20", "--cacert", str(server.pki.ca_path), "--login-options",
           "AUTH=EXTERNAL", "-u", f"{ADDRESS}:", f"imaps://127.0.0.1:{server.tls_port}/INBOX/;UID=1"]
    done = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
    assert done.returncode == 67  # CURLE_LOGIN_DENIED
    assert done.stdout == b""


# ---------------------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------------------


def test_sequence_set_parsing_and_selection() -> None:
    s = SequenceSet.parse(b"1,3:5,9:*")
    assert s.select([1, 2, 3, 4, 5, 7, 9, 12], 12) == [1, 3, 4, 5, 9, 12]
    assert SequenceSet.parse(b"*:4").select(range(1, 11), 10) == [4, 5, 6, 7, 8, 9, 10]
    assert SequenceSet.parse(b"559:*").select([3, 7], 7) == [7]  # RFC 3501 §6.4.8
    for bad in (b"0", b"1:0", b"a", b"1,,2", b"", b"4294967296"):
        with pytest.raises(CommandBad):
            SequenceSet.parse(bad)
    assert compress_uids([1, 2, 3, 7, 9, 10]) == b"1:3,7,9:10"
    assert compress_uids([3, 1]) == b"3,1"


def test_fetch_item_parser() -> None:
    items = parse_fetch_items(b"(UID BODY.PEEK[1.2.HEADER.FIELDS (Subject \"X-Y\")]<10.20> RFC822.SIZE)")
    assert items[0] == FetchItem("UID")
    assert items[1] == FetchItem("BODY[]", BodySection((1, 2), "HEADER.FIELDS", (b"Subject", b"X-Y")),
                                 peek=True, partial=(10, 20))
    assert items[1].section is not None and items[1].section.spec() == b"1.2.HEADER.FIELDS (Subject X-Y)"
    assert [i.name for i in parse_fetch_items(b"full")] == ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE",
                                                             "BODY"]
    assert parse_fetch_items(b"BODY[]")[0].sets_seen and not parse_fetch_items(b"BODY.PEEK[]")[0].sets_seen
    for bad in (b"(FLAGS", b"BODY[0]", b"BODY.PEEK", b"BODY[MIME]", b"BODY[]<1.0>", b"FLAGS X"):
        with pytest.raises(CommandBad):
            parse_fetch_items(bad)


def test_search_parser_structure() -> None:
    _, key = parse_search(tokenize([b'OR (FROM "a b" SEEN) NOT UID 1:* HEADER X-A ""']))
    assert render(repr(key)) is not None
    with pytest.raises(CommandNo):
        parse_search(tokenize([b"CHARSET KOI9 ALL"]))
    for bad in (b"", b"(", b"OR SEEN", b"LARGER x", b"SINCE yesterday", b"HEADER"):
        with pytest.raises(CommandBad):
            parse_search(tokenize([bad]))
    deep = b"NOT " * 40 + b"ALL"
    with pytest.raises(CommandBad):
        parse_search(tokenize([deep]))


def test_mime_tree_nested_message_and_groups() -> None:
    inner = b"From: Inner <in@example.org>\r\nSubject: inner\r\n\r\ninner body\r\n"
    outer = (b"To: Team: a@example.org, b@example.org;, solo@example.org\r\n"
             b"Content-Type: multipart/mixed; boundary=xx\r\n\r\n"
             b"--xx\r\n\r\nfirst\r\n--xx\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"--xx--\r\n")
    root = parse_mime(outer)
    assert [c.content_type for c in root.children] == ["text/plain", "message/rfc822"]
    assert section_bytes(root, BodySection((1,))) == b"first"
    assert section_bytes(root, BodySection((2,))) == inner[:-2]  # the CRLF before "--xx" is the delimiter's
    assert section_bytes(root, BodySection((2,), "HEADER")) == b"From: Inner <in@example.org>\r\nSubject: inner\r\n\r\n"
    assert section_bytes(root, BodySection((2, 1))) == b"inner body"
    assert section_bytes(root, BodySection((3,))) is None
    assert section_bytes(root, BodySection((1,), "TEXT")) is None
    env = envelope(root)
    assert env[5] == [[None, None, "Team", None], [None, None, "a", "example.org"], [None, None, "b", "example.org"],
                      [None, None, None, None], [None, None, "solo", "example.org"]]
    assert env[2] is None and env[3] is None and env[4] is None


def test_lf_only_message_sections() -> None:
    raw = b"Subject: lf\nContent-Type: multipart/alternative; boundary=q\n\n--q\nContent-Type: text/plain\n\nplain\n--q\nContent-Type: text/html\n\n<p>x</p>\n--q--\n"
    root = parse_mime(raw)
    assert section_bytes(root, BodySection(())) == raw
    assert section_bytes(root, BodySection((), "HEADER")) == b"Subject: lf\nContent-Type: multipart/alternative; boundary=q\n\n"
    assert section_bytes(root, BodySection((2,))) == b"<p>x</p>"
    assert section_bytes(root, BodySection((), "HEADER.FIELDS", (b"subject",))) == b"Subject: lf\n\n"


def test_twisted_model_objects_provide_their_interfaces() -> None:
    from twisted.mail import imap4
    from zope.interface.verify import verifyObject

    store = MemoryMailStore()
    inbox = store.add_mailbox(MAILBOX_ID)
    asyncio.run(store.append(inbox.id, MSG_MULTIPART, ["\\Seen"], None))
    account = StoreAccount(store, ImapLogin(MAILBOX_ID, ADDRESS, PRINCIPAL), ListAudit())
    assert verifyObject(imap4.IAccount, account) and verifyObject(imap4.INamespacePresenter, account)
    mbox = account.select("inbox")
    assert mbox is not None
    assert verifyObject(imap4.IMailbox, mbox) and verifyObject(imap4.ISearchableMailbox, mbox)
    [(seq, message)] = mbox.fetch(imap4.MessageSet(1, None), uid=True)
    assert seq == 1 and verifyObject(imap4.IMessage, message) and verifyObject(imap4.IMessageFile, message)
    assert message.open().read() == MSG_MULTIPART
    assert message.getHeaders(False, "subject", "cc") == {"subject": "Compte rendu", "cc": "secretariat@example.org"}
    assert message.isMultipart() and message.getSubPart(1).getHeaders(False, "content-type") == {
        "content-type": 'application/pdf; name="cr.pdf"'}
    assert message.getSubPart(0).getBodyFile().read() == b"Cr=C3=A9atinine normale"
    assert message.getFlags() == ["\\Seen"] and message.getUID() == 1
    assert mbox.requestStatus(["MESSAGES", "UNSEEN"]) == {"MESSAGES": 1, "UNSEEN": 0}


def test_starttls_table_entry_is_the_fixed_handler() -> None:
    from twisted.mail import imap4

    from mailserver.imap_server import IMAPServer

    assert IMAPServer.unauth_STARTTLS[0] is IMAPServer.do_STARTTLS
    assert IMAPServer.do_STARTTLS is not imap4.IMAP4Server.do_STARTTLS
    assert IMAPServer.COMMANDS["unauth"][b"STARTTLS"][0] is IMAPServer.do_STARTTLS
    assert b"LOGIN" not in IMAPServer.COMMANDS["auth"] and b"ENABLE" not in IMAPServer.COMMANDS["select"]


# -- fuzzing: hostile input may only ever produce a protocol error ------------------------------------------

_IMAPISH = st.binary(max_size=200) | st.lists(
    st.sampled_from([b"BODY", b"[", b"]", b"(", b")", b" ", b"HEADER.FIELDS", b".", b"1", b"<", b">", b"*", b":",
                     b",", b'"', b"\\", b"OR", b"NOT", b"UID", b"PEEK", b"MIME", b"TEXT", b"{", b"}", b"SINCE",
                     b"1-Jan-2025", b"LARGER", b"CHARSET", b"UTF-8", b"HEADER", b"0", b"4294967296"]),
    max_size=30).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(_IMAPISH)
def test_parsers_only_raise_protocol_errors(data: bytes) -> None:
    for parse in (parse_fetch_items, SequenceSet.parse, lambda d: parse_search(tokenize([d]))):
        try:
            parse(data)
        except (CommandBad, CommandNo):
            pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600) | st.lists(st.sampled_from([
    b"Content-Type: multipart/mixed; boundary=b\r\n", b"Content-Type: message/rfc822\r\n", b"\r\n", b"--b\r\n",
    b"--b--\r\n", b"From: a@b\r\n", b" folded\r\n", b"body\n", b"\n", b"To: G: x@y;\r\n", b"Subject: =?x?q?\r\n"]),
    max_size=40).map(b"".join))
def test_mime_parser_is_total_and_exact(data: bytes) -> None:
    root = parse_mime(data)
    assert root.header + root.body == data
    assert section_bytes(root, BodySection(())) == data
    render(body_structure(root, True))
    render(envelope(root))
