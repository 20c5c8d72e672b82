"""Outbound relay to the other operators of the trust space (aiosmtplib, mutual TLS, never plaintext).

For each due recipient in another operator's domain:
1. claim it (lease) and record the attempt and the next attempt *before* dialling, so a crash at any
   point leaves it scheduled (DESIGN.md §3);
2. find the next hop (configured per domain, else the domain's MX records, RFC 5321 §5.1);
3. STARTTLS is mandatory; our operator certificate is the client certificate; the peer's certificate
   must chain to the trust anchors, name the host we dialled, not be revoked, and carry the subject DN
   whitelisted for the recipient's domain — otherwise we quit before MAIL;
4. temporary failures retry with exponential backoff and jitter until `max_lifetime`; permanent ones,
   and expiry, fail the recipient (a failure DSN follows, mailserver.reports); a peer that drops the
   connection after our final dot may have the message: the attempt is marked uncertain and retried
   (a possible duplicate, logged).
"""

from __future__ import annotations

import asyncio
import functools
import datetime as dt
import logging
import random
import ssl
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import sqlalchemy as sa
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from crypto.tls import client_context
from crypto.validation import CertificateRejected, CertificateValidator
from mailserver.audit import append_in
from mailserver.audit_api import AuditEvent
from mailserver.blobs import BlobStore, CorruptBlob
from mailserver.dsn import Action, parse_notify, should_report
from mailserver.queue import Queue, QueueWorker, RecipientState, relayed_content
from mailserver.schema import queue_messages, queue_recipients
from mailserver.trust_api import TrustLookup

log = logging.getLogger(__name__)

BATCH = 100


@dataclass(frozen=True)
class NextHop:
    host: str
    port: int


@dataclass(frozen=True)
class RemoteSettings:
    hostname: str
    local_domains: frozenset[str]
    certificate: Path
    key: Path
    ca_bundle: Path
    next_hops: dict[str, NextHop]
    connect_timeout: float = 30
    retry_initial: int = 60
    retry_max: int = 3600
    max_lifetime: int = 5 * 86400
    lease: int = 300


@dataclass(frozen=True)
class Claimed:
    recipient_id: int
    queue_id: str
    rcpt: str
    notify: str | None
    orcpt: str | None
    attempts: int
    mail_from: str
    envid: str | None
    ret: str | None
    blob: str
    received_at: dt.datetime
    header_message_id: str | None
    report_kind: str | None
    trace_length: int | None = None  # Return-Path bytes at the start of the blob, left out when relaying


@dataclass(frozen=True)
class Outcome:
    """What one attempt did for one recipient."""

    kind: str  # "delivered" | "temporary" | "permanent" | "quarantined" (the queue entry is corrupt)
    reply: str  # the peer's reply or our diagnostic, log-safe
    dsn_capable_peer: bool = False
    uncertain: bool = False
    remote_mta: str | None = None


def backoff(attempts: int, initial: int, maximum: int, rng: random.Random | None = None) -> float:
    """Seconds before the next attempt: doubling from `initial`, capped at `maximum`, ±20 % jitter."""
    base = min(float(maximum), initial * 2.0 ** max(0, attempts - 1))
    return base * (rng or random).uniform(0.8, 1.2)  # jitter, not a secret: `random` is right here


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _due_remote(settings: RemoteSettings, now: dt.datetime) -> sa.ColumnElement[bool]:
    return _due_remote_for(settings.local_domains, now)


def _due_remote_for(local_domains: frozenset[str], now: Any) -> sa.ColumnElement[bool]:
    return sa.and_(
        queue_recipients.c.state == RecipientState.QUEUED,
        sa.and_(*[~queue_recipients.c.rcpt.like(f"%@{d}") for d in sorted(local_domains)]),
        queue_recipients.c.next_attempt_at <= now,
        sa.or_(queue_recipients.c.lease_expires.is_(None), queue_recipients.c.lease_expires < now),
    )


@functools.lru_cache(maxsize=16)
def _remote_due_query(local_domains: frozenset[str]) -> sa.Select[Any]:
    # Built once (it runs at every wake-up): only `now` changes.
    return sa.select(queue_recipients.c.id).where(_due_remote_for(local_domains, sa.bindparam("now"))).limit(1)


