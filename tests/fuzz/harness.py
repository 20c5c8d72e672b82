"""Drivers and checks shared by the Hypothesis properties (`tests/fuzz`) and the atheris targets (`fuzz/`).

A driver runs one real protocol instance in process on input bytes and returns what it answered; a check
returns the problems found in a run (an empty list: the property holds). No socket, no database, no
certificate: the SMTP protocol runs on a fake asyncio transport, the IMAP protocol on Twisted's
`StringTransport`, with in-memory stand-ins for the directory, the queue and the mailbox store.

What every check asserts, whatever the input: the peer only ever gets well-formed replies of its protocol
(never exception text), the protocol does not hang, no exception escapes to the connection boundary, and
the state it keeps stays consistent (SMTP: the envelope only ever holds a sender the user owns and
recipients the policy accepts, however the command was written).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import itertools
import logging
import re
import ssl
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import TLSSetupException

from crypto.validation import CertificateKind, ValidatedCertificate
from directory.identifiers import PrincipalKind
from directory.model import Mailbox, MailboxType, Principal
from mailserver import policy
from mailserver.auth import Identity, LoginRefused
from mailserver.smtp_protocol import CaduceeSMTP
from mailserver.smtp_server import (
    SubmissionHandler,
    SubmissionSettings,
    make_protocol_factory,
)

HANG_SECONDS = 5.0  # a run that does not settle within this time is a hang


def examples(default: int) -> int:
    """Hypothesis examples per property: `default` in the suite, $CADUCEE_FUZZ_EXAMPLES for a longer run."""
    import os

    return int(os.environ.get("CADUCEE_FUZZ_EXAMPLES", default))

# ---------------------------------------------------------------------------------------------------------
# Exception text: what must never reach a peer
# ---------------------------------------------------------------------------------------------------------

_EXCEPTION_TEXT = re.compile(rb"Traceback|\b[A-Za-z_]\w*(?:Error|Exception)\b|File \"|\bline \d+, in\b")


def exception_text(data: bytes) -> bytes | None:
    m = _EXCEPTION_TEXT.search(data)
    return m.group(0) if m else None


# ---------------------------------------------------------------------------------------------------------
# SMTP: the submission listener (mailserver.smtp_server over mailserver.smtp_protocol)
# ---------------------------------------------------------------------------------------------------------

LOCAL_DOMAIN = "caducee.localhost"
SENDER = "camille.martin@caducee.localhost"
SECOND_ADDRESS = "cabinet.martin@caducee.localhost"
KNOWN_RECIPIENTS = frozenset({"louis.bernard@caducee.localhost", SENDER, SECOND_ADDRESS})
TRUSTED_DOMAIN = "operateur-b.test"
SMTP_COMMANDS = (b"EHLO", b"HELO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"QUIT", b"VRFY", b"EXPN",
                 b"HELP", b"AUTH", b"STARTTLS", b"BDAT")


def _identity() -> Identity:
    principal = Principal(1, PrincipalKind.PERSON, "810000000001", "Camille Martin")
    mailboxes = (Mailbox(1, SENDER, MailboxType.PER, 1), Mailbox(2, SECOND_ADDRESS, MailboxType.CAB, 1))
    cert = ValidatedCertificate(
        kind=CertificateKind.PERSON, national_id="810000000001", subject_dn="CN=Camille Martin,C=FR",
        issuer_dn="CN=AC,C=FR", serial=1, not_after=dt.datetime(2099, 1, 1, tzinfo=dt.UTC),
        fingerprint_sha256="0" * 64, emails=(SENDER,))
    return Identity(principal, mailboxes, cert)


IDENTITY = _identity()


class _Authenticator:
    """Every certificate (or none) logs in as IDENTITY, except the authzid "refuse"."""

    def authenticate(self, cert_der: bytes | None, authzid: str = "") -> Identity:
        if authzid == "refuse" or (authzid and IDENTITY.mailbox_for(authzid) is None):
            raise LoginRefused("authzid_not_allowed")
        return IDENTITY

    def from_memory(self, cert_der: bytes | None, authzid: str = "") -> Identity | None:
        return None  # always the thread path: `authenticate`


class _Directory:
    def mailbox_by_address(self, address: str) -> object | None:
        return object() if address.lower() in KNOWN_RECIPIENTS else None


class _Trust:
    def lookup(self, domain: str) -> object | None:
        return object() if domain == TRUSTED_DOMAIN else None

    def is_trusted(self, domain: str, subject: object) -> bool:
        return False

    def is_operator(self, subject: object) -> bool:
        return False


class _Queue:
    def __init__(self) -> None:
        self.queued: list[tuple[Any, bytes]] = []

    async def enqueue(self, envelope: Any, data: bytes, *, queue_id: str | None = None, also: Any = None) -> str:
        self.queued.append((envelope, data))
        return queue_id or "Q"


class _Audit:
    def record(self, event: Any, **kwargs: Any) -> None:
        pass


class _RecordingHandler(SubmissionHandler):
    """The real submission handler, recording every exception that reached aiosmtpd's boundary."""

    def __init__(self) -> None:
        settings = SubmissionSettings(hostname="mx.caducee.localhost", local_domains=frozenset({LOCAL_DOMAIN}),
                                      max_message_size=64 * 1024, max_recipients=5, timeout=300)
        super().__init__(settings, _Authenticator(), _Directory(), _Queue(), _Audit(), _Trust())  # type: ignore[arg-type]
        self.exceptions: list[BaseException] = []

    async def handle_exception(self, error: Exception) -> str:
        self.exceptions.append(error)
        return await super().handle_exception(error)


