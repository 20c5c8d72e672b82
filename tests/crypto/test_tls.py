"""The TLS profile and "request any client certificate" with real handshakes (ssl, pyOpenSSL, openssl CLI)."""

from __future__ import annotations

import asyncio
import ctypes
import datetime as dt
import hashlib
import queue
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from zope.interface import implementer

from crypto import tls
from crypto.pki import CertUsage, DevPKI, IssuedCertificate

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")
TIMEOUT = 10.0
AEAD_TLS12 = set(tls.TLS12_CIPHERS)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    return DevPKI.create_or_load(tmp_path_factory.getbasetemp() / "crypto-dev-pki")


@pytest.fixture(scope="module")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    return DevPKI.create_or_load(tmp_path_factory.getbasetemp() / "crypto-foreign-pki")


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls-certs")


@pytest.fixture(scope="module")
def server_cert(pki: DevPKI, out_dir: Path) -> IssuedCertificate:
    return pki.issue_server(
        ["localhost"], ["127.0.0.1"], out_dir, "server", structure_id="312345678900017", organisation="Op"
    )


@pytest.fixture(scope="module")
def foreign_client(foreign_pki: DevPKI, out_dir: Path) -> IssuedCertificate:
    return foreign_pki.issue_person(
        "810001234567", "Eve", "Autre", "eve@autre.test", CertUsage.AUTH, out_dir, "eve"
    )


@pytest.fixture(scope="module")
def own_client(pki: DevPKI, out_dir: Path) -> IssuedCertificate:
    return pki.issue_person(
        "810001234567", "Anne", "Martin", "anne@ch.caducee.test", CertUsage.AUTH, out_dir, "anne"
    )


def der(issued: IssuedCertificate) -> bytes:
    return issued.certificate.public_bytes(serialization.Encoding.DER)


# -------------------- servers


@dataclass
class Outcome:
    """What the server saw of one connection."""

    der: bytes | None = None
    version: str | None = None
    cipher: str | None = None
    error: str | None = None


class BlockingTLSServer:
    """Accepts on 127.0.0.1 in a thread; completes one TLS handshake per connection and reports it.

    ``backend`` "ssl" serves with :func:`tls.server_context` (asyncio/aiosmtpd path), "pyopenssl" with the
    context of :func:`tls.twisted_server_context_factory` (Twisted path).
    """

    def __init__(self, backend: str, cert: IssuedCertificate, context: ssl.SSLContext | None = None) -> None:
        self.backend = backend
        if backend == "ssl":
            self.ssl_context = context or tls.server_context(cert.chain_path, cert.key_path)
        else:
            self.openssl_context = tls.twisted_server_context_factory(
                cert.chain_path, cert.key_path
            ).getContext()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)  # lets the thread notice `stopping` promptly
        self.port = self.listener.getsockname()[1]
        self.outcomes: queue.Queue[Outcome] = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(TIMEOUT)
            with conn:
                self.outcomes.put(self._handshake(conn))

    def _handshake(self, conn: socket.socket) -> Outcome:
        if self.backend == "ssl":
            try:
                tls_sock = self.ssl_context.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                return Outcome(error=str(exc))
            cipher = tls_sock.cipher()
            outcome = Outcome(
                tls.peer_certificate_der(tls_sock), tls_sock.version(), cipher[0] if cipher else None
            )
            tls_sock.sendall(b"OK\n")
            tls_sock.close()
            return outcome
        # pyOpenSSL drives the descriptor itself: it must be blocking (a Python timeout makes it
        # non-blocking), with a kernel receive timeout so that a stuck peer cannot hang the test.
        conn.settimeout(None)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(TIMEOUT), 0))
        connection = SSL.Connection(self.openssl_context, conn)
        connection.set_accept_state()
        try:
            connection.do_handshake()
        except (SSL.Error, OSError) as exc:
            return Outcome(error=repr(exc))
        peer = connection.get_peer_certificate(as_cryptography=True)
        outcome = Outcome(
            peer.public_bytes(serialization.Encoding.DER) if peer is not None else None,
            connection.get_protocol_version_name(),
            connection.get_cipher_name(),
        )
        connection.sendall(b"OK\n")
        connection.shutdown()
        return outcome

    def next_outcome(self) -> Outcome:
        return self.outcomes.get(timeout=TIMEOUT)

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        self.thread.join(TIMEOUT)


@pytest.fixture(scope="module", params=["ssl", "pyopenssl"])
def shared_server(
    request: pytest.FixtureRequest, server_cert: IssuedCertificate
) -> Iterator[BlockingTLSServer]:
    running = BlockingTLSServer(request.param, server_cert)
    yield running
    running.close()


