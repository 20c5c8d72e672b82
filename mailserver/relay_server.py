"""Inbound relay between operators of the trust space (RFC 5321 over STARTTLS with mutual TLS).

Only operators of the whitelist may hand us mail, and only for our own mailboxes:
- STARTTLS before MAIL (`530 5.7.0`);
- the peer's client certificate must chain to the trust anchors, be valid and not revoked, and its
  subject DN must be the one whitelisted for the MAIL FROM domain (for the null reverse-path of a
  report: the DN of any whitelisted operator) — otherwise `550 5.7.1`, logged and audited;
- recipients must be local mailboxes (`550 5.1.1` unknown, `550 5.7.1` not ours: no open relay);
- a message with more than `max_hops` Received fields is a loop (`554 5.4.6`, RFC 5321 §6.3);
- a header beyond the size and count caps of mailserver.headers is refused (`552 5.3.4`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import Envelope as SmtpEnvelope, Session
from cryptography import x509

from crypto.tls import peer_certificate_der
from crypto.validation import CertificateRejected, CertificateValidator
from directory.store import DirectoryStore
from mailserver import policy, replies
from mailserver.audit_api import AuditEvent, AuditSink
from mailserver.headers import header_limits
from mailserver.mdn import report_kind
from mailserver.queue import Envelope, Queue, Recipient, new_queue_id
from mailserver.replies import Reply
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

PEER_NOT_TRUSTED = Reply(550, "5.7.1", "Peer is not an operator of the trust space for this sender domain")
PEER_CERTIFICATE_REFUSED = Reply(550, "5.7.1", "Peer certificate refused")
LOOP_DETECTED = Reply(554, "5.4.6", "Routing loop detected: too many hops")
_RECEIVED = re.compile(rb"^Received:", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class RelaySettings:
    hostname: str
    local_domains: frozenset[str]
    max_message_size: int
    max_recipients: int
    max_hops: int = 30
    timeout: float = 300


@dataclass(frozen=True)
class RelayPeer:
    """The operator on the other end, once its certificate and the whitelist agreed."""

    subject_dn: str
    domain: str | None  # the MAIL FROM domain it vouched for (None for the null reverse-path)


class RelayHandler(HookNames):
    def __init__(self, settings: RelaySettings, validator: CertificateValidator, trust: Any,
                 directory: DirectoryStore, queue: Queue, audit: AuditSink) -> None:
        self.settings = settings
        self.validator = validator
        self.trust: TrustLookup = trust
        self.directory = directory
        self.recipients = policy.RecipientCache(directory)
        self.queue = queue
        self.audit = audit
        self.connections: set[CaduceeSMTP] = set()
        self.accepted = 0

    async def handle_EHLO(self, server: CaduceeSMTP, session: Session, envelope: SmtpEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        return ehlo_lines(responses)

    def _check_peer(self, der: bytes | None, domain: str | None) -> tuple[RelayPeer | None, str]:
        if not der:
            return None, "no_client_certificate"
        try:
            validated = self.validator.validate(der)
        except CertificateRejected as exc:
            return None, f"certificate_{exc.reason.name.lower()}"
        subject = x509.load_der_x509_certificate(der).subject
        if domain is not None:
            trusted = self.trust.is_trusted(domain, subject)
        else:  # a report (DSN/MDN): any operator of the trust space may send one
            trusted = self.trust.is_operator(subject)
        if not trusted:
            return None, "not_whitelisted"
        return RelayPeer(validated.subject_dn, domain), ""

    async def handle_MAIL(self, server: CaduceeSMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, mail_options: list[str]) -> str:
        if address and not policy.valid_address(address):
            return str(replies.BAD_ADDRESS)
        domain = address.rpartition("@")[2].lower() if address else None
        der = peer_certificate_der(server.tls_ssl_object) if server.tls_ssl_object else None
        peer, reason = await asyncio.to_thread(self._check_peer, der, domain)
        if peer is None:
            log.warning("event=relay_refused peer=%s reason=%s", _peer(session), reason)
            self.audit.record(AuditEvent.RELAY_REFUSED, actor="unknown", protocol="smtp-relay",
                              detail={"reason": reason, "peer": _peer(session), "sender_domain": domain or ""})
            return str(PEER_CERTIFICATE_REFUSED if reason.startswith("certificate") or reason.startswith("no_")
                       else PEER_NOT_TRUSTED)
        session.relay_peer = peer  # type: ignore[attr-defined]
        return str(replies.SENDER_OK)

    async def handle_RCPT(self, server: CaduceeSMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return str(replies.TOO_MANY_RECIPIENTS)
        # Local mailboxes only: relaying onwards would make us an open relay.
        reply = await policy.check_recipient_cached(address, self.settings.local_domains, self.recipients)
        return str(reply or replies.RECIPIENT_OK)

    async def handle_DATA(self, server: CaduceeSMTP, session: Session, envelope: SmtpEnvelope) -> str:
        peer: RelayPeer = session.relay_peer  # type: ignore[attr-defined]
        content: bytes = envelope.original_content or b""
        if policy.has_bare_line_ending(content):
            return str(replies.BARE_LINE_ENDING)
        header = content.split(b"\r\n\r\n", 1)[0]
        if header_limits(header) is not None:  # what every later parser may read (docs/security.md row 14)
            return str(replies.HEADER_TOO_LARGE)
        hops = len(_RECEIVED.findall(header))
        if hops >= self.settings.max_hops:
            log.warning("event=loop_detected peer=%s hops=%d", _peer(session), hops)
            return str(LOOP_DETECTED)
        queue_id = new_queue_id()
        data = server.received_header(self.settings.hostname, queue_id, "ESMTPS") + content
        env = Envelope(
            mail_from=(envelope.mail_from or "").lower(),
            recipients=tuple(
                Recipient(a.lower(), envelope_dsn(envelope, a).notify, envelope_dsn(envelope, a).orcpt)
                for a in envelope.rcpt_tos
            ),
            principal=None,
            envid=getattr(envelope, "dsn_envid", None),
            ret=getattr(envelope, "dsn_ret", None),
            header_message_id=policy.header_message_id(content),
            protocol="smtp-relay",
            hops=hops + 1,
            report_kind=report_kind(content),
        )
        await self.queue.enqueue(env, data, queue_id=queue_id)
        self.accepted += 1
        self.audit.record(AuditEvent.RELAY_IN, actor=(peer.domain or "operator")[:64], protocol="smtp-relay",
                          message_id=env.header_message_id,
                          detail={"queue_id": queue_id, "recipients": str(len(env.recipients))})
        log.info("event=relay_queued queue_id=%s peer_domain=%s recipients=%d size=%d", queue_id,
                 peer.domain or "-", len(env.recipients), len(data))
        return str(replies.queued(queue_id))

    async def handle_exception(self, error: Exception) -> str:
        return opaque_exception_reply(error, log)



def _peer(session: Session) -> str:
    peer = session.peer
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unknown"


def make_relay_factory(handler: RelayHandler, tls_context: ssl.SSLContext):  # type: ignore[no-untyped-def]
    s = handler.settings

    def factory() -> CaduceeSMTP:
        return CaduceeSMTP(
            handler, implicit_tls=False, tls_context=tls_context, require_starttls=True,
            hostname=s.hostname, ident=IDENT, data_size_limit=s.max_message_size, enable_SMTPUTF8=True,
            timeout=s.timeout, auth_required=False, auth_exclude_mechanism=["LOGIN", "PLAIN"],
        )

    return factory