class FakeTransport(asyncio.Transport):
    """Just enough of an asyncio transport: what the server writes is kept in `out`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.BaseProtocol) -> None:
        super().__init__(extra={"peername": ("192.0.2.10", 50000), "sockname": ("127.0.0.1", 465)})
        self._loop = loop
        self.protocol = protocol
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closed:
            self.out += bytes(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def _force_close(self, exc: BaseException | None) -> None:  # what asyncio's SSL layer calls on errors
        self.close()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return not self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    def feed(self, data: bytes) -> None:
        proto = self.protocol
        if isinstance(proto, asyncio.BufferedProtocol):
            view = memoryview(data)
            while view:
                buf = proto.get_buffer(len(view))
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                proto.buffer_updated(n)
                view = view[n:]
        else:
            proto.data_received(data)  # type: ignore[attr-defined]


@dataclass
class SmtpRun:
    lines: list[bytes]  # what was fed, one element per write
    output: bytes
    answers: list[tuple[bytes, bytes, bool, bool]]  # (line, reply bytes, was inside DATA, closed before)
    serial: bool
    hung: bool = False
    closed_by_server: bool = False
    starttls_started: bool = False
    exceptions: list[BaseException] = field(default_factory=list)
    task_error: BaseException | None = None
    envelope: SmtpEnvelope | None = None
    queued: list[tuple[Any, bytes]] = field(default_factory=list)


class SmtpDriver:
    """One submission protocol per run, on a private event loop, with the real handler and fakes around it.

    `starttls_listener=False` is the implicit-TLS listener (RFC 8314: the transport is taken as TLS, so AUTH
    and mail commands are reachable); `True` is the STARTTLS listener before its handshake (RFC 3207: only
    EHLO/HELO/NOOP/QUIT/STARTTLS); a STARTTLS it accepts ends the run, since what follows is TLS.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # never completes a handshake here

    def close(self) -> None:
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, lines: Sequence[bytes], *, starttls_listener: bool = False, serial: bool = True) -> SmtpRun:
        handler = _RecordingHandler()
        factory = make_protocol_factory(handler, self.tls, implicit_tls=not starttls_listener)

        async def build() -> CaduceeSMTP:  # aiosmtpd and asyncio streams take the running loop at construction
            return factory()  # type: ignore[no-any-return]

        proto = self.loop.run_until_complete(build())
        transport = FakeTransport(self.loop, proto)
        proto.connection_made(transport)
        task: asyncio.Task[None] = proto._handler_coroutine  # type: ignore[assignment]
        result = SmtpRun(list(lines), b"", [], serial)
        result.hung = not self._settle(proto, task)
        if serial:  # one physical line per write, so that each reply is attributed to its line
            lines = lines_of(b"".join(lines))
        for line in lines:
            if result.hung or transport.closed or proto._tls_protocol is not None:
                break
            before, in_data = len(transport.out), proto.in_data
            transport.feed(line)
            if serial:
                result.hung = not self._settle(proto, task)
                result.answers.append((line, bytes(transport.out[before:]), in_data, False))
        if not serial and not result.hung:
            result.hung = not self._settle(proto, task)
        result.starttls_started = proto._tls_protocol is not None
        result.closed_by_server = transport.closed
        result.envelope = proto.envelope
        if not transport.closed:  # the client hangs up: end of stream, then the connection is gone
            current = transport.protocol
            if hasattr(current, "eof_received"):
                current.eof_received()
            transport.close()
        deadline = time.monotonic() + HANG_SECONDS
        while not task.done() and time.monotonic() < deadline:
            self.loop.run_until_complete(asyncio.sleep(0.001))
        if not task.done():
            result.hung = True
            task.cancel()
            self.loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
        elif not task.cancelled() and task.exception() is not None:
            result.task_error = task.exception()
        result.output = bytes(transport.out)
        result.exceptions = list(handler.exceptions)
        result.queued = list(handler.queue.queued)  # type: ignore[attr-defined]
        return result

    def _settle(self, proto: CaduceeSMTP, task: asyncio.Task[None]) -> bool:
        """Run the loop until the protocol waits for the client (or is done). False: it did not (a hang)."""
        deadline = time.monotonic() + HANG_SECONDS
        spins = 0
        while True:
            if task.done():
                return True
            reader = proto._reader
            if reader is not None and reader._waiter is not None:  # type: ignore[attr-defined]
                return True  # blocked reading: waiting for the client
            if proto._tls_protocol is not None:
                return True  # STARTTLS accepted: waiting for the client's TLS handshake (never comes here)
            if time.monotonic() > deadline:
                return False
            spins += 1
            self.loop.run_until_complete(asyncio.sleep(0 if spins < 100 else 0.001))


