"""The durable queue (DESIGN.md §3).

`enqueue` returns only when the body and the queue rows are committed (a small body is a row of the same
transaction, a larger one a file fsynced before it, see blobs.py): the SMTP server answers 250 after that
and never before. Recipients carry state, attempts, next attempt and a lease
(owner, expiry) so that several workers, or several nodes, share one queue and a crashed worker's claims
come back when its lease expires.

A queue entry whose body is missing or no longer matches its content address is quarantined: the body is
set aside (`blobs/quarantine/`), its waiting recipients take the state `quarantined` (listed by
`caducee queue list --all`), the log says which entry and why — never what it held — and the rest of the
queue flows on.
"""

from __future__ import annotations

import abc
import asyncio
import datetime as dt
import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import Callable

import sqlalchemy as sa

from mailserver.audit import append_in
from mailserver.audit_api import AuditEvent
from mailserver.blobs import BlobStore
from mailserver.db import Writer, defer_in
from mailserver.schema import queue_messages, queue_recipients

log = logging.getLogger(__name__)


class RecipientState:
    QUEUED = "queued"  # due for (another) attempt at next_attempt_at
    DELIVERED = "delivered"  # in a local mailbox
    RELAYED = "relayed"  # accepted by the next operator
    FAILED = "failed"  # given up
    QUARANTINED = "quarantined"  # the entry is corrupt (body missing or altered): set aside, not retried
    # Final, with a delivery status notification still to send (mailserver.reports):
    DSN_DELIVERED = "dsn_delivered"
    DSN_RELAYED = "dsn_relayed"
    DSN_FAILED = "dsn_failed"

    FINAL = frozenset({DELIVERED, RELAYED, FAILED})
    REPORT_PENDING = {DSN_DELIVERED: DELIVERED, DSN_RELAYED: RELAYED, DSN_FAILED: FAILED}


@dataclass(frozen=True)
class Recipient:
    address: str
    notify: str | None = None  # RFC 3461 NOTIFY
    orcpt: str | None = None  # RFC 3461 ORCPT


@dataclass(frozen=True)
class Envelope:
    """One SMTP transaction's envelope, once every recipient was accepted."""

    mail_from: str
    recipients: tuple[Recipient, ...]
    principal: str | None = None  # national id of the authenticated submitter
    envid: str | None = None
    ret: str | None = None
    header_message_id: str | None = None
    protocol: str = "smtp"
    hops: int = 0  # Received fields on arrival
    report_kind: str | None = None  # "dsn" / "mdn" when the message is itself a report


_INSERT_MESSAGE = sa.insert(queue_messages)
_INSERT_RECIPIENT = sa.insert(queue_recipients)


def _insert_queued(conn: sa.Connection, items: list[tuple[dict[str, object], list[dict[str, object]]]]) -> None:
    """Insert queue entries: every message row, then every recipient row. Constant statements with bound
    parameters (compiled once, cached: the hot path)."""
    conn.execute(_INSERT_MESSAGE, [message for message, _ in items])
    conn.execute(_INSERT_RECIPIENT, [r for _, recipients in items for r in recipients])


THREAD_WRITE = 256 * 1024  # bytes above which a queued body's file is written by a thread, not the writer


def return_path(mail_from: str) -> bytes:
    """The trace field final delivery adds (RFC 5321 §4.4), as the queued blob starts with it."""
    return f"Return-Path: <{mail_from}>\r\n".encode("utf-8", errors="replace")


def relayed_content(blob: bytes, trace_length: int | None) -> bytes:
    """The message as received, without the Return-Path the queue put in front of it: what is relayed to
    the next operator (RFC 5321 §4.4: a relay adds none) and returned in a report."""
    return blob[trace_length:] if trace_length else blob


