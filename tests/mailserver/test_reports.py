"""Delivery reports: exactly one per recipient, never to the null sender, never about a report."""

from __future__ import annotations

import asyncio
from pathlib import Path

import sqlalchemy as sa

from directory.identifiers import PrincipalKind
from directory.model import MailboxType
from directory.store import DirectoryStore
from mailserver.blobs import BlobStore
from mailserver.db import Writer
from mailserver.delivery import LocalDelivery
from mailserver.queue import Envelope, Queue, Recipient, RecipientState
from mailserver.reports import ReportSettings, ReportWorker
from mailserver.schema import delivery_reports, queue_messages, queue_recipients
from mailserver.store import SqlMailStore

DOMAIN = "a.test"
BODY = b"From: camille@a.test\r\nTo: louis@a.test\r\nSubject: CR\r\nMessage-ID: <cr-1@a.test>\r\n\r\nx\r\n"


def _setup(engines: tuple[sa.Engine, Writer], tmp_path: Path) -> tuple[Queue, LocalDelivery, ReportWorker]:
    read, writer = engines
    d = DirectoryStore(writer.engine)
    for nid, local in (("810001234565", "camille"), ("810002345675", "louis")):
        p = d.add_principal(PrincipalKind.PERSON, nid, local)
        d.add_mailbox(f"{local}@{DOMAIN}", MailboxType.PER, p)
    blobs = BlobStore(tmp_path / "blobs")
    queue = Queue(writer, blobs)
    store = SqlMailStore(read, writer, blobs)
    settings = ReportSettings(hostname="mx.a.test", postmaster=f"mailer-daemon@{DOMAIN}", delay_warning=3600,
                              max_lifetime=86400)
    return queue, LocalDelivery(queue, store, frozenset({DOMAIN})), ReportWorker(queue, blobs, settings)


def test_success_report_once_and_correlated(engines: tuple[sa.Engine, Writer], tmp_path: Path) -> None:
    read, _ = engines
    queue, delivery, reports = _setup(engines, tmp_path)

    async def main() -> None:
        await queue.enqueue(Envelope(f"camille@{DOMAIN}", (Recipient(f"louis@{DOMAIN}", "SUCCESS"),),
                                     header_message_id="<cr-1@a.test>"), BODY)
        await delivery.run_once()
        assert await reports.run_once() == 1
        assert await reports.run_once() == 0  # exactly one report
        await delivery.run_once()  # the report reaches camille's mailbox

    asyncio.run(main())
    with read.connect() as conn:
        msgs = conn.execute(sa.select(queue_messages).order_by(queue_messages.c.received_at)).all()
        states = dict(conn.execute(sa.select(queue_recipients.c.rcpt, queue_recipients.c.state)).all())
        correlated = conn.execute(sa.select(delivery_reports)).all()
    assert [m.report_kind for m in msgs] == [None, "dsn"]
    assert msgs[1].mail_from == ""  # reports travel with the null reverse-path
    assert states == {f"louis@{DOMAIN}": RecipientState.DELIVERED, f"camille@{DOMAIN}": RecipientState.DELIVERED}
    assert [(c.original_message_id, c.kind, c.status) for c in correlated] == [("<cr-1@a.test>", "dsn", "delivered")]


def test_no_report_to_the_null_sender(engines: tuple[sa.Engine, Writer], tmp_path: Path) -> None:
    read, writer = engines
    queue, delivery, reports = _setup(engines, tmp_path)

    async def main() -> None:
        await queue.enqueue(Envelope("", (Recipient(f"louis@{DOMAIN}", "SUCCESS"),)), BODY)
        await delivery.run_once()
        # a failed recipient of a null-sender message, forced: finished without any report
        qid = await queue.enqueue(Envelope("", (Recipient("x@b.test"),)), BODY)
        writer.run_sync(lambda c: c.execute(sa.update(queue_recipients).where(
            queue_recipients.c.message_id == qid).values(state=RecipientState.DSN_FAILED)))
        assert await reports.run_once() == 0

    asyncio.run(main())
    with read.connect() as conn:
        kinds = conn.execute(sa.select(queue_messages.c.report_kind)).scalars().all()
        states = conn.execute(sa.select(queue_recipients.c.state).order_by(queue_recipients.c.id)).scalars().all()
    assert kinds == [None, None]
    assert states == [RecipientState.DELIVERED, RecipientState.FAILED]


def test_a_report_that_cannot_be_built_does_not_hold_back_the_others(engines: tuple[sa.Engine, Writer],
                                                                     tmp_path: Path) -> None:
    """Regression (docs/security.md row 12): an ENVID decoding to CR LF was accepted at MAIL and refused by
    build_dsn; the ValueError failed the whole batch at every run, so no report queued after it was ever
    sent. Such an entry is now settled without a report and the others go out."""
    read, _ = engines
    queue, delivery, reports = _setup(engines, tmp_path)

    async def main() -> None:
        await queue.enqueue(Envelope(f"camille@{DOMAIN}", (Recipient(f"louis@{DOMAIN}", "SUCCESS"),),
                                     envid="a+0D+0AX-Injected:+20yes"), BODY)
        await queue.enqueue(Envelope(f"camille@{DOMAIN}", (Recipient(f"louis@{DOMAIN}", "SUCCESS"),),
                                     envid="good", header_message_id="<cr-1@a.test>"), BODY)
        await delivery.run_once()
        assert await reports.run_once() == 1
        assert await reports.run_once() == 0

    asyncio.run(main())
    with read.connect() as conn:
        states = conn.execute(sa.select(queue_recipients.c.state).order_by(queue_recipients.c.id)).scalars().all()
        kinds = conn.execute(sa.select(queue_messages.c.report_kind, queue_messages.c.envid)
                             .order_by(queue_messages.c.received_at)).all()
    assert states[:2] == [RecipientState.DELIVERED, RecipientState.DELIVERED]
    assert [k for k, _ in kinds] == [None, None, "dsn"]


def test_a_report_about_a_vanished_body_is_still_sent(engines: tuple[sa.Engine, Writer], tmp_path: Path) -> None:
    """The original's body went missing after delivery (a corrupt entry, a lost file): the success report is
    still owed and sent, without the original's headers, and the reports behind it are not held back."""
    read, _ = engines
    queue, delivery, reports = _setup(engines, tmp_path)

    async def main() -> None:
        await queue.enqueue(Envelope(f"camille@{DOMAIN}", (Recipient(f"louis@{DOMAIN}", "SUCCESS"),),
                                     header_message_id="<cr-1@a.test>"), BODY)
        await delivery.run_once()
        with read.connect() as conn:
            queued = conn.execute(sa.select(queue_messages.c.blob)).scalar_one()
        reports.blobs.path(queued).unlink()  # the queued body is gone
        assert await reports.run_once() == 1
        assert await reports.run_once() == 0

    asyncio.run(main())
    with read.connect() as conn:
        msgs = conn.execute(sa.select(queue_messages).order_by(queue_messages.c.received_at)).all()
    assert [m.report_kind for m in msgs] == [None, "dsn"]
    report = reports.blobs.get(msgs[1].blob)
    assert b"Action: delivered" in report and b"Subject: CR" not in report
