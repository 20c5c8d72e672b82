"""Local delivery: moves queued messages into the recipients' mailboxes.

Each batch runs in one transaction that inserts the mailbox entries and marks the recipients delivered
together, and `messages.queue_recipient_id` is unique: a message is delivered exactly once even if the
process dies at any point (it is then either still queued or delivered, never both, never twice).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any, Callable

import sqlalchemy as sa

from directory.schema import mailboxes
from mailserver.audit import append_in
from mailserver.audit_api import AuditEvent
from mailserver.blobs import BlobStore
from mailserver.queue import Queue, QueueWorker, RecipientState
from mailserver.schema import queue_messages, queue_recipients
from mailserver.reports import record_report_in
from mailserver.store import SqlMailStore, deliver_in

log = logging.getLogger(__name__)

BATCH = 200


@dataclass(frozen=True)
class Delivered:
    queue_id: str
    rcpt: str
    folder_id: int
    uid: int


def _due_query(local_domains: frozenset[str], now: dt.datetime, limit: int) -> sa.Select[Any]:
    return (
        sa.select(
            queue_recipients.c.id, queue_recipients.c.rcpt, queue_recipients.c.message_id,
            queue_messages.c.blob, queue_messages.c.size, queue_messages.c.header_message_id,
            queue_messages.c.received_at, queue_messages.c.mail_from, queue_messages.c.report_kind,
            queue_recipients.c.notify,
        )
        .join(queue_messages, queue_messages.c.id == queue_recipients.c.message_id)
        .where(
            queue_recipients.c.state == RecipientState.QUEUED,
            sa.or_(*[queue_recipients.c.rcpt.like(f"%@{d}") for d in sorted(local_domains)]),
            queue_recipients.c.next_attempt_at <= now,
            sa.or_(queue_recipients.c.lease_expires.is_(None), queue_recipients.c.lease_expires < now),
        )
        .order_by(queue_recipients.c.id)
        .limit(limit)
    )


def prepare_final_blobs(engine: sa.Engine, blobs: BlobStore, local_domains: frozenset[str],
                        limit: int = BATCH) -> dict[str, tuple[str, int]]:
    """The message as it will rest in the mailbox, with its Return-Path (RFC 5321 §4.4: added at final
    delivery), for each message due locally: queue id → (blob, size). Read-only on the database."""
    now = dt.datetime.now(dt.timezone.utc)
    with engine.connect() as conn:
        rows = conn.execute(_due_query(local_domains, now, limit)).all()
    out: dict[str, tuple[str, int]] = {}
    for row in rows:
        if row.message_id in out:
            continue
        data = f"Return-Path: <{row.mail_from}>\r\n".encode("utf-8", errors="replace") + blobs.get(row.blob)
        out[row.message_id] = (blobs.put(data), len(data))
    return out


def deliver_due_in(conn: sa.Connection, local_domains: frozenset[str], limit: int = BATCH,
                   read_blob: Callable[[str], bytes] | None = None,
                   final_blobs: dict[str, tuple[str, int]] | None = None) -> list[Delivered]:
    """Deliver up to `limit` due local recipients inside the caller's transaction.

    With `final_blobs` (prepare_final_blobs) the mailbox gets the message with its Return-Path, and a
    recipient whose message was not prepared waits for the next round; without, the queued bytes as is.
    A recipient whose sender asked NOTIFY=SUCCESS is left with a success report to send (the
    "accusé de réception", mailserver.reports). A delivered report (DSN or MDN) is also recorded against
    the message it reports on (`delivery_reports`), when `read_blob` is given.
    """
    now = dt.datetime.now(dt.timezone.utc)
    due = conn.execute(
        _due_query(local_domains, now, limit).with_for_update(skip_locked=True, of=queue_recipients)
    ).all()
    done: list[Delivered] = []
    for row in due:
        domain = row.rcpt.rpartition("@")[2].lower()
        if domain not in local_domains:
            continue  # remote recipients belong to the relay
        if final_blobs is not None and row.message_id not in final_blobs:
            continue  # arrived after the preparation: next round
        mailbox = conn.execute(
            sa.select(mailboxes.c.id, mailboxes.c.address).where(
                mailboxes.c.address == row.rcpt.lower(), mailboxes.c.active.is_(True),
                mailboxes.c.hosted.is_(True),  # the national file lists other operators' mailboxes too
            )
        ).first()
        if mailbox is None:
            # The mailbox was closed after the recipient was accepted.
            conn.execute(
                sa.update(queue_recipients).where(queue_recipients.c.id == row.id).values(
                    state=RecipientState.FAILED, last_error="5.1.1 mailbox unavailable", updated_at=now)
            )
            log.info("event=delivery_failed queue_id=%s reason=mailbox_unavailable", row.message_id)
            continue
        blob, size = final_blobs[row.message_id] if final_blobs is not None else (row.blob, row.size)
        folder_id, uid = deliver_in(
            conn, mailbox.id, blob, size, header_message_id=row.header_message_id,
            queue_recipient_id=row.id, internaldate=now,
        )
        success_report = bool(row.mail_from) and not row.report_kind and "SUCCESS" in (row.notify or "")
        conn.execute(
            sa.update(queue_recipients).where(queue_recipients.c.id == row.id).values(
                state=RecipientState.DSN_DELIVERED if success_report else RecipientState.DELIVERED,
                attempts=queue_recipients.c.attempts + 1, last_attempt_at=now, updated_at=now)
        )
        if row.report_kind and read_blob is not None:
            record_report_in(conn, read_blob(row.blob), now)
        append_in(conn, AuditEvent.DELIVER, actor="delivery", protocol="local", mailbox=mailbox.address,
                  message_id=row.header_message_id, detail={"queue_id": row.message_id}, at=now)
        done.append(Delivered(row.message_id, mailbox.address, folder_id, uid))
    return done


class LocalDelivery(QueueWorker):
    """The delivery worker: woken by the queue on each acceptance, and every `poll` seconds."""

    name = "local-delivery"
    batch = BATCH

    def __init__(self, queue: Queue, store: SqlMailStore, local_domains: frozenset[str], *, poll: float = 1.0) -> None:
        super().__init__(queue, poll=poll)
        self.store = store
        self.local_domains = local_domains
        self.delivered = 0

    async def run_once(self) -> int:
        return len(await self.deliver())

    async def deliver(self) -> list[Delivered]:
        finals = await asyncio.to_thread(prepare_final_blobs, self.store.engine, self.store.blobs,
                                         self.local_domains)
        if not finals:
            return []
        done = await self.queue.writer.run(
            lambda conn: deliver_due_in(conn, self.local_domains, read_blob=self.store.read_blob,
                                        final_blobs=finals), before_commit=self.store.blobs.flush)
        for item in done:
            log.info("event=delivered queue_id=%s folder=%s uid=%s", item.queue_id, item.folder_id, item.uid)
        for folder_id in {d.folder_id for d in done}:
            self.store.notify(folder_id)
        self.delivered += len(done)
        if done:
            self.queue.notify()  # success reports may be due
        return done