@pytest.fixture
def server(shared_server: BlockingTLSServer) -> BlockingTLSServer:
    while not shared_server.outcomes.empty():  # leftovers of a failed test must not be read by this one
        shared_server.outcomes.get_nowait()
    return shared_server


def connect(port: int, context: ssl.SSLContext, server_hostname: str | None = "localhost") -> tuple[str, str]:
    """Handshake, wait for the server's "OK" and return (version, cipher)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls_sock,
    ):
        assert tls_sock.recv(3) == b"OK\n"
        version, cipher = tls_sock.version(), tls_sock.cipher()
        assert version is not None and cipher is not None
        return version, cipher[0]


def legacy_client(version: ssl.TLSVersion, ciphers: str = "DEFAULT:@SECLEVEL=0") -> ssl.SSLContext:
    """A client willing to speak an obsolete protocol (to prove the *server* refuses it)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl deprecates TLSv1/TLSv1_1 on purpose
        context.minimum_version = version
        context.maximum_version = version
    context.set_ciphers(ciphers)
    return context


# -------------------- client certificates


def test_unknown_ca_client_certificate_completes_the_handshake(
    server: BlockingTLSServer, pki: DevPKI, foreign_client: IssuedCertificate
) -> None:
    client = tls.client_context(pki.ca_bundle_path, foreign_client.cert_path, foreign_client.key_path)
    version, _ = connect(server.port, client)
    outcome = server.next_outcome()
    assert outcome.error is None
    assert outcome.der == der(foreign_client)
    assert version == outcome.version == "TLSv1.3"


def test_openssl_does_not_build_the_client_chain_it_would_ignore(
    server_cert: IssuedCertificate, pki: DevPKI, foreign_client: IssuedCertificate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chain is accepted by one callback per handshake (SSL_CTX_set_cert_verify_callback), not built and
    checked by X509_verify_cert calling the per-certificate callback; the certificate still arrives."""
    chain_calls: list[int] = []
    certificate_calls: list[int] = []

    def accept_chain(_store: int | None, _arg: int | None) -> int:
        chain_calls.append(1)
        return 1

    def accept_any(_ok: int, _store: int | None) -> int:
        certificate_calls.append(1)
        return 1

    chain_cb = tls._CertVerifyCallback(accept_chain)
    any_cb = tls._VerifyCallback(accept_any)
    monkeypatch.setattr(tls, "_ACCEPT_CHAIN_CALLBACK", chain_cb)
    monkeypatch.setattr(tls, "_ACCEPT_ANY_CALLBACK", any_cb)
    monkeypatch.setattr(tls, "_ACCEPT_ANY_ADDRESS", ctypes.cast(any_cb, ctypes.c_void_p).value)
    own = BlockingTLSServer("ssl", server_cert)
    try:
        client = tls.client_context(pki.ca_bundle_path, foreign_client.cert_path, foreign_client.key_path)
        for _ in range(2):
            connect(own.port, client)
            outcome = own.next_outcome()
            assert outcome.error is None and outcome.der == der(foreign_client)
    finally:
        own.close()
    assert (len(chain_calls), len(certificate_calls)) == (2, 0)


def test_no_client_certificate_completes_the_handshake(server: BlockingTLSServer, pki: DevPKI) -> None:
    connect(server.port, tls.client_context(pki.ca_bundle_path))
    outcome = server.next_outcome()
    assert outcome.error is None and outcome.der is None


def test_own_client_certificate_over_tls12(
    server: BlockingTLSServer, pki: DevPKI, own_client: IssuedCertificate
) -> None:
    client = tls.client_context(pki.ca_bundle_path, own_client.chain_path, own_client.key_path)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    version, cipher = connect(server.port, client)
    outcome = server.next_outcome()
    assert outcome.der == der(own_client)
    assert version == "TLSv1.2" and cipher in AEAD_TLS12


def test_expired_client_certificate_reaches_the_application(
    server: BlockingTLSServer, pki: DevPKI, out_dir: Path
) -> None:
    expired = pki.issue_person(
        "810001234567",
        "Anne",
        "Martin",
        "anne@ch.caducee.test",
        CertUsage.AUTH,
        out_dir,
        "expired-tls",
        not_before=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
        not_after=dt.datetime(2021, 1, 1, tzinfo=dt.UTC),
    )
    connect(server.port, tls.client_context(pki.ca_bundle_path, expired.cert_path, expired.key_path))
    assert server.next_outcome().der == der(expired)


def test_stock_cert_optional_would_abort_the_handshake(
    server_cert: IssuedCertificate, pki: DevPKI, foreign_client: IssuedCertificate
) -> None:
    """The gap the ctypes patch fills: ssl's CERT_OPTIONAL rejects an unknown CA with a TLS alert."""
    stock = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    stock.load_cert_chain(server_cert.chain_path, server_cert.key_path)
    stock.load_verify_locations(pki.ca_bundle_path)
    stock.verify_mode = ssl.CERT_OPTIONAL
    running = BlockingTLSServer("ssl", server_cert, context=stock)
    try:
        client = tls.client_context(pki.ca_bundle_path, foreign_client.cert_path, foreign_client.key_path)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            connect(running.port, client)
        outcome = running.next_outcome()
        assert outcome.error is not None and "CERTIFICATE_VERIFY_FAILED" in outcome.error
    finally:
        running.close()


# -------------------- protocol profile


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["TLSv1.0", "TLSv1.1"]
)
def test_old_protocol_versions_are_refused(server: BlockingTLSServer, version: ssl.TLSVersion) -> None:
    with pytest.raises(ssl.SSLError) as info:
        connect(server.port, legacy_client(version), server_hostname=None)
    assert "PROTOCOL_VERSION" in str(info.value).upper()
    outcome = server.next_outcome()
    assert outcome.error is not None and "unsupported protocol" in outcome.error.lower().replace("_", " ")