_SMTP_REPLY = re.compile(rb"([2-5][0-9][0-9])([ -])(.*)", re.DOTALL)
_CLOSING_CODES = (b"221", b"421", b"502", b"554")


def smtp_replies(output: bytes) -> tuple[list[tuple[bytes, bytes, bytes]], list[str]]:
    """Split server output into (code, separator, text) lines; problems with the framing."""
    problems: list[str] = []
    if not output:
        return [], problems
    if not output.endswith(b"\r\n"):
        problems.append(f"output does not end with CRLF: {output[-60:]!r}")
    lines = output.split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()
    parsed: list[tuple[bytes, bytes, bytes]] = []
    for line in lines:
        m = _SMTP_REPLY.fullmatch(line)
        if m is None:
            problems.append(f"not an SMTP reply line (RFC 5321 §4.2): {line[:120]!r}")
            continue
        code, sep, text = m.groups()
        if any((b < 0x20 and b != 0x09) or b == 0x7F for b in text):  # RFC 5321 §4.2 textstring
            problems.append(f"control character in a reply line: {line[:120]!r}")
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"reply line is not UTF-8: {line[:120]!r}")
        parsed.append((code, sep, text))
    for (code, sep, _), nxt in itertools.pairwise(parsed):
        if sep == b"-" and nxt[0] != code:
            problems.append(f"multiline reply {code!r} continued by {nxt[0]!r}")
    if parsed and parsed[-1][1] == b"-":
        problems.append("output ends inside a multiline reply")
    return parsed, problems


def _final_replies(data: bytes) -> list[bytes]:
    parsed, _ = smtp_replies(data)
    return [code for code, sep, _ in parsed if sep == b" "]