def remote_due(conn: sa.Connection, settings: RemoteSettings, now: dt.datetime | None = None) -> bool:
    """Whether a remote recipient is due now (a read: no lease is taken)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return conn.execute(_remote_due_query(settings.local_domains), {"now": now}).first() is not None


def claim_in(conn: sa.Connection, settings: RemoteSettings, owner: str, limit: int = BATCH,
             now: dt.datetime | None = None) -> list[Claimed]:
    """Claim due remote recipients: lease them, count the attempt, schedule the next one — then commit."""
    now = now or dt.datetime.now(dt.timezone.utc)
    rows = conn.execute(
        sa.select(queue_recipients, queue_messages.c.mail_from, queue_messages.c.envid, queue_messages.c.ret,
                  queue_messages.c.blob, queue_messages.c.received_at, queue_messages.c.header_message_id,
                  queue_messages.c.report_kind, queue_messages.c.trace_length)
        .join(queue_messages, queue_messages.c.id == queue_recipients.c.message_id)
        .where(_due_remote(settings, now))
        .order_by(queue_recipients.c.next_attempt_at, queue_recipients.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=queue_recipients)
    ).all()
    claimed = []
    for r in rows:
        attempts = r.attempts + 1
        conn.execute(
            sa.update(queue_recipients).where(queue_recipients.c.id == r.id).values(
                lease_owner=owner, lease_expires=now + dt.timedelta(seconds=settings.lease),
                attempts=attempts, last_attempt_at=now, updated_at=now,
                next_attempt_at=now + dt.timedelta(
                    seconds=backoff(attempts, settings.retry_initial, settings.retry_max)),
            )
        )
        claimed.append(Claimed(r.id, r.message_id, r.rcpt, r.notify, r.orcpt, attempts, r.mail_from, r.envid,
                               r.ret, r.blob, _utc(r.received_at), r.header_message_id, r.report_kind,
                               r.trace_length))
    return claimed


def _wants_report(item: Claimed, action: Action) -> bool:
    if not item.mail_from or item.report_kind:
        return False  # never a report to the null sender, nor about a report
    notify = parse_notify(item.notify) if item.notify else None
    return should_report(notify, action)


def record_outcomes_in(conn: sa.Connection, results: list[tuple[Claimed, Outcome]], settings: RemoteSettings,
                       owner: str, now: dt.datetime | None = None) -> None:
    now = now or dt.datetime.now(dt.timezone.utc)
    for item, outcome in results:
        if outcome.kind == "quarantined":
            continue  # set aside already (Queue.quarantine), lease released
        values: dict[str, Any] = dict(lease_owner=None, lease_expires=None, updated_at=now,
                                      last_error=outcome.reply[:500] or None)
        expired = now - item.received_at > dt.timedelta(seconds=settings.max_lifetime)
        if outcome.kind == "delivered":
            # RFC 3461 §6.2.3: a peer that speaks DSN takes over the success report; otherwise "relayed".
            relayed_report = not outcome.dsn_capable_peer and _wants_report(item, Action.RELAYED) and \
                bool(item.notify and "SUCCESS" in item.notify)
            values["state"] = RecipientState.DSN_RELAYED if relayed_report else RecipientState.RELAYED
            values["last_error"] = None
            append_in(conn, AuditEvent.RELAY_OUT, actor="relay", protocol="smtp-relay",
                      mailbox=item.mail_from or None, message_id=item.header_message_id,
                      detail={"queue_id": item.queue_id, "domain": item.rcpt.rpartition("@")[2],
                              "uncertain_before": "no"}, at=now)
        elif outcome.kind == "permanent" or expired:
            if expired and outcome.kind != "permanent":
                values["last_error"] = f"4.4.7 delivery time expired; last: {outcome.reply}"[:500]
            values["state"] = (RecipientState.DSN_FAILED if _wants_report(item, Action.FAILED)
                               else RecipientState.FAILED)
        else:
            values["state"] = RecipientState.QUEUED
        if outcome.uncertain:
            values["uncertain"] = True
        conn.execute(sa.update(queue_recipients).where(
            queue_recipients.c.id == item.recipient_id, queue_recipients.c.lease_owner == owner).values(**values))


def _peer_certificate(smtp: aiosmtplib.SMTP) -> tuple[bytes | None, str]:
    """The peer's certificate (DER), or None and why not. Call it on the event loop's thread."""
    ssl_object = smtp.transport.get_extra_info("ssl_object") if smtp.transport else None
    try:
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    except ValueError:  # the TLS session is gone (peer closed during the handshake)
        return None, "TLS session not established"
    return (der, "") if der else (None, "no certificate")


def _log_safe(text: str) -> str:
    return " ".join(text.split())[:300]


class RemoteDelivery(QueueWorker):
    """The outbound worker: claims, dials, records. Woken by the queue and every `poll` seconds."""

    name = "remote-delivery"
    batch = 1  # whatever it claimed, look again at once
    # Every accepted message wakes this worker, most for local mailboxes: a burst's wake-ups are gathered
    # into one look at what is due every 100 ms at most (a relayed message leaves at most that much later).
    min_interval = 0.1

    def __init__(self, queue: Queue, blobs: BlobStore, trust: TrustLookup, validator: CertificateValidator,
                 settings: RemoteSettings, *, poll: float = 1.0, concurrency: int = 20,
                 read_engine: sa.Engine | None = None) -> None:
        super().__init__(queue, poll=poll)
        # Every accepted message wakes this worker; most are for local mailboxes. With a read engine, a
        # read (which never waits for the writer) tells whether anything is due before a claim takes a
        # place in the writer's batch.
        self.read_engine = read_engine
        self.blobs = blobs
        self.trust = trust
        self.validator = validator
        self.settings = settings
        self.owner = queue.node
        self.concurrency = asyncio.Semaphore(concurrency)
        self.tls = client_context(settings.ca_bundle, settings.certificate, settings.key)
        self.relayed = 0

    def _anything_due(self) -> bool:
        assert self.read_engine is not None
        with self.read_engine.connect() as conn:
            return remote_due(conn, self.settings)

    async def run_once(self) -> int:
        if self.read_engine is not None and not await asyncio.to_thread(self._anything_due):
            return 0
        claimed = await self.queue.writer.run(lambda c: claim_in(c, self.settings, self.owner))
        if not claimed:
            return 0
        groups: dict[tuple[str, str], list[Claimed]] = defaultdict(list)
        for item in claimed:
            groups[(item.queue_id, item.rcpt.rpartition("@")[2].lower())].append(item)
        results = await asyncio.gather(*(self._deliver_group(domain, items)
                                         for (_qid, domain), items in groups.items()))
        flat = [pair for group in results for pair in group]
        await self.queue.writer.run(lambda c: record_outcomes_in(c, flat, self.settings, self.owner))
        self.relayed += sum(1 for _, o in flat if o.kind == "delivered")
        if any(o.kind not in ("temporary", "quarantined") for _, o in flat):
            self.queue.notify()  # reports may be due
        return len(claimed)

    async def next_hops(self, domain: str) -> list[NextHop]:
        if domain in self.settings.next_hops:
            return [self.settings.next_hops[domain]]
        import dns.asyncresolver
        import dns.exception
        import dns.resolver

        try:
            answer = await dns.asyncresolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            return []
        except dns.resolver.NoAnswer:
            return [NextHop(domain, 25)]  # RFC 5321 §5.1: the implicit MX
        except dns.exception.DNSException:
            raise ConnectionError("MX lookup failed") from None
        records = sorted(answer, key=lambda r: r.preference)
        return [NextHop(str(r.exchange).rstrip("."), 25) for r in records if str(r.exchange) != "."]

    async def _deliver_group(self, domain: str, items: list[Claimed]) -> list[tuple[Claimed, Outcome]]:
        try:
            return await self._deliver_group_once(domain, items)
        except Exception as exc:  # noqa: BLE001 - record a retry rather than leave the claim to expire
            log.error("event=relay_attempt_failed domain=%s error=%s", domain, type(exc).__name__)
            return [(i, Outcome("temporary", "4.3.0 internal error during the attempt")) for i in items]

    async def _deliver_group_once(self, domain: str, items: list[Claimed]) -> list[tuple[Claimed, Outcome]]:
        async with self.concurrency:
            if self.trust.lookup(domain) is None:
                return [(i, Outcome("permanent", "550 5.7.1 domain no longer in the trust space")) for i in items]
            try:
                hops = await self.next_hops(domain)
            except ConnectionError:
                return [(i, Outcome("temporary", "451 4.4.3 MX lookup failed")) for i in items]
            if not hops:
                return [(i, Outcome("permanent", "550 5.1.2 domain has no mail exchanger")) for i in items]
            try:
                data = relayed_content(await asyncio.to_thread(self.blobs.get_verified, items[0].blob),
                                       items[0].trace_length)
            except CorruptBlob as exc:
                await self.queue.quarantine(items[0].queue_id, items[0].blob, exc.reason)
                return [(i, Outcome("quarantined", f"4.3.0 queue entry corrupt: body {exc.reason}")) for i in items]
            last: list[tuple[Claimed, Outcome]] = []
            for hop in hops:
                last = await self._attempt(hop, domain, items, data)
                if not all(o.kind == "temporary" and not o.uncertain and o.reply.startswith("4.4.1")
                           for _, o in last):
                    return last  # only a connection failure moves on to the next MX
            return last

    async def _attempt(self, hop: NextHop, domain: str, items: list[Claimed],
                       data: bytes) -> list[tuple[Claimed, Outcome]]:
        where = f"{hop.host}:{hop.port}"
        smtp = aiosmtplib.SMTP(hostname=hop.host, port=hop.port, start_tls=True, tls_context=self.tls,
                               local_hostname=self.settings.hostname, timeout=self.settings.connect_timeout)
        try:
            await smtp.connect()
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            log.info("event=relay_connect_failed hop=%s error=%s", where, type(exc).__name__)
            return [(i, Outcome("temporary", f"4.4.1 cannot reach {where} over TLS ({type(exc).__name__})"))
                    for i in items]
        try:
            # The certificate is read on the loop's thread: the loop may be reading on this TLS object at
            # any moment (TLS 1.3 session tickets follow the handshake) and an OpenSSL object is not
            # thread-safe — read from a worker thread, it sometimes said "handshake not done yet".
            der, refusal = _peer_certificate(smtp)
            if der is not None:
                refusal = await asyncio.to_thread(self._check_peer, der, domain)
            if refusal:
                log.warning("event=relay_peer_refused hop=%s domain=%s reason=%s", where, domain, refusal)
                return [(i, Outcome("temporary", f"4.7.5 peer certificate refused: {refusal}")) for i in items]
            return await self._transaction(smtp, where, items, data)
        finally:
            try:
                await smtp.quit()
            except Exception:  # noqa: BLE001 - the session is over either way
                smtp.close()

    def _check_peer(self, der: bytes, domain: str) -> str:
        try:
            self.validator.validate(der, usage=ExtendedKeyUsageOID.SERVER_AUTH)
        except CertificateRejected as exc:
            return f"certificate {exc.reason.name.lower()}"
        subject = x509.load_der_x509_certificate(der).subject
        if not self.trust.is_trusted(domain, subject):
            return "subject DN is not the one whitelisted for the domain"
        return ""

    async def _transaction(self, smtp: aiosmtplib.SMTP, where: str, items: list[Claimed],
                           data: bytes) -> list[tuple[Claimed, Outcome]]:
        first = items[0]
        if not smtp.last_ehlo_response:
            await smtp.ehlo()  # RFC 3207 §4.2: what was announced before STARTTLS was forgotten
        dsn = smtp.supports_extension("dsn")
        options = []
        if dsn and first.ret:
            options.append(f"RET={first.ret}")
        if dsn and first.envid:
            options.append(f"ENVID={first.envid}")
        if smtp.supports_extension("8bitmime") and any(b > 0x7F for b in data[:65536]):
            options.append("BODY=8BITMIME")
        out: dict[int, Outcome] = {}
        try:
            await smtp.mail(first.mail_from, options=options)
        except aiosmtplib.SMTPResponseException as exc:
            kind = "temporary" if 400 <= exc.code < 500 else "permanent"
            return [(i, Outcome(kind, _log_safe(f"{exc.code} {exc.message}"), remote_mta=where)) for i in items]
        accepted: list[Claimed] = []
        for item in items:
            ropts = []
            if dsn and item.notify:
                ropts.append(f"NOTIFY={item.notify}")
            if dsn and item.orcpt:
                ropts.append(f"ORCPT={item.orcpt}")
            try:
                await smtp.rcpt(item.rcpt, options=ropts)
                accepted.append(item)
            except aiosmtplib.SMTPResponseException as exc:
                kind = "temporary" if 400 <= exc.code < 500 else "permanent"
                out[item.recipient_id] = Outcome(kind, _log_safe(f"{exc.code} {exc.message}"), remote_mta=where)
        if accepted:
            try:
                response = await smtp.data(data)
                for item in accepted:
                    out[item.recipient_id] = Outcome("delivered", _log_safe(f"{response.code} {response.message}"),
                                                     dsn_capable_peer=dsn, remote_mta=where)
                log.info("event=relayed queue_id=%s hop=%s recipients=%d", first.queue_id, where, len(accepted))
            except aiosmtplib.SMTPServerDisconnected:
                # The final dot may have been received: the peer may deliver it. Retry, and say so.
                log.warning("event=relay_uncertain queue_id=%s hop=%s possible_duplicate=yes", first.queue_id, where)
                for item in accepted:
                    out[item.recipient_id] = Outcome("temporary", "4.4.2 connection lost after the final dot",
                                                     uncertain=True, remote_mta=where)
            except aiosmtplib.SMTPResponseException as exc:
                kind = "temporary" if 400 <= exc.code < 500 else "permanent"
                for item in accepted:
                    out[item.recipient_id] = Outcome(kind, _log_safe(f"{exc.code} {exc.message}"), remote_mta=where)
        return [(i, out[i.recipient_id]) for i in items]