@pytest.mark.parametrize(
    "ciphers",
    [
        "ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA384:ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA",
        "AES128-SHA:AES256-GCM-SHA384",
    ],
    ids=["ecdhe-cbc", "static-rsa"],
)
def test_tls12_without_ecdhe_aead_is_refused(server: BlockingTLSServer, ciphers: str) -> None:
    with pytest.raises(ssl.SSLError) as info:
        connect(server.port, legacy_client(ssl.TLSVersion.TLSv1_2, ciphers), server_hostname=None)
    assert "HANDSHAKE_FAILURE" in str(info.value).upper()
    outcome = server.next_outcome()
    assert outcome.error is not None and "no shared cipher" in outcome.error.lower().replace("_", " ")


@pytest.mark.parametrize("cipher", sorted(c for c in tls.TLS12_CIPHERS if "-RSA-" in c))
def test_each_rsa_aead_suite_is_offered(server: BlockingTLSServer, pki: DevPKI, cipher: str) -> None:
    client = tls.client_context(pki.ca_bundle_path)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers(cipher)
    assert connect(server.port, client) == ("TLSv1.2", cipher)
    assert server.next_outcome().cipher == cipher


def test_server_order_wins(server: BlockingTLSServer, pki: DevPKI) -> None:
    client = tls.client_context(pki.ca_bundle_path)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384")
    assert connect(server.port, client)[1] == "ECDHE-RSA-AES256-GCM-SHA384"


