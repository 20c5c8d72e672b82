"""A closed SMTP connection is freed by reference counting, without the cyclic garbage collector.

aiosmtpd's protocol object sits in reference cycles (dicts of its own bound methods, the stream writer,
the STARTTLS SSLProtocol with its 256 KiB buffer, the session task): without CaduceeSMTP.connection_lost
breaking them, every closed TLS connection waited for a collection and RSS climbed by hundreds of MB
under connection churn (REFERENCE.md §7, `caducee bench memory`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import ipaddress
import ssl
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailserver.smtp_protocol import CaduceeSMTP


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    d = tmp_path_factory.mktemp("cert")
    (d / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return d / "cert.pem", d / "key.pem"


@pytest.fixture
def gc_disabled() -> Iterator[None]:
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _Registry:
    def __init__(self) -> None:
        self.connections: set[CaduceeSMTP] = set()


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        assert line, "connection closed early"
        if line[3:4] != b"-":
            return line


async def _session(cert: tuple[Path, Path], starttls: bool, quit_first: bool) -> dict[str, Any]:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(*cert)
    client_ctx = ssl.create_default_context(cafile=str(cert[0]))
    registry = _Registry()
    made: list[weakref.ref[Any]] = []

    def factory() -> CaduceeSMTP:
        proto = CaduceeSMTP(registry, implicit_tls=False, tls_context=server_ctx, require_starttls=starttls,
                            hostname="mx.test")
        made.append(weakref.ref(proto))
        return proto

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        assert (await _reply(reader)).startswith(b"220")
        writer.write(b"EHLO client.test\r\n")
        assert (await _reply(reader)).startswith(b"250")
        tls_protocol = None
        if starttls:
            writer.write(b"STARTTLS\r\n")
            assert (await _reply(reader)).startswith(b"220")
            await writer.start_tls(client_ctx, server_hostname="127.0.0.1")
            writer.write(b"EHLO client.test\r\n")
            assert (await _reply(reader)).startswith(b"250")
            proto = made[0]()
            assert proto is not None and proto._tls_protocol is not None
            tls_protocol = weakref.ref(proto._tls_protocol)
            del proto
        if quit_first:
            writer.write(b"QUIT\r\n")
            assert (await _reply(reader)).startswith(b"221")
        writer.close()  # without QUIT: the peer drops the connection
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass
        del reader, writer
        for _ in range(50):
            await asyncio.sleep(0.01)
            if made[0]() is None:
                break
        return {"protocol": made[0], "tls_protocol": tls_protocol, "live": len(registry.connections)}
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("starttls", [True, False], ids=["starttls", "plaintext"])
@pytest.mark.parametrize("quit_first", [True, False], ids=["quit", "drop"])
def test_a_closed_connection_is_freed_without_the_garbage_collector(
        cert: tuple[Path, Path], gc_disabled: None, starttls: bool, quit_first: bool) -> None:
    out = asyncio.run(_session(cert, starttls, quit_first))
    assert out["live"] == 0
    assert out["protocol"]() is None, "the closed connection's protocol is still alive (a reference cycle)"
    if starttls:
        assert out["tls_protocol"]() is None, "the SSLProtocol (and its 256 KiB buffer) is still alive"