def new_queue_id() -> str:
    """Sortable, unguessable id: 12 hex digits of milliseconds, then 12 random hex digits."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


def quarantine_in(conn: sa.Connection, queue_id: str, reason: str, now: dt.datetime | None = None) -> int:
    """Set aside every recipient of `queue_id` still waiting (leased or not); returns how many."""
    now = now or dt.datetime.now(dt.timezone.utc)
    result = conn.execute(
        sa.update(queue_recipients)
        .where(queue_recipients.c.message_id == queue_id, queue_recipients.c.state == RecipientState.QUEUED)
        .values(state=RecipientState.QUARANTINED, lease_owner=None, lease_expires=None, updated_at=now,
                last_error=f"4.3.0 queue entry corrupt: body {reason}"[:500])
    )
    return result.rowcount


class Queue:
    def __init__(self, writer: Writer, blobs: BlobStore, *, node: str | None = None) -> None:
        self.writer = writer
        self.blobs = blobs
        self.node = node or f"{os.uname().nodename}:{os.getpid()}"
        self._subscribers: list[asyncio.Event] = []
        # Called by `notify` too: an acceptor process tells the process that delivers (caducee.acceptors).
        self.forward: Callable[[], None] | None = None
        self.quarantined = 0

    def subscribe(self) -> asyncio.Event:
        """An event set whenever work may be due (a message was queued, a state changed)."""
        event = asyncio.Event()
        self._subscribers.append(event)
        return event

    def notify(self) -> None:
        for event in self._subscribers:
            event.set()
        if self.forward is not None:
            self.forward()

    async def enqueue(self, envelope: Envelope, data: bytes, *, queue_id: str | None = None,
                      also: Callable[[sa.Connection], None] | None = None) -> str:
        """Store the body and the queue rows durably; returns the queue id.

        The blob is the message as it will rest in a mailbox: `Return-Path: <reverse-path>` (RFC 5321
        §4.4) then `data`; its length is kept (`trace_length`) for relaying and returned content, which
        leave it out (`relayed_content`). So local delivery points the mailbox entry at this blob, with
        no second copy. `also` runs in the same transaction (a report marks what it reports on,
        atomically).
        """
        trace = return_path(envelope.mail_from)
        stored = trace + data
        # A large message's file is written by a thread, not to hold up the writer's batch; a smaller one
        # by the writer itself, in the job (a row of its transaction, or a file): no thread hop of its
        # own, and the event loop never waits on the filesystem. Both are content-addressed and
        # idempotent, so a job run twice (db.Writer) stores once.
        blob = await asyncio.to_thread(self.blobs.put, stored) if len(stored) > THREAD_WRITE else None
        queue_id = queue_id or new_queue_id()
        now = dt.datetime.now(dt.timezone.utc)
        size, trace_length = len(stored), len(trace)

        def job(conn: sa.Connection) -> None:
            address = blob or self.blobs.put_in(conn, stored)
            rows = (
                dict(id=queue_id, blob=address, size=size, mail_from=envelope.mail_from,
                     envid=envelope.envid, ret=envelope.ret, principal=envelope.principal,
                     header_message_id=envelope.header_message_id, received_at=now,
                     hops=envelope.hops, report_kind=envelope.report_kind, trace_length=trace_length),
                [dict(message_id=queue_id, rcpt=r.address, notify=r.notify, orcpt=r.orcpt,
                      state=RecipientState.QUEUED, attempts=0, next_attempt_at=now, updated_at=now)
                 for r in envelope.recipients],
            )
            # In a writer batch the rows of every message go in together at the end (two statements per
            # batch instead of two per message); a job with `also` inserts its own first, for `also`.
            if also is not None or not defer_in(conn, "queue", _insert_queued, rows):
                _insert_queued(conn, [rows])
            append_in(conn, AuditEvent.SUBMIT, actor=envelope.principal or "unknown", protocol=envelope.protocol,
                      mailbox=envelope.mail_from or None, message_id=envelope.header_message_id,
                      detail={"queue_id": queue_id, "recipients": str(len(envelope.recipients))}, at=now)
            if also is not None:
                also(conn)

        await self.writer.run(job, before_commit=self.blobs.flush)
        self.notify()
        return queue_id

    async def quarantine(self, queue_id: str, blob: str, reason: str) -> int:
        """Set a corrupt entry aside: its body first (so that no new message of the same bytes can be
        taken for it), then its waiting recipients. Idempotent; returns the recipients set aside."""
        moved = await asyncio.to_thread(self.blobs.quarantine, blob)

        def job(conn: sa.Connection) -> int:
            self.blobs.discard_corrupt_in(conn, blob)
            return quarantine_in(conn, queue_id, reason)

        count = await self.writer.run(job)
        self.quarantined += count
        log.error("event=quarantined queue_id=%s reason=%s recipients=%d file=%s", queue_id, reason, count,
                  f"quarantine/{moved.name}" if moved else "none")
        return count


class QueueWorker(abc.ABC):
    """A loop woken by the queue (and every `poll` seconds) that runs `run_once` until stopped.

    `run_once` returns how much it did; a full batch runs again at once. The wake-up is cleared before
    each batch, so work committed during a batch re-arms it and is never left waiting for the poll.
    """

    name = "queue-worker"
    batch = 0  # run again at once when run_once returns at least this much (0: never)
    # Seconds between two runs at least: a worker whose work is not urgent gathers the wake-ups of a burst
    # (one per accepted message) into one run instead of a database round per message.
    min_interval = 0.0

    def __init__(self, queue: Queue, *, poll: float = 1.0) -> None:
        self.queue = queue
        self.poll = poll
        self.wakeup = queue.subscribe()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @abc.abstractmethod
    async def run_once(self) -> int:
        """One batch of work; returns how much was done."""

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        self._stopping = True
        self.wakeup.set()
        if self._task:
            await self._task

    async def _run(self) -> None:
        while not self._stopping:
            self.wakeup.clear()
            try:
                done = await self.run_once()
            except Exception:  # noqa: BLE001 - keep the worker alive; the batch is retried
                log.exception("event=worker_batch_failed worker=%s", self.name)
                done = 0
            if self.batch and done >= self.batch:
                continue
            if self.min_interval and not self._stopping:
                await asyncio.sleep(self.min_interval)
            try:
                await asyncio.wait_for(self.wakeup.wait(), timeout=self.poll)
            except asyncio.TimeoutError:
                pass