def test_contexts_carry_the_profile(server_cert: IssuedCertificate, pki: DevPKI) -> None:
    for context in (
        tls.server_context(server_cert.cert_path, server_cert.key_path),
        tls.client_context(pki.ca_bundle_path),
    ):
        assert context.minimum_version is ssl.TLSVersion.TLSv1_2
        assert context.maximum_version is ssl.TLSVersion.TLSv1_3
        assert context.options & ssl.OP_NO_COMPRESSION and context.options & ssl.OP_NO_RENEGOTIATION
        assert context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
        tls12 = [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert tls12 == list(tls.TLS12_CIPHERS)
        assert all(c["aead"] for c in context.get_ciphers())


# -------------------- client side


def test_client_context_verifies_the_server(
    server: BlockingTLSServer, pki: DevPKI, foreign_pki: DevPKI
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(server.port, tls.client_context(foreign_pki.ca_bundle_path))
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(server.port, tls.client_context(pki.ca_bundle_path), server_hostname="other.caducee.test")
    assert connect(
        server.port, tls.client_context(pki.ca_bundle_path, check_hostname=False), "other.caducee.test"
    )


def test_client_context_requires_cert_with_key(pki: DevPKI, own_client: IssuedCertificate) -> None:
    with pytest.raises(ValueError):
        tls.client_context(pki.ca_bundle_path, key_file=own_client.key_path)


# -------------------- the ctypes patch


def test_patch_refuses_client_contexts(pki: DevPKI) -> None:
    with pytest.raises(ValueError, match="server contexts only"):
        tls.accept_any_client_certificate(tls.client_context(pki.ca_bundle_path))


def test_patch_refuses_a_pointer_it_cannot_prove(
    monkeypatch: pytest.MonkeyPatch, server_cert: IssuedCertificate
) -> None:
    decoy = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    decoy.verify_mode = ssl.CERT_REQUIRED
    decoy_pointer = tls._ssl_ctx_pointer(decoy)
    monkeypatch.setattr(tls, "_ssl_ctx_pointer", lambda ctx: decoy_pointer)
    target = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(RuntimeError, match="refusing to patch"):
        tls.accept_any_client_certificate(target)
    lib = tls._libssl()
    assert lib.SSL_CTX_get_verify_callback(decoy_pointer) is None  # nothing was written to the decoy
    assert decoy.verify_mode is ssl.CERT_REQUIRED


def test_patch_survives_verify_mode_changes(server_cert: IssuedCertificate) -> None:
    context = tls.server_context(server_cert.cert_path, server_cert.key_path)
    pointer = tls._ssl_ctx_pointer(context)
    expected = ctypes.cast(tls._ACCEPT_ANY_CALLBACK, ctypes.c_void_p).value
    assert context.verify_mode is ssl.CERT_OPTIONAL
    assert tls._libssl().SSL_CTX_get_verify_callback(pointer) == expected
    context.verify_mode = ssl.CERT_OPTIONAL  # CPython re-applies the mode but keeps the callback
    assert tls._libssl().SSL_CTX_get_verify_callback(pointer) == expected


# -------------------- Twisted


@implementer(IOpenSSLClientConnectionCreator)
class _ClientCreator:
    def __init__(self, ca_file: Path, cert: IssuedCertificate | None) -> None:
        self.context = SSL.Context(SSL.TLS_METHOD)
        self.context.load_verify_locations(str(ca_file))
        self.context.set_verify(SSL.VERIFY_PEER, None)
        if cert is not None:
            key = serialization.load_pem_private_key(cert.key_path.read_bytes(), password=None)
            self.context.use_certificate(cert.certificate)
            self.context.use_privatekey(key)  # type: ignore[arg-type]

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N802,N803
        connection = SSL.Connection(self.context, None)
        connection.set_tlsext_host_name(b"localhost")
        return connection


class _Recorder(Protocol):
    received = b""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data


def twisted_exchange(
    server_cert: IssuedCertificate, ca_file: Path, client_cert: IssuedCertificate | None
) -> tuple[bytes | None, bytes]:
    """A real TLS exchange between Twisted TLSMemoryBIOProtocols over in-memory transports."""
    factory = tls.twisted_server_context_factory(server_cert.chain_path, server_cert.key_path)
    # An explicit clock: TLS write coalescing must not reach for (and install) the global reactor.
    clock = Clock()
    server_side = TLSMemoryBIOFactory(factory, False, ServerFactory.forProtocol(_Recorder), clock=clock)
    client_side = TLSMemoryBIOFactory(
        _ClientCreator(ca_file, client_cert), True, ClientFactory.forProtocol(_Recorder), clock=clock
    )
    client, server, pump = connectedServerAndClient(
        lambda: server_side.buildProtocol(None), lambda: client_side.buildProtocol(None), clock=clock
    )
    client.write(b"a001 CAPABILITY\r\n")
    pump.flush()
    seen = tls.twisted_peer_certificate_der(server)
    received = server.wrappedProtocol.received
    client.loseConnection()
    pump.flush()
    return seen, received


def test_twisted_reads_an_unknown_ca_client_certificate(
    server_cert: IssuedCertificate, pki: DevPKI, foreign_client: IssuedCertificate
) -> None:
    seen, received = twisted_exchange(server_cert, pki.ca_bundle_path, foreign_client)
    assert received == b"a001 CAPABILITY\r\n"
    assert seen == der(foreign_client)
    assert x509.load_der_x509_certificate(seen).subject == foreign_client.certificate.subject


def test_twisted_without_client_certificate(server_cert: IssuedCertificate, pki: DevPKI) -> None:
    seen, received = twisted_exchange(server_cert, pki.ca_bundle_path, None)
    assert received == b"a001 CAPABILITY\r\n" and seen is None


def test_twisted_peer_certificate_of_a_plain_transport_is_none() -> None:
    assert tls.twisted_peer_certificate_der(StringTransport()) is None


# -------------------- openssl s_client


class AsyncioTLSServer:
    """An asyncio server using ``tls.server_context`` (as aiosmtpd does), run in a thread.

    Each connection is answered with ``OK <sha256 of the client certificate | NONE>``.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=context), self.loop
        ).result(TIMEOUT)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        certificate = tls.peer_certificate_der(writer.get_extra_info("ssl_object"))
        label = hashlib.sha256(certificate).hexdigest() if certificate else "NONE"
        writer.write(f"OK {label}\n".encode())
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    def close(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


@pytest.fixture(scope="module")
def asyncio_server(server_cert: IssuedCertificate) -> Iterator[AsyncioTLSServer]:
    running = AsyncioTLSServer(tls.server_context(server_cert.chain_path, server_cert.key_path))
    yield running
    running.close()


@pytest.fixture(scope="module")
def permissive_server(server_cert: IssuedCertificate) -> Iterator[AsyncioTLSServer]:
    """A deliberately weak server: the control showing the refused clients are otherwise able to connect."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("ALL:@SECLEVEL=0")
    context.load_cert_chain(server_cert.chain_path, server_cert.key_path)
    running = AsyncioTLSServer(context)
    yield running
    running.close()


def s_client(port: int, ca_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(ca_file), "-ign_eof", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


REFUSED_CLIENTS = {
    "tls1": ("-tls1", "-cipher", "DEFAULT:@SECLEVEL=0"),
    "tls1_1": ("-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"),
    "tls1_2-static-rsa-cbc": ("-tls1_2", "-cipher", "AES128-SHA"),
    "tls1_2-ecdhe-cbc": ("-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA"),
}


@needs_openssl
@pytest.mark.parametrize("name", sorted(REFUSED_CLIENTS))
def test_openssl_s_client_refused(
    name: str, asyncio_server: AsyncioTLSServer, permissive_server: AsyncioTLSServer, pki: DevPKI
) -> None:
    args = REFUSED_CLIENTS[name]
    control = s_client(permissive_server.port, pki.ca_bundle_path, *args)
    assert control.returncode == 0 and "OK NONE" in control.stdout, (
        "the client itself should be able to connect"
    )

    refused = s_client(asyncio_server.port, pki.ca_bundle_path, *args)
    assert refused.returncode != 0
    assert "Cipher is (NONE)" in refused.stdout and "OK " not in refused.stdout


@needs_openssl
def test_openssl_s_client_tls13_with_foreign_certificate(
    asyncio_server: AsyncioTLSServer, pki: DevPKI, foreign_client: IssuedCertificate
) -> None:
    result = s_client(
        asyncio_server.port,
        pki.ca_bundle_path,
        "-tls1_3",
        "-verify_return_error",
        "-verify_hostname",
        "localhost",
        "-cert",
        str(foreign_client.cert_path),
        "-key",
        str(foreign_client.key_path),
    )
    assert result.returncode == 0, result.stderr
    assert "New, TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384" in result.stdout
    assert f"OK {hashlib.sha256(der(foreign_client)).hexdigest()}" in result.stdout


@needs_openssl
def test_openssl_s_client_tls12_aead_without_certificate(
    asyncio_server: AsyncioTLSServer, pki: DevPKI
) -> None:
    result = s_client(asyncio_server.port, pki.ca_bundle_path, "-tls1_2", "-verify_return_error")
    assert result.returncode == 0, result.stderr
    assert "Cipher is ECDHE-RSA-AES256-GCM-SHA384" in result.stdout
    assert "OK NONE" in result.stdout


@needs_openssl
def test_no_session_ticket_over_tls12(
    asyncio_server: AsyncioTLSServer, permissive_server: AsyncioTLSServer, pki: DevPKI
) -> None:
    # The control: a server with OpenSSL's defaults sends a ticket, and s_client shows it.
    control = s_client(permissive_server.port, pki.ca_bundle_path, "-tls1_2")
    assert control.returncode == 0 and "OK NONE" in control.stdout
    assert "TLS session ticket:" in control.stdout
    result = s_client(asyncio_server.port, pki.ca_bundle_path, "-tls1_2", "-verify_return_error")
    assert result.returncode == 0 and "OK NONE" in result.stdout, result.stderr
    assert "session ticket" not in result.stdout.lower()


@needs_openssl
def test_one_session_ticket_over_tls13(asyncio_server: AsyncioTLSServer, server_cert: IssuedCertificate,
                                       pki: DevPKI) -> None:
    assert tls.server_context(server_cert.chain_path, server_cert.key_path).num_tickets == 1
    result = s_client(asyncio_server.port, pki.ca_bundle_path, "-tls1_3", "-verify_return_error")
    assert result.returncode == 0 and "OK NONE" in result.stdout, result.stderr
    assert "Post-Handshake New Session Ticket arrived" in result.stdout