def check_smtp(run: SmtpRun) -> list[str]:
    """Problems in one SMTP run (see the module docstring)."""
    problems: list[str] = []
    if run.hung:
        problems.append("the protocol did not settle: hang")
    for exc in run.exceptions:
        if run.starttls_started and isinstance(exc, TLSSetupException):
            continue  # the client hung up during the TLS handshake: aiosmtpd's path for it (no reply)
        problems.append(f"exception at the connection boundary: {_where(exc)}")
    if run.task_error is not None:
        problems.append(f"the session task died: {_where(run.task_error)}")
    parsed, framing = smtp_replies(run.output)
    problems += framing
    if not parsed or parsed[0][0] != b"220":
        problems.append(f"no 220 greeting first: {run.output[:80]!r}")
    if (found := exception_text(run.output)) is not None:
        problems.append(f"exception text sent to the client: {found!r}")
    finals = [code for code, sep, _ in parsed if sep == b" "]
    if b"221" in finals and finals.index(b"221") != len(finals) - 1:
        problems.append("a reply after 221 (QUIT)")
    if run.closed_by_server and not run.starttls_started and finals and finals[-1] not in _CLOSING_CODES:
        problems.append(f"the server closed the connection after a {finals[-1]!r} reply")
    if run.serial:
        for line, answer, in_data, _ in run.answers:
            complete = line.endswith(b"\n")
            count = len(_final_replies(answer))
            if not complete:
                if count and not in_data:
                    problems.append(f"a reply to an incomplete line {line[:80]!r}")
                continue
            if in_data:
                if count > 1:
                    problems.append(f"{count} replies to one DATA line {line[:80]!r}")
            elif count != 1 and not (count == 0 and run.starttls_started):
                problems.append(f"{count} replies to the command line {line[:80]!r}: {answer[:200]!r}")
    problems += _check_envelope(run)
    return problems


def _check_envelope(run: SmtpRun) -> list[str]:
    """Whatever the syntax used, the transaction holds only what the policy allows."""
    problems: list[str] = []
    env = run.envelope
    if env is not None:
        given = bool(getattr(env, "mail_given", False))
        if env.rcpt_tos and not given:
            problems.append("recipients without a MAIL command")
        if given and (env.mail_from is None or not IDENTITY.owns(env.mail_from)):
            problems.append(f"MAIL accepted for a sender the user does not own: {env.mail_from!r}")
        dsn = getattr(env, "rcpt_dsn", {}) or {}
        if set(dsn) != set(env.rcpt_tos):
            problems.append("RCPT DSN parameters out of step with the recipients")
        for rcpt in env.rcpt_tos:
            if policy.check_recipient(rcpt, frozenset({LOCAL_DOMAIN}), _Directory(), _Trust()) is not None:
                problems.append(f"RCPT accepted for a recipient the policy refuses: {rcpt!r}")
    for queued, data in run.queued:
        if not IDENTITY.owns(queued.mail_from):
            problems.append(f"queued from a sender the user does not own: {queued.mail_from!r}")
        for r in queued.recipients:
            if policy.check_recipient(r.address, frozenset({LOCAL_DOMAIN}), _Directory(), _Trust()) is not None:
                problems.append(f"queued for a recipient the policy refuses: {r.address!r}")
        if policy.has_bare_line_ending(data):
            problems.append("queued a message with a bare CR or LF")
    return problems


def _where(exc: BaseException) -> str:
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    place = " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}:{f.name}" for f in reversed(frames[-4:]))
    return f"{type(exc).__name__}: {str(exc)[:200]} at {place}"


# ---------------------------------------------------------------------------------------------------------
# IMAP: mailserver.imap_server.IMAPServer on Twisted's StringTransport
# ---------------------------------------------------------------------------------------------------------

