"""Delivery status notifications sent by this operator, and reports received for our senders.

Sending (RFC 3461–3464): a recipient left in a `dsn_*` state, or queued past `delay_warning`, gets a
report to the original sender: "accusé de réception" on delivery into the mailbox, "relayed" when the next
operator does not speak DSN, failure, delay. The report is queued (null reverse-path, so it is never
answered) in the same transaction that marks the recipient reported: exactly one report each, even across
a crash. Never a report to the null sender, nor about a report.

Receiving: a DSN or MDN delivered here is recorded against the Message-ID it reports on
(`delivery_reports`), so the sender's software can ask what became of its message.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from collections import defaultdict
from dataclasses import dataclass

import sqlalchemy as sa

from mailserver.audit import append_in
from mailserver.audit_api import AuditEvent
from mailserver.blobs import BlobStore, CorruptBlob
from mailserver.dsn import Action, RecipientStatus, build_dsn, parse_dsn, parse_notify, should_report
from mailserver.mdn import parse_mdn
from mailserver.queue import Envelope, Queue, QueueWorker, Recipient, RecipientState, relayed_content
from mailserver.schema import delivery_reports, queue_messages, queue_recipients

log = logging.getLogger(__name__)

_ENHANCED = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")


@dataclass(frozen=True)
class ReportSettings:
    hostname: str  # Reporting-MTA
    postmaster: str  # From: of our reports
    delay_warning: int  # seconds
    max_lifetime: int


@dataclass(frozen=True)
class Pending:
    recipient_id: int
    queue_id: str
    rcpt: str
    orcpt: str | None
    state: str
    last_error: str | None
    last_attempt_at: dt.datetime | None
    mail_from: str
    envid: str | None
    ret: str | None
    blob: str
    received_at: dt.datetime
    report_kind: str | None
    delay: bool  # a delay report (the recipient stays queued)
    trace_length: int | None = None  # Return-Path bytes at the start of the blob, not returned


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def due_in(conn: sa.Connection, settings: ReportSettings, now: dt.datetime, limit: int = 200) -> list[Pending]:
    cols = (queue_recipients.c.id, queue_recipients.c.message_id, queue_recipients.c.rcpt,
            queue_recipients.c.orcpt, queue_recipients.c.state, queue_recipients.c.last_error,
            queue_recipients.c.last_attempt_at, queue_recipients.c.notify, queue_messages.c.mail_from,
            queue_messages.c.envid, queue_messages.c.ret, queue_messages.c.blob, queue_messages.c.received_at,
            queue_messages.c.report_kind, queue_messages.c.trace_length)
    joined = queue_recipients.join(queue_messages, queue_messages.c.id == queue_recipients.c.message_id)
    final = conn.execute(
        sa.select(*cols).select_from(joined)
        .where(queue_recipients.c.state.in_(list(RecipientState.REPORT_PENDING)))
        .order_by(queue_recipients.c.id).limit(limit).with_for_update(skip_locked=True, of=queue_recipients)
    ).all()
    late = conn.execute(
        sa.select(*cols).select_from(joined)
        .where(queue_recipients.c.state == RecipientState.QUEUED,
               queue_recipients.c.delay_reported.is_(False),
               queue_recipients.c.attempts > 0,
               queue_messages.c.received_at <= now - dt.timedelta(seconds=settings.delay_warning))
        .order_by(queue_recipients.c.id).limit(limit).with_for_update(skip_locked=True, of=queue_recipients)
    ).all()
    out = []
    for rows, delay in ((final, False), (late, True)):
        for r in rows:
            if delay:
                notify = parse_notify(r.notify) if r.notify else None
                if not r.mail_from or r.report_kind or not should_report(notify, Action.DELAYED):
                    continue
            out.append(Pending(r.id, r.message_id, r.rcpt, r.orcpt, r.state, r.last_error,
                               _utc(r.last_attempt_at), r.mail_from, r.envid, r.ret, r.blob,
                               _utc(r.received_at) or now, r.report_kind, delay, r.trace_length))
    return out


def _status(p: Pending, settings: ReportSettings) -> RecipientStatus:
    if p.delay:
        action, default = Action.DELAYED, "4.0.0"
    else:
        final = RecipientState.REPORT_PENDING[p.state]
        action = {RecipientState.DELIVERED: Action.DELIVERED, RecipientState.RELAYED: Action.RELAYED,
                  RecipientState.FAILED: Action.FAILED}[final]
        default = "5.0.0" if action is Action.FAILED else "2.0.0"
    found = _ENHANCED.search(p.last_error or "") if action in (Action.FAILED, Action.DELAYED) else None
    status = found.group(1) if found else default
    # RFC 3464 §2.3.4: the status class follows the action (a failure after 4.4.7 is 5.4.7; a delay is 4.x.x)
    if action is Action.FAILED and not status.startswith("5"):
        status = "5" + status[1:]
    elif action is Action.DELAYED and not status.startswith("4"):
        status = "4" + status[1:]
    diagnostic = f"smtp; {p.last_error}" if p.last_error and action in (Action.FAILED, Action.DELAYED) else None
    return RecipientStatus(
        final_recipient=p.rcpt, action=action, status=status, original_recipient=p.orcpt,
        diagnostic=diagnostic, remote_mta=None, last_attempt=p.last_attempt_at,
        will_retry_until=(p.received_at + dt.timedelta(seconds=settings.max_lifetime)) if p.delay else None,
    )


def _finish_in(conn: sa.Connection, items: list[Pending], now: dt.datetime) -> None:
    for p in items:
        if p.delay:
            conn.execute(sa.update(queue_recipients).where(queue_recipients.c.id == p.recipient_id)
                         .values(delay_reported=True, updated_at=now))
        else:
            conn.execute(sa.update(queue_recipients).where(
                queue_recipients.c.id == p.recipient_id, queue_recipients.c.state == p.state)
                .values(state=RecipientState.REPORT_PENDING[p.state], updated_at=now))


class ReportWorker(QueueWorker):
    name = "reports"
    min_interval = 0.2  # a report a fraction of a second later; not a database round per accepted message

    def __init__(self, queue: Queue, blobs: BlobStore, settings: ReportSettings, *, poll: float = 5.0) -> None:
        super().__init__(queue, poll=poll)
        self.blobs = blobs
        self.settings = settings
        self.sent = 0

    async def run_once(self) -> int:
        now = dt.datetime.now(dt.timezone.utc)
        pending = await self.queue.writer.run(lambda c: due_in(c, self.settings, now))
        groups: dict[tuple[str, bool], list[Pending]] = defaultdict(list)
        for p in pending:
            groups[(p.queue_id, p.delay)].append(p)
        sent = 0
        for items in groups.values():
            first = items[0]
            if not first.mail_from or first.report_kind:
                await self.queue.writer.run(lambda c, items=items: _finish_in(c, items, now))
                continue
            try:
                original = relayed_content(await asyncio.to_thread(self.blobs.get_verified, first.blob),
                                           first.trace_length)
            except CorruptBlob as exc:
                # The body went missing or was altered (quarantined by the delivery side): the report is
                # still owed to the sender, without the original's headers.
                log.warning("event=dsn_without_original about=%s reason=%s", first.queue_id, exc.reason)
                original = b""
            try:
                report = build_dsn(
                    original=original, reporting_mta=self.settings.hostname, postmaster=self.settings.postmaster,
                    to=first.mail_from, envid=first.envid, ret=first.ret, arrival_date=first.received_at,
                    recipients=[_status(p, self.settings) for p in items],
                    message_id_domain=self.settings.hostname,
                )
            except ValueError:
                # A value no report can carry (a reverse-path beyond US-ASCII, an ENVID accepted before
                # the SMTP check was strict): settle these recipients without a report, so that one
                # entry cannot hold back every report queued after it (docs/security.md row 12).
                log.error("event=dsn_unbuildable about=%s recipients=%d", first.queue_id, len(items))
                await self.queue.writer.run(lambda c, items=items: _finish_in(c, items, now))
                continue
            envelope = Envelope(mail_from="", recipients=(Recipient(first.mail_from.lower()),),
                                principal=None, header_message_id=_message_id(report), protocol="dsn",
                                report_kind="dsn")

            def also(conn: sa.Connection, items: list[Pending] = items) -> None:
                _finish_in(conn, items, now)
                append_in(conn, AuditEvent.REPORT, actor="reports", protocol="dsn", mailbox=items[0].mail_from,
                          detail={"queue_id": items[0].queue_id, "kind": "delay" if items[0].delay else
                                  RecipientState.REPORT_PENDING[items[0].state]}, at=now)

            qid = await self.queue.enqueue(envelope, report, also=also)
            log.info("event=dsn_queued about=%s queue_id=%s recipients=%d", first.queue_id, qid, len(items))
            sent += 1
        self.sent += sent
        return sent


def _message_id(data: bytes) -> str | None:
    from mailserver.policy import header_message_id

    return header_message_id(data)


def record_report_in(conn: sa.Connection, data: bytes, now: dt.datetime) -> int:
    """Record a DSN or MDN delivered here against the message it is about; returns rows added."""
    rows = []
    dsn = parse_dsn(data)
    if dsn is not None:
        if dsn.original_message_id:
            for r in dsn.recipients:
                rows.append(dict(original_message_id=dsn.original_message_id,
                                 recipient=r.final_recipient or r.original_recipient or "unknown", kind="dsn",
                                 status=r.action.value if r.action else "unknown", detail=r.status, at=now))
    else:
        mdn = parse_mdn(data)
        if mdn is not None and mdn.original_message_id:
            error = mdn.disposition.error
            rows.append(dict(original_message_id=mdn.original_message_id,
                             recipient=mdn.final_recipient or mdn.original_recipient or "unknown", kind="mdn",
                             status=mdn.disposition.type.value,
                             detail=f"{int(error)} {error.ascii_label}"[:500] if error is not None else None,
                             at=now))
    for row in rows:
        conn.execute(sa.insert(delivery_reports).values(**row))
    return len(rows)
