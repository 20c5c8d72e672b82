"""Read receipts ("accusés de lecture", RFC 8098) sent by the server when a recipient reads a message.

When a message that asks for one (Disposition-Notification-To) first becomes \\Seen in its recipient's
mailbox, and RFC 8098 §2.1 allows an automatic answer (one requester, the same as the Return-Path), the
server queues a `displayed` MDN from the mailbox to the requester, with the null reverse-path. The
`$MDNSent` keyword (RFC 3503) is set in the same transaction that queues the receipt: exactly one receipt
per message, whichever session or node marks it read. Messages that may only be answered with the
user's consent are left to the client (or `caducee mdn --manual`).
"""

from __future__ import annotations

import asyncio
import logging

import sqlalchemy as sa

from directory.schema import mailboxes
from mailserver.mdn import Disposition, DispositionType, build_mdn, mdn_request
from mailserver.policy import header_message_id
from mailserver.queue import Envelope, Queue, Recipient
from mailserver.schema import folders, messages
from mailserver.store import SqlMailStore, _flags_set, _flags_text

log = logging.getLogger(__name__)

MDN_SENT = "$MDNSent"  # RFC 3503


class _AlreadySent(Exception):
    pass


class ReadReceipts:
    def __init__(self, store: SqlMailStore, queue: Queue, *, hostname: str) -> None:
        self.store = store
        self.queue = queue
        self.hostname = hostname
        self.sent = 0
        self._tasks: set[asyncio.Task[None]] = set()
        store.on_seen = self.on_seen

    def on_seen(self, folder_id: int, uids: list[int]) -> None:
        task = asyncio.ensure_future(self._answer(folder_id, uids))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _answer(self, folder_id: int, uids: list[int]) -> None:
        try:
            rows = await asyncio.to_thread(self._candidates, folder_id, uids)
            for uid, blob, address in rows:
                await self._answer_one(folder_id, uid, blob, address)
        except Exception as exc:  # noqa: BLE001 - a receipt must never break the reader's session
            log.error("event=read_receipt_failed folder=%s error=%s", folder_id, type(exc).__name__)

    def _candidates(self, folder_id: int, uids: list[int]) -> list[tuple[int, str, str]]:
        query = (sa.select(messages.c.uid, messages.c.blob, messages.c.flags, mailboxes.c.address)
                 .join(folders, folders.c.id == messages.c.folder_id)
                 .join(mailboxes, mailboxes.c.id == folders.c.mailbox_id)
                 .where(messages.c.folder_id == folder_id, messages.c.uid.in_(uids)))
        with self.store.engine.connect() as conn:
            return [(int(r.uid), r.blob, r.address) for r in conn.execute(query)
                    if MDN_SENT not in _flags_set(r.flags)]

    async def _answer_one(self, folder_id: int, uid: int, blob: str, address: str) -> None:
        raw = await asyncio.to_thread(self.store.read_blob, blob)
        request = mdn_request(raw)
        if request is None or not request.automatic_allowed:
            return
        report = build_mdn(
            original=raw, final_recipient=address, reporting_ua=f"{self.hostname}; Caducee",
            disposition=Disposition(action_mode="manual-action", sending_mode="MDN-sent-automatically",
                                    type=DispositionType.DISPLAYED),
            from_addr=address, message_id_domain=self.hostname,
        )

        def mark(conn: sa.Connection) -> None:
            row = conn.execute(sa.select(messages.c.id, messages.c.flags).where(
                messages.c.folder_id == folder_id, messages.c.uid == uid)).first()
            if row is None or MDN_SENT in _flags_set(row.flags):
                raise _AlreadySent()
            conn.execute(sa.update(messages).where(messages.c.id == row.id).values(
                flags=_flags_text(_flags_set(row.flags) | {MDN_SENT})))

        envelope = Envelope(mail_from="", recipients=(Recipient(request.notify_to[0].lower()),),
                            header_message_id=header_message_id(report), protocol="mdn", report_kind="mdn")
        try:
            qid = await self.queue.enqueue(envelope, report, also=mark)
        except _AlreadySent:
            return
        self.sent += 1
        log.info("event=read_receipt_queued queue_id=%s folder=%s uid=%s", qid, folder_id, uid)