IMAP_ADDRESS = "dr.martin@caducee.localhost"
IMAP_MAILBOX_ID = 1
IMAP_MESSAGES = (
    (b"From: Labo <labo@operateur-b.test>\r\nTo: dr.martin@caducee.localhost\r\nSubject: =?utf-8?q?R=C3=A9sultats?=\r\n"
    b"Message-ID: <r1@operateur-b.test>\r\nDate: Mon, 6 Jan 2025 09:00:00 +0100\r\n"
    b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    b"Bonjour.\r\n--b1\r\nContent-Type: application/pdf; name=cr.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"JVBERi0xLjQK\r\n--b1--\r\n"),
    b"From: x@y\r\nSubject: plain\r\n\r\nbody\r\n",
)


def ensure_reactor() -> tuple[Any, asyncio.AbstractEventLoop]:
    """Twisted's asyncio reactor, running in a daemon thread (installed here if nobody did).

    Same arrangement as the IMAP tests (tests/mailserver/test_imap_server.py): whoever comes first installs
    it, the other reuses it.
    """
    from twisted.internet import asyncioreactor

    reactor: Any
    if "twisted.internet.reactor" in sys.modules:
        from twisted.internet import reactor

        if not isinstance(reactor, asyncioreactor.AsyncioSelectorReactor):
            raise RuntimeError("a non-asyncio Twisted reactor is installed")
        loop = reactor._asyncioEventloop
    else:
        loop = asyncio.new_event_loop()
        asyncioreactor.install(loop)
        from twisted.internet import reactor
    if not reactor.running:
        def run() -> None:
            asyncio.set_event_loop(loop)
            reactor.run(installSignalHandlers=False)

        thread = threading.Thread(target=run, name="twisted-reactor", daemon=True)
        thread.start()
        started = threading.Event()
        reactor.callFromThread(started.set)
        if not started.wait(10):
            raise RuntimeError("the Twisted reactor did not start")
        _started_here.append((reactor, loop, thread))
    return reactor, loop


_started_here: list[tuple[Any, asyncio.AbstractEventLoop, threading.Thread]] = []


def stop_reactor() -> None:
    """Stop the reactor if `ensure_reactor` started it (a reactor cannot be restarted: once per process)."""
    while _started_here:
        reactor, loop, thread = _started_here.pop()
        reactor.callFromThread(reactor.stop)
        thread.join(10)
        if not thread.is_alive():
            loop.close()


class _ErrorLog(logging.Handler):
    """Collects the ERROR records of the IMAP server (internal errors carry their traceback here)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class ImapRun:
    lines: list[bytes]
    output: bytes
    answers: list[tuple[bytes, bytes, bool]]  # (line, output after it, fed as a command line)
    serial: bool
    hung: bool = False
    disconnected: bool = False
    starttls_started: bool = False
    internal_errors: int = 0
    errors: list[str] = field(default_factory=list)


class ImapDriver:
    """One IMAP session per run against a fresh in-memory store holding INBOX with two messages.

    `state` chooses where the fuzzed lines start: "unauth" (implicit-TLS listener, not logged in),
    "starttls" (STARTTLS listener before TLS), "auth" (after AUTHENTICATE EXTERNAL) or "select" (INBOX
    selected). All protocol work runs on the reactor thread; this thread only feeds and waits.
    """

    PRELUDES: ClassVar[dict[str, tuple[bytes, ...]]] = {
        "unauth": (),
        "starttls": (),
        "auth": (b"p1 AUTHENTICATE EXTERNAL =\r\n",),
        "select": (b"p1 AUTHENTICATE EXTERNAL =\r\n", b"p2 SELECT INBOX\r\n"),
    }

    def __init__(self) -> None:
        from twisted.internet.threads import blockingCallFromThread

        self.reactor, self.loop = ensure_reactor()
        self._call = lambda fn, *a: blockingCallFromThread(self.reactor, fn, *a)
        self.log = _ErrorLog()
        logging.getLogger("mailserver.imap_server").addHandler(self.log)

    def close(self) -> None:
        logging.getLogger("mailserver.imap_server").removeHandler(self.log)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, lines: Sequence[bytes], *, state: str = "unauth", serial: bool = True) -> ImapRun:
        self.log.records.clear()
        store = self._store()
        proto, transport = self._call(self._connect, store, state == "starttls")
        result = ImapRun(list(lines), b"", [], serial)
        try:
            for line in self.PRELUDES[state]:
                self._call(proto.dataReceived, line)
                if not self._settle(proto, transport):
                    result.hung = True
                    return self._finish(result, proto, transport)
            prelude_end = len(transport.value())
            if not self._settle(proto, transport):
                result.hung = True
            if serial:  # one line (CRLF, RFC 3501 §2.2) per write, so that each answer is attributed to its line
                lines = [piece for piece in re.split(b"(?<=\r\n)", b"".join(lines)) if piece]
            for line in lines:
                if result.hung or transport.disconnecting or transport.tls_started:
                    break
                before = len(transport.value())
                as_command = self._call(lambda: proto.parseState == "command" and proto.line_mode == 1)
                self._call(proto.dataReceived, line)
                if serial:
                    result.hung = not self._settle(proto, transport)
                    result.answers.append((line, transport.value()[before:], as_command))
            if not serial and not result.hung:
                result.hung = not self._settle(proto, transport)
            result.output = transport.value()[prelude_end:]
            return self._finish(result, proto, transport)
        finally:
            self._call(self._disconnect, proto)

    def _finish(self, result: ImapRun, proto: Any, transport: Any) -> ImapRun:
        if not result.output:
            result.output = transport.value()
        result.disconnected = bool(transport.disconnecting)
        result.starttls_started = bool(transport.tls_started)
        result.internal_errors = proto.factory.metrics["internal_errors"]
        result.errors = [self._describe(r) for r in self.log.records]
        return result

    @staticmethod
    def _describe(record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += " — " + _where(record.exc_info[1])
        return text

    def _store(self) -> Any:
        from tests.mailserver.memstore import MemoryMailStore

        store = MemoryMailStore()
        inbox = store.add_mailbox(IMAP_MAILBOX_ID)
        when = dt.datetime(2025, 1, 6, 8, 0, tzinfo=dt.UTC)

        async def seed() -> None:
            for i, raw in enumerate(IMAP_MESSAGES):
                await store.append(inbox.id, raw, ("\\Seen",) if i else (), when)
            await store.create_folder(IMAP_MAILBOX_ID, "Archives")

        asyncio.run_coroutine_threadsafe(seed(), self.loop).result(10)
        return store

    def _connect(self, store: Any, starttls: bool) -> tuple[Any, Any]:
        from mailserver.imap_server import ImapLogin, build_imap_factory

        login = ImapLogin(mailbox_id=IMAP_MAILBOX_ID, address=IMAP_ADDRESS, principal="810000000002")

        async def authenticate(cert_der: bytes | None, authzid: str) -> ImapLogin | None:
            return login if authzid in ("", IMAP_ADDRESS) else None

        factory = build_imap_factory(store, authenticate, _ImapAudit(), object(), implicit_tls=not starttls,
                                     max_append_size=64 * 1024, hostname="imap.caducee.localhost")
        proto = factory.buildProtocol(None)
        transport = _transport_class()()
        proto.makeConnection(transport)
        return proto, transport

    @staticmethod
    def _disconnect(proto: Any) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        if not proto._closed:
            proto.connectionLost(Failure(ConnectionDone()))

    def _settle(self, proto: Any, transport: Any) -> bool:
        deadline = time.monotonic() + HANG_SECONDS
        pause = 0.0
        while True:
            if self._call(self._quiescent, proto, transport):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(pause)
            pause = min(0.002, pause + 0.0002)

    @staticmethod
    def _quiescent(proto: Any, transport: Any) -> bool:
        if transport.disconnecting or transport.tls_started or proto._closed:
            return True
        if proto.paused or proto.delimiter in proto._buffer and proto.line_mode == 1:
            return False
        if proto.line_mode == 0:
            return True  # reading a literal: waiting for its bytes
        # Waiting for the client: no command running, or the rest of a command after a literal ("pending"),
        # a SASL response, or the DONE that ends IDLE.
        return proto._in_flight is None or proto.parseState in ("pending", "sasl", "idle")


@functools.cache
def _transport_class() -> type:
    """One class for the process (zope.interface keeps registrations per class: one per run would leak)."""
    from twisted.internet.testing import StringTransport

    class StartTLSRecorder(StringTransport):
        """A StringTransport whose startTLS only records the call (what follows would be TLS)."""

        tls_started = False

        def startTLS(self, ctx: Any) -> None:
            self.tls_started = True

    return StartTLSRecorder


class _ImapAudit:
    def record(self, event: Any, **kwargs: Any) -> None:
        pass


_IMAP_TAG = re.compile(rb"[\x21-\x7e]+")


def imap_lines(output: bytes) -> tuple[list[bytes], list[str]]:
    """Response lines (literals folded into their line, RFC 3501 §4.3), and framing problems."""
    problems: list[str] = []
    lines: list[bytes] = []
    pos, current = 0, b""
    while pos < len(output):
        end = output.find(b"\r\n", pos)
        if end < 0:
            problems.append(f"output does not end with CRLF: {output[pos:pos + 80]!r}")
            break
        piece = output[pos:end]
        pos = end + 2
        m = re.search(rb"\{(\d+)\}\Z", piece)
        if m is not None:
            size = int(m.group(1))
            current += piece + b"\r\n" + output[pos:pos + size]
            pos += size
            continue
        current += piece
        lines.append(current)
        current = b""
    for line in lines:
        head = line.split(b"{", 1)[0]
        if b"\r" in head or b"\n" in head:
            problems.append(f"bare CR or LF in a response line: {line[:120]!r}")
    return lines, problems


def check_imap(run: ImapRun) -> list[str]:
    problems: list[str] = []
    if run.hung:
        problems.append("the protocol did not settle: hang")
    if run.internal_errors:
        problems.append(f"{run.internal_errors} internal error(s) (NO [SERVERBUG])")
    problems += [f"logged error: {e}" for e in run.errors]
    lines, framing = imap_lines(run.output)
    problems += framing
    if (found := exception_text(b"\n".join(line.split(b"{", 1)[0] for line in lines))) is not None:
        problems.append(f"exception text sent to the client: {found!r}")
    for line in lines:
        if line.startswith((b"* ", b"+ ")) or line == b"+":
            continue
        tag, _, rest = line.partition(b" ")
        if not _IMAP_TAG.fullmatch(tag) or not rest.startswith((b"OK", b"NO", b"BAD")):
            problems.append(f"not an IMAP response line (RFC 3501 §7): {line[:120]!r}")
    if run.serial:
        for line, answer, as_command in run.answers:
            if not as_command or not line.endswith(b"\r\n"):
                continue
            got, _ = imap_lines(answer)
            if not got:
                problems.append(f"no response to the command line {line[:80]!r}")
                continue
            last = got[-1]
            tag = line.rstrip(b"\r\n").split(b" ", 1)[0]
            if last.startswith((b"+", b"* BAD", b"* BYE")):
                continue
            if not (last.startswith(tag + b" ") and tag):
                problems.append(f"command {line[:80]!r} not completed with its tag: {last[:120]!r}")
    return problems


# ---------------------------------------------------------------------------------------------------------
# Pure parsers: DSN / MDN, the whitelist, directory rows
# ---------------------------------------------------------------------------------------------------------


def check_reports(data: bytes) -> list[str]:
    """parse_dsn / parse_mdn / report_kind / mdn_request: a value or None, never an exception."""
    from mailserver import dsn, mdn

    problems: list[str] = []
    for name, fn in (("parse_dsn", dsn.parse_dsn), ("parse_mdn", mdn.parse_mdn), ("report_kind", mdn.report_kind),
                     ("mdn_request", mdn.mdn_request)):
        try:
            fn(data)
        except Exception as exc:  # noqa: BLE001 - the property: nothing is raised
            problems.append(f"{name} raised {_where(exc)}")
    return problems


def check_whitelist(data: bytes) -> list[str]:
    """parse_whitelist: a `Whitelist` or a `TrustListError` listing problems, nothing else."""
    from mailserver import trust

    try:
        wl = trust.parse_whitelist(data)
    except trust.TrustListError as exc:
        return [] if exc.problems and all(isinstance(p, str) for p in exc.problems) else ["empty TrustListError"]
    except Exception as exc:  # noqa: BLE001 - the property: nothing else is raised
        return [f"parse_whitelist raised {_where(exc)}"]
    problems = []
    if not wl.entries:
        problems.append("a whitelist without entries was accepted")
    for entry in wl.entries:
        try:
            trust.parse_dn(entry.operator_dn)
            if trust.normalise_domain(entry.domain) != entry.domain:
                problems.append(f"domain not normalised: {entry.domain!r}")
        except ValueError as exc:
            problems.append(f"an accepted entry does not parse again: {exc}")
    return problems


class _Loader:
    def __init__(self, table: Any) -> None:
        self.name = table.name
        self.rows: list[tuple[Any, ...]] = []
        self.append = self.rows.append

    def flush_if_full(self) -> None:
        pass

    def flush(self) -> None:
        pass


@dataclass
class DirectoryRun:
    header: Any
    lines: int
    fed: int
    rows: dict[str, list[tuple[Any, ...]]]
    report: Any


DIRECTORY_SAMPLES = {  # the national files in tests/fixtures/rpps: their header and real lines seed the fuzzing
    "mssante": "Extraction_Correspondance_MSSante_sample.txt",
    "activity": "PS_LibreAcces_Personne_activite_56cols_role_sample.txt",
    "activity52": "PS_LibreAcces_Personne_activite_52cols_sample.txt",
    "savoir_faire": "PS_LibreAcces_SavoirFaire_sample.txt",
    "diploma": "PS_LibreAcces_Dipl_AutExerc_sample.txt",
}


def directory_sample(kind: str) -> tuple[str, list[bytes]]:
    """The header line and the data lines of a sample national file."""
    from pathlib import Path

    path = Path(__file__).parent.parent / "fixtures" / "rpps" / DIRECTORY_SAMPLES[kind]
    first, *rest = lines_of(path.read_bytes())
    return first.decode("utf-8-sig"), rest


def run_directory_rows(kind: Any, raw_lines: Sequence[bytes]) -> DirectoryRun:
    """Feed data lines (bytes, as read from the file) to the parser of a file kind, as an import does.
    `kind` is a parsed `Header`, or a key of DIRECTORY_SAMPLES (that sample's header)."""
    from directory.importers import formats, parsers, runner

    header = formats.parse_header(directory_sample(kind)[0]) if isinstance(kind, str) else kind
    report = parsers.Report()
    loaders = {t.name: _Loader(t) for t in runner.staging_tables(header.kind)}
    parser = runner.make_parser(header, report, loaders, frozenset({LOCAL_DOMAIN}))  # type: ignore[arg-type]
    lines, _ = runner.read_lines(iter(raw_lines), header.width, parser, report, 0, lambda *_: None)
    parser.finish()
    return DirectoryRun(header, lines, len(raw_lines), {n: l.rows for n, l in loaders.items()}, report)


def check_directory_rows(kind: Any, raw_lines: Sequence[bytes]) -> list[str]:
    """Every line is staged or rejected with its number; staged rows fit their table and hold no NUL
    (PostgreSQL text cannot store one: a single NUL would abort the whole COPY of an import)."""
    from directory.importers import staging

    try:
        run = run_directory_rows(kind, raw_lines)
    except Exception as exc:  # noqa: BLE001 - the property: nothing is raised
        return [f"read_lines raised {_where(exc)}"]
    problems: list[str] = []
    last_line = 1 + len(raw_lines)
    widths = {t.name: len(staging.loaded_columns(t)) for t in staging.staging_metadata.tables.values()}
    for name, rows in run.rows.items():
        for row in rows:
            if len(row) != widths[name]:
                problems.append(f"{name}: a row of {len(row)} values for {widths[name]} columns")
            line_no = row[0]
            if not isinstance(line_no, int) or not 2 <= line_no <= last_line:
                problems.append(f"{name}: row with line number {line_no!r} outside 2..{last_line}")
            for value in row[1:]:
                if isinstance(value, str) and "\x00" in value:
                    problems.append(f"{name}: line {line_no} stages a NUL character")
                    break
    for issue in run.report.errors + run.report.warning_samples:
        if not 2 <= issue.line <= last_line or not issue.message:
            problems.append(f"issue without a valid line number: {issue}")
    if run.report.rejected > run.lines:
        problems.append(f"{run.report.rejected} rejections for {run.lines} lines")
    return problems


def lines_of(data: bytes) -> list[bytes]:
    """Split bytes into lines as a binary file iterator does: on b"\\n" only, each line keeping it."""
    return [piece for piece in re.split(b"(?<=\n)", data) if piece]


def chunked(items: Sequence[bytes], sizes: Iterator[int]) -> list[bytes]:
    """Join consecutive items into writes of the given sizes (pipelining)."""
    out: list[bytes] = []
    i = 0
    for n in sizes:
        if i >= len(items):
            break
        out.append(b"".join(items[i:i + max(1, n)]))
        i += max(1, n)
    if i < len(items):
        out.append(b"".join(items[i:]))
    return out

