"""The submission server in-process: opaque internal errors, enhanced codes, graceful shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import smtplib
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from caducee.state import init_state
from crypto.tls import server_context
from crypto.validation import CertificateValidator
from directory.store import DirectoryStore
from mailserver import replies
from mailserver.audit import AuditTrail
from mailserver.auth import CertificateAuthenticator
from mailserver.blobs import BlobStore
from mailserver.db import Writer, make_engine
from mailserver.queue import Queue
from mailserver.smtp_protocol import shutdown
from mailserver.smtp_server import SubmissionHandler, SubmissionSettings, make_protocol_factory


@dataclass
class Running:
    loop: asyncio.AbstractEventLoop
    handler: SubmissionHandler
    server: asyncio.base_events.Server
    port: int
    state: Path
    demo: dict[str, Any]

    def ident(self, i: int) -> dict[str, str]:
        d = dict(self.demo["identities"][i])
        d["cert"], d["key"] = str(self.state / d["cert"]), str(self.state / d["key"])
        return d

    def client(self, i: int = 0) -> smtplib.SMTP_SSL:
        ctx = ssl.create_default_context(cafile=str(self.state / self.demo["ca_bundle"]))
        ident = self.ident(i)
        ctx.load_cert_chain(ident["cert"], ident["key"])
        s = smtplib.SMTP_SSL("localhost", self.port, context=ctx, timeout=10)
        s.ehlo("unit.test")
        s.auth("EXTERNAL", lambda challenge=None: "")
        return s


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("smtp-state")
    init_state(path, demo=True, say=lambda _: None)
    return path


@pytest.fixture
def running(state: Path) -> Iterator[Running]:
    from caducee.config import load

    cfg = load(state)
    engine = make_engine(cfg.database_url)
    writer = Writer(make_engine(cfg.database_url, writer=True))
    directory = DirectoryStore(engine)
    validator = CertificateValidator.from_files(cfg.path(cfg.tls.trust_anchors), [cfg.path(p) for p in cfg.tls.crls])
    queue = Queue(writer, BlobStore(cfg.path(cfg.storage.blobs)))
    settings = SubmissionSettings("localhost", frozenset(cfg.server.domains), 1_000_000, 10)
    handler = SubmissionHandler(settings, CertificateAuthenticator(validator, directory), directory, queue,
                                AuditTrail(writer))
    loop = asyncio.new_event_loop()
    tls = server_context(cfg.path(cfg.tls.certificate), cfg.path(cfg.tls.key))
    server = loop.run_until_complete(
        loop.create_server(make_protocol_factory(handler, tls, implicit_tls=True), "127.0.0.1", 0, ssl=tls))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    demo = json.loads((state / "demo" / "demo.json").read_text())
    yield Running(loop, handler, server, server.sockets[0].getsockname()[1], state, demo)
    asyncio.run_coroutine_threadsafe(shutdown(handler, [server], grace=5), loop).result(10)

    async def drain() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(drain(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()
    writer.stop()
    engine.dispose()
    writer.engine.dispose()


def _message(sender: str, rcpt: str) -> bytes:
    return f"From: {sender}\r\nTo: {rcpt}\r\nSubject: unit\r\n\r\nbody\r\n".encode()


def test_handler_exception_answers_451_with_a_reference_and_no_detail(running: Running,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    async def broken(*_a: Any, **_k: Any) -> str:
        raise RuntimeError("secret detail: /var/lib/x patient=DUPONT")

    running.handler.queue.enqueue = broken  # type: ignore[method-assign]
    a, b = running.ident(0), running.ident(1)
    with caplog.at_level(logging.ERROR, logger="mailserver.smtp_server"):
        s = running.client(0)
        with pytest.raises(smtplib.SMTPDataError) as caught:
            s.sendmail(a["address"], [b["address"]], _message(a["address"], b["address"]))
        assert s.noop()[0] == 250  # the session survives
        s.quit()
    code, text = caught.value.smtp_code, caught.value.smtp_error.decode()
    assert code == 451 and text.startswith("4.3.0 Internal error, reference ")
    assert "secret" not in text and "DUPONT" not in text
    ref = text.rsplit(" ", 1)[1]
    assert any(f"ref={ref}" in r.getMessage() for r in caplog.records)
    assert all("DUPONT" not in r.getMessage() for r in caplog.records)


def test_shutdown_lets_data_finish_and_sends_421_to_idle_sessions(running: Running) -> None:
    a, b = running.ident(0), running.ident(1)
    idle = running.client(0)
    busy = running.client(0)
    busy.mail(a["address"])
    busy.rcpt(b["address"])
    busy.putcmd("data")
    assert busy.getreply()[0] == 354
    busy.send(_message(a["address"], b["address"])[:20])  # inside DATA when the shutdown starts
    fut = asyncio.run_coroutine_threadsafe(shutdown(running.handler, [running.server], grace=10), running.loop)
    code, _ = idle.getreply()  # the unsolicited 421
    assert code == 421
    busy.send(_message(a["address"], b["address"])[20:] + b".\r\n")
    code, text = busy.getreply()
    assert code == 250 and b"queued as" in text
    fut.result(15)
    idle.close()
    busy.close()


@pytest.mark.parametrize("line,expected", [
    ("530 Must issue a STARTTLS command first", "530 5.7.0 Must issue a STARTTLS command first"),
    ("552 Error: Too much mail data", "552 5.3.4 Message too big for system"),
    ("503 Error: need MAIL command", "503 5.5.1 need MAIL command"),
    ("250 OK", "250 2.0.0 OK"),
    ("220 host ESMTP", "220 host ESMTP"),
    ("250-SIZE 100", "250-SIZE 100"),
    ("550 5.7.1 Relaying denied", "550 5.7.1 Relaying denied"),
])
def test_library_replies_get_enhanced_codes(line: str, expected: str) -> None:
    assert replies.with_enhanced_code(line) == expected


def test_recipient_checks_are_answered_from_memory_for_a_few_seconds() -> None:
    """policy.RecipientCache: one directory read per address and `ttl`, then answered from memory; an
    answer older than `ttl` is read again (a mailbox closed meanwhile is refused from then on)."""
    import asyncio

    from mailserver import policy

    class Directory:
        def __init__(self) -> None:
            self.reads: list[str] = []
            self.open = {"louis@caducee.test"}

        def mailbox_by_address(self, address: str) -> object | None:
            self.reads.append(address)
            return object() if address in self.open else None

    directory = Directory()
    cache = policy.RecipientCache(directory, ttl=60, size=2)
    local = frozenset({"caducee.test"})

    async def check(address: str) -> object:
        return await policy.check_recipient_cached(address, local, cache)

    assert not cache.known("louis@caducee.test")
    assert asyncio.run(check("louis@caducee.test")) is None
    assert cache.known("louis@caducee.test")
    assert asyncio.run(check("louis@caducee.test")) is None
    assert asyncio.run(check("nobody@caducee.test")) == policy.replies.UNKNOWN_RECIPIENT
    assert asyncio.run(check("nobody@caducee.test")) == policy.replies.UNKNOWN_RECIPIENT
    assert directory.reads == ["louis@caducee.test", "nobody@caducee.test"]
    asyncio.run(check("third@caducee.test"))  # beyond `size`: emptied, then refilled
    assert not cache.known("louis@caducee.test")
    directory.open.clear()
    cache.ttl = 0  # expired answers are read again: the closed mailbox is refused
    assert asyncio.run(check("louis@caducee.test")) == policy.replies.UNKNOWN_RECIPIENT


def test_idle_sessions_are_closed_and_commands_move_the_deadline(running: Running) -> None:
    h = running.handler
    short = SubmissionHandler(dataclasses.replace(h.settings, timeout=0.6), h.authenticator, h.directory, h.queue,
                              h.audit)
    tls = server_context(running.state / "pki" / "server" / "server.pem", running.state / "pki" / "server" / "server.key")
    server = asyncio.run_coroutine_threadsafe(running.loop.create_server(
        make_protocol_factory(short, tls, implicit_tls=True), "127.0.0.1", 0, ssl=tls), running.loop).result(10)
    try:
        other = Running(running.loop, short, server, server.sockets[0].getsockname()[1], running.state, running.demo)
        busy, idle = other.client(), other.client()
        port = busy.sock.getsockname()[1]
        session = next(c for c in short.connections if c.session is not None and c.session.peer[1] == port)
        timer = session._timeout_handle
        assert busy.noop()[0] == 250
        # A command moves the deadline of the session's one timer; aiosmtpd scheduled a new timer each time.
        assert session._timeout_handle is timer
        started = time.monotonic()
        while time.monotonic() - started < 1.5:  # 2.5 timeouts long, a command every 0.1 s
            assert busy.noop()[0] == 250
            time.sleep(0.1)
        assert busy.noop()[0] == 250
        with pytest.raises(smtplib.SMTPServerDisconnected):
            idle.noop()
        busy.quit()
    finally:
        asyncio.run_coroutine_threadsafe(shutdown(short, [server], grace=1), running.loop).result(10)


def test_a_multi_line_reply_is_written_at_once(running: Running) -> None:
    """EHLO's lines go out in one TLS record (aiosmtpd wrote one per line, each its own send())."""
    import socket

    ctx = ssl.create_default_context(cafile=str(running.state / running.demo["ca_bundle"]))
    with ctx.wrap_socket(socket.create_connection(("localhost", running.port), timeout=10),
                         server_hostname="localhost") as s:
        assert s.recv(65536).startswith(b"220 ")
        s.sendall(b"EHLO unit.test\r\n")
        time.sleep(0.3)  # every line has arrived, whichever way it was written
        reply = s.recv(65536)  # the plaintext of one TLS record
        lines = reply.split(b"\r\n")
        assert lines[0] == b"250-localhost" and lines[-2:] == [b"250 ENHANCEDSTATUSCODES", b""], reply
        assert all(line.startswith(b"250-") for line in lines[1:-2]) and len(lines) > 5
        s.sendall(b"NOOP\r\n")
        assert s.recv(65536) == b"250 2.0.0 OK\r\n"


