"""SMTP submission (RFC 6409) over TLS with certificate login (SASL EXTERNAL, RFC 4422 Appendix A).

A thin shell over aiosmtpd (patched in `mailserver.smtp_protocol`): the decisions are in
`mailserver.policy`; durability is the queue's. A message gets `250` only once its body and queue rows
are durable (DESIGN.md §3). Bare CR and bare LF, which aiosmtpd passes through into the message, are
refused whole (`policy.check_body`). A failed `AuthResult` must be `handled=False` or the client hangs:
we always push the failure reply ourselves.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
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
from mailserver.smtp_protocol import (
    IDENT,
    CaduceeSMTP,
    HookNames,
    ehlo_lines,
    envelope_dsn,
    opaque_exception_reply,
)
from mailserver.trust_api import TrustLookup

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class SubmissionSettings:
    hostname: str
    local_domains: frozenset[str]
    max_message_size: int
    max_recipients: int
    timeout: float = 300


class SubmissionSMTP(CaduceeSMTP):
    """The submission listener's protocol (kept as a name for the submission role)."""


class SubmissionHandler(HookNames):
    """aiosmtpd handler hooks: certificate login, sender and recipient checks, queueing."""

    def __init__(
        self,
        settings: SubmissionSettings,
        authenticator: CertificateAuthenticator,
        directory: DirectoryStore,
        queue: Queue,
        audit: AuditSink,
        trust: TrustLookup | None = None,
    ) -> None:
        self.settings = settings
        self.trust = trust
        self.authenticator = authenticator
        self.directory = directory
        self.recipients = policy.RecipientCache(directory)
        self.queue = queue
        self.audit = audit
        self.connections: set[SubmissionSMTP] = set()
        self.accepted = 0

    # RFC 5321 §4.1.1.1 and RFC 2034: announce what we do.
    async def handle_EHLO(self, server: SubmissionSMTP, session: Session, envelope: SmtpEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        return ehlo_lines(responses)

    # RFC 4422 Appendix A, RFC 4954: AUTH EXTERNAL [initial-response]
    async def auth_EXTERNAL(self, server: SubmissionSMTP, args: list[str]) -> AuthResult:
        if not server.is_tls:  # unreachable with require_starttls, kept as a guard
            await server.push(str(replies.MUST_STARTTLS))
            return AuthResult(success=False, handled=True)
        if len(args) > 1:
            response: str = args[1]
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
            except ValueError:  # binascii.Error, UnicodeDecodeError, and non-ASCII input (found by tests/fuzz)
                await server.push(str(replies.AUTH_SYNTAX))
                return AuthResult(success=False, handled=True)
        tls_object = server.tls_ssl_object
        der = peer_certificate_der(tls_object) if tls_object is not None else None
        try:
            identity = (self.authenticator.from_memory(der, authzid)
                        or await asyncio.to_thread(self.authenticator.authenticate, der, authzid))
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
        return str(replies.SENDER_OK)

    async def handle_RCPT(self, server: SubmissionSMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return str(replies.TOO_MANY_RECIPIENTS)
        reply = await policy.check_recipient_cached(address, self.settings.local_domains, self.recipients,
                                                    self.trust)
        if reply is not None:
            return str(reply)
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
            received=server.received_header(self.settings.hostname, queue_id, "ESMTPSA"),
            hostname=self.settings.hostname,
        )
        env = Envelope(
            mail_from=envelope.mail_from or "",
            recipients=tuple(
                Recipient(a.lower(), envelope_dsn(envelope, a).notify, envelope_dsn(envelope, a).orcpt)
                for a in envelope.rcpt_tos
            ),
            principal=identity.principal.national_id,
            envid=getattr(envelope, "dsn_envid", None),
            ret=getattr(envelope, "dsn_ret", None),
            header_message_id=message_id,
            protocol="smtp",
        )
        await self.queue.enqueue(env, data, queue_id=queue_id)
        self.accepted += 1
        log.info("event=queued queue_id=%s principal=%s recipients=%d size=%d", queue_id,
                 identity.principal.national_id, len(env.recipients), len(data))
        return str(replies.queued(queue_id))

    async def handle_exception(self, error: Exception) -> str:
        return opaque_exception_reply(error, log)



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
