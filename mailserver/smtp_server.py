"""SMTP submission (RFC 6409) over TLS with certificate login (SASL EXTERNAL, RFC 4422 Appendix A).

A thin shell over aiosmtpd: the decisions are in `mailserver.policy`; durability is the queue's. A
message gets `250` only once its body and queue rows are durable (DESIGN.md §3).

Library behaviour patched here, in one place (REFERENCE.md §6):
- replies of aiosmtpd without RFC 3463 enhanced codes get them (`SubmissionSMTP.push`);
- its default exception handler echoes exception text: ours answers `451 4.3.0` with a reference;
- bare CR and bare LF pass through into the message: refused whole (`policy.check_body`);
- a failed `AuthResult` must be `handled=False` or the client hangs: we always push the reply ourselves.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import email.utils
import logging
import ssl
import traceback
import warnings
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope as SmtpEnvelope, Session

from crypto.tls import peer_certificate_der
from directory.store import DirectoryStore
from mailserver import policy, replies
from mailserver.audit_api import AuditEvent, AuditSink
from mailserver.auth import CertificateAuthenticator, Identity, LoginRefused
from mailserver.queue import Envelope, Queue, Recipient, new_queue_id

log = logging.getLogger(__name__)

IDENT = "Caducee ESMTP"  # ASCII: it appears in the greeting and in Received fields


@dataclass(frozen=True)
class SubmissionSettings:
    hostname: str
    local_domains: frozenset[str]
    max_message_size: int
    max_recipients: int
    timeout: float = 300


class _LibraryNoise(logging.Filter):
    """aiosmtpd warnings that do not apply to how it is used here."""

    NOISE = ("auth_required == True but auth_require_tls == False", "Session.login_data is deprecated")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOISE)


logging.getLogger("mail.log").addFilter(_LibraryNoise())


class SubmissionSMTP(SMTP):
    """aiosmtpd's SMTP with enhanced status codes on every reply and a graceful shutdown."""

    def __init__(self, handler: "SubmissionHandler", *, implicit_tls: bool, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.implicit_tls = implicit_tls
        self._in_ehlo = False
        self.in_data = False
        handler.connections.add(self)

    async def push(self, status: Any) -> None:
        if isinstance(status, str) and not self._in_ehlo:
            status = replies.with_enhanced_code(status)
        await super().push(status)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False

    async def smtp_DATA(self, arg: str) -> None:
        self.in_data = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self.in_data = False

    def connection_lost(self, error: Exception | None) -> None:
        handler: SubmissionHandler = self.event_handler
        handler.connections.discard(self)
        super().connection_lost(error)

    @property
    def tls_ssl_object(self) -> ssl.SSLObject | ssl.SSLSocket | None:
        """The TLS object of this connection, for STARTTLS and implicit TLS alike."""
        if self.session is not None and self.session.ssl:
            obj = self.session.ssl.get("ssl_object")
            if obj is not None:
                return obj  # type: ignore[no-any-return]
        if self.transport is not None:
            return self.transport.get_extra_info("ssl_object")  # type: ignore[no-any-return]
        return None

    @property
    def is_tls(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None


class SubmissionHandler:
    """aiosmtpd handler hooks: certificate login, sender and recipient checks, queueing."""

    def __init__(
        self,
        settings: SubmissionSettings,
        authenticator: CertificateAuthenticator,
        directory: DirectoryStore,
        queue: Queue,
        audit: AuditSink,
    ) -> None:
        self.settings = settings
        self.authenticator = authenticator
        self.directory = directory
        self.queue = queue
        self.audit = audit
        self.connections: set[SubmissionSMTP] = set()
        self.accepted = 0

    # RFC 5321 §4.1.1.1 and RFC 2034: announce what we do.
    async def handle_EHLO(self, server: SubmissionSMTP, session: Session, envelope: SmtpEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        lines = [r for r in responses if r not in ("250 HELP", "250-HELP")]
        lines += ["250-PIPELINING", "250 ENHANCEDSTATUSCODES"]
        return lines

    # RFC 4422 Appendix A, RFC 4954: AUTH EXTERNAL [initial-response]
    async def auth_EXTERNAL(self, server: SubmissionSMTP, args: list[str]) -> AuthResult:
        if not server.is_tls:  # unreachable with require_starttls, kept as a guard
            await server.push(str(replies.MUST_STARTTLS))
            return AuthResult(success=False, handled=True)
        if len(args) > 1:
            response: str | None = args[1]
        else:
            await server.push("334 ")
            line = await server._reader.readline()
            response = line.strip().decode("ascii", errors="replace")
            if response == "*":  # RFC 4954 §4: the client cancels
                await server.push(str(replies.AUTH_ABORTED))
                return AuthResult(success=False, handled=True)
        if response in ("=", ""):
            authzid = ""
        else:
            try:
                authzid = base64.b64decode(response, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                await server.push(str(replies.AUTH_SYNTAX))
                return AuthResult(success=False, handled=True)
        der = peer_certificate_der(server.tls_ssl_object)
        try:
            identity = await asyncio.to_thread(self.authenticator.authenticate, der, authzid)
        except LoginRefused as exc:
            log.info("event=login_failed protocol=smtp peer=%s reason=%s", _peer(server), exc.reason)
            self.audit.record(AuditEvent.LOGIN_FAILED, actor="unknown", protocol="smtp",
                              detail={"reason": exc.reason})
            await server.push(str(replies.AUTH_INVALID))
            return AuthResult(success=False, handled=True)
        log.info("event=login protocol=smtp peer=%s principal=%s", _peer(server), identity.principal.national_id)
        self.audit.record(AuditEvent.LOGIN, actor=identity.principal.national_id, protocol="smtp",
                          detail={"certificate": identity.certificate.fingerprint_sha256[:16]})
        # On success aiosmtpd pushes `message` itself.
        return AuthResult(success=True, handled=False, auth_data=identity, message=str(replies.AUTH_OK))

    async def handle_MAIL(self, server: SubmissionSMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, mail_options: list[str]) -> str:
        identity: Identity = session.auth_data
        reply = policy.check_sender(identity, address)
        if reply is not None:
            log.info("event=sender_refused principal=%s", identity.principal.national_id)
            return str(reply)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return str(replies.SENDER_OK)

    async def handle_RCPT(self, server: SubmissionSMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return str(replies.TOO_MANY_RECIPIENTS)
        reply = await asyncio.to_thread(policy.check_recipient, address, self.settings.local_domains,
                                        self.directory)
        if reply is not None:
            return str(reply)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return str(replies.RECIPIENT_OK)

    async def handle_DATA(self, server: SubmissionSMTP, session: Session, envelope: SmtpEnvelope) -> str:
        identity: Identity = session.auth_data
        content: bytes = envelope.original_content or b""
        checked = policy.check_body(content, identity)
        if isinstance(checked, replies.Reply):
            log.info("event=message_refused principal=%s code=%s", identity.principal.national_id,
                     checked.enhanced)
            return str(checked)
        queue_id = new_queue_id()
        data, message_id = policy.prepend_trace(
            content,
            checked,
            received=self._received_header(server, session, queue_id),
            hostname=self.settings.hostname,
        )
        env = Envelope(
            mail_from=envelope.mail_from or "",
            recipients=tuple(Recipient(a.lower()) for a in envelope.rcpt_tos),
            principal=identity.principal.national_id,
            header_message_id=message_id,
            protocol="smtp",
        )
        await self.queue.enqueue(env, data, queue_id=queue_id)
        self.accepted += 1
        log.info("event=queued queue_id=%s principal=%s recipients=%d size=%d", queue_id,
                 identity.principal.national_id, len(env.recipients), len(data))
        return str(replies.queued(queue_id))

    async def handle_exception(self, error: Exception) -> str:
        reply, ref = replies.internal_error()
        # Where it failed, never the exception's text: it may carry message or patient data.
        where = " < ".join(
            f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}:{frame.name}"
            for frame in reversed(traceback.extract_tb(error.__traceback__))
        )
        log.error("event=smtp_exception ref=%s error=%s where=%s", ref, type(error).__name__, where)
        return str(reply)

    def _received_header(self, server: SubmissionSMTP, session: Session, queue_id: str) -> bytes:
        # RFC 5321 §4.4 trace field; RFC 3848 "ESMTPSA": ESMTP over TLS, authenticated.
        tls = server.tls_ssl_object
        tls_info = ""
        if tls is not None:
            cipher = tls.cipher()
            tls_info = f" (version={tls.version()} cipher={cipher[0] if cipher else ''})"
        helo = policy.sanitise_helo(session.host_name or "unknown")
        peer_ip = session.peer[0] if isinstance(session.peer, tuple) else "unknown"
        date = email.utils.format_datetime(dt.datetime.now(dt.timezone.utc))
        return (
            f"Received: from {helo} ([{peer_ip}])\r\n\tby {self.settings.hostname} ({IDENT}) with ESMTPSA"
            f" id {queue_id}{tls_info};\r\n\t{date}\r\n"
        ).encode("ascii", errors="replace")


def _peer(server: SMTP) -> str:
    peer = server.session.peer if server.session else None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unknown"


def make_protocol_factory(handler: SubmissionHandler, tls_context: ssl.SSLContext, *, implicit_tls: bool):
    """The asyncio protocol factory of one submission listener (STARTTLS or implicit TLS)."""
    s = handler.settings

    def factory() -> SubmissionSMTP:
        common: dict[str, Any] = dict(
            hostname=s.hostname,
            ident=IDENT,
            data_size_limit=s.max_message_size,
            enable_SMTPUTF8=True,
            timeout=s.timeout,
            auth_required=True,
            auth_exclude_mechanism=["LOGIN", "PLAIN"],
            # Three AUTH attempts per connection, then 421 and close; other commands are not capped.
            command_call_limit={"AUTH": 3, "*": 10**9},
        )
        if implicit_tls:
            # The socket is TLS already; aiosmtpd cannot tell, so AUTH must not wait for STARTTLS. Its
            # warning about "AUTH without TLS" is wrong here and silenced.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
                return SubmissionSMTP(handler, implicit_tls=True, auth_require_tls=False, **common)
        return SubmissionSMTP(handler, implicit_tls=False, tls_context=tls_context, require_starttls=True,
                              auth_require_tls=True, **common)

    return factory


async def shutdown(handler: SubmissionHandler, servers: list[asyncio.base_events.Server], grace: float = 30.0) -> None:
    """Stop listening; idle sessions get 421; sessions inside DATA may finish within `grace` seconds."""
    for srv in servers:
        srv.close()
    for conn in list(handler.connections):
        if not conn.in_data and conn.transport is not None and not conn.transport.is_closing():
            try:
                await asyncio.wait_for(conn.push(str(replies.SHUTTING_DOWN)), 2)
            except Exception:  # noqa: BLE001 - the peer may be gone already; we are closing anyway
                pass
            if conn.transport is not None:
                conn.transport.close()
    deadline = asyncio.get_running_loop().time() + grace
    while any(c.in_data for c in handler.connections) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    for conn in list(handler.connections):
        if conn.transport is not None:
            conn.transport.close()