def test_login_builds_no_deprecation_warning(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mail.log"):
        s = running.client(0)
        assert s.noop()[0] == 250
        s.quit()
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]


def _authenticator(state: Path, ttl: float) -> tuple[Any, list[str]]:
    from caducee.config import load
    from mailserver.auth import CertificateAuthenticator

    cfg = load(state)
    directory = DirectoryStore(make_engine(cfg.database_url))
    reads: list[str] = []
    read = directory.login_view
    directory.login_view = lambda national_id: (reads.append(national_id), read(national_id))[1]  # type: ignore[method-assign]
    validator = CertificateValidator.from_files(cfg.path(cfg.tls.trust_anchors), [cfg.path(p) for p in cfg.tls.crls])
    return CertificateAuthenticator(validator, directory, ttl=ttl), reads


def _der(state: Path, demo: dict[str, Any], i: int) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    pem = (state / demo["identities"][i]["cert"]).read_bytes()
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def test_a_login_seen_a_moment_ago_is_answered_from_memory(state: Path) -> None:
    from mailserver.auth import LoginRefused

    demo = json.loads((state / "demo" / "demo.json").read_text())
    auth, reads = _authenticator(state, ttl=60)
    der = _der(state, demo, 0)
    assert auth.from_memory(der) is None  # never looked up: the caller reads in a thread
    first = auth.authenticate(der)
    again = auth.from_memory(der)
    assert again is not None and (again.principal, again.mailboxes) == (first.principal, first.mailboxes)
    assert reads == [first.principal.national_id]  # one directory read for both
    with pytest.raises(LoginRefused, match="authzid_not_allowed"):  # every check still applies
        auth.from_memory(der, "someone@elsewhere.test")
    with pytest.raises(LoginRefused, match="no_client_certificate"):
        auth.from_memory(None)
    # A CRL file that changed is read again first, by `authenticate`.
    crl = auth.validator._crl_files[0].path
    os.utime(crl, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert auth.from_memory(der) is None
    auth.authenticate(der)
    assert auth.from_memory(der) is not None
    # Past the ttl, the directory is read again.
    brief, brief_reads = _authenticator(state, ttl=0.0)
    brief.authenticate(der)
    assert brief.from_memory(der) is None and len(brief_reads) == 1


def test_a_revoked_certificate_is_refused_at_its_next_login_even_from_memory(tmp_path: Path) -> None:
    from crypto.pki import DevPKI
    from mailserver.auth import LoginRefused

    init_state(tmp_path, demo=True, say=lambda _: None)
    demo = json.loads((tmp_path / "demo" / "demo.json").read_text())
    auth, _ = _authenticator(tmp_path, ttl=60)
    der = _der(tmp_path, demo, 1)
    auth.authenticate(der)
    assert auth.from_memory(der) is not None
    DevPKI.create_or_load(tmp_path / "pki").revoke(tmp_path / demo["identities"][1]["cert"])
    assert auth.from_memory(der) is None  # its CA's CRL changed: read in a thread
    with pytest.raises(LoginRefused, match="certificate_revoked"):
        auth.authenticate(der)
    with pytest.raises(LoginRefused, match="certificate_revoked"):
        auth.from_memory(der)
