"""The writer's group commit, the durable queue, exactly-once local delivery and the audit chain."""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from directory.identifiers import PrincipalKind
from directory.model import MailboxType
from directory.store import DirectoryStore
from mailserver import audit, db
from mailserver.audit_api import AuditEvent
from mailserver.blobs import BlobStore
from mailserver.db import Writer
from mailserver.delivery import LocalDelivery, deliver_due_in
from mailserver.queue import Envelope, Queue, Recipient, relayed_content
from mailserver.schema import audit_log, messages, queue_messages, queue_recipients
from mailserver.store import SqlMailStore

DOMAIN = "caducee.test"


def _directory(read: sa.Engine, writer: Writer) -> DirectoryStore:
    d = DirectoryStore(writer.engine)
    p = d.add_principal(PrincipalKind.PERSON, "810001234565", "Camille Martin")
    d.add_mailbox(f"camille@{DOMAIN}", MailboxType.PER, p)
    q = d.add_principal(PrincipalKind.PERSON, "810002345675", "Louis Bernard")
    d.add_mailbox(f"louis@{DOMAIN}", MailboxType.PER, q)
    return DirectoryStore(read)


def test_group_commit_batches_concurrent_jobs(engines: tuple[sa.Engine, Writer]) -> None:
    read, writer = engines

    async def main() -> list[int]:
        def job(i: int):  # type: ignore[no-untyped-def]
            return lambda conn: (audit.append_in(conn, AuditEvent.ADMIN, actor=f"a{i}"), i)[1]

        return await asyncio.gather(*(writer.run(job(i)) for i in range(300)))

    results = asyncio.run(main())
    assert results == list(range(300))
    assert writer.jobs == 300
    assert writer.batches < 300  # several jobs shared one commit
    with read.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar() == 300


def test_failed_job_does_not_sink_its_batch(engines: tuple[sa.Engine, Writer]) -> None:
    read, writer = engines

    def bad(conn: sa.Connection) -> None:
        audit.append_in(conn, AuditEvent.ADMIN, actor="bad")
        raise ValueError("boom")

    async def main() -> list[object]:
        return await asyncio.gather(
            writer.run(lambda c: audit.append_in(c, AuditEvent.ADMIN, actor="good1")),
            writer.run(bad),
            writer.run(lambda c: audit.append_in(c, AuditEvent.ADMIN, actor="good2")),
            return_exceptions=True,
        )

    results = asyncio.run(main())
    assert isinstance(results[1], ValueError)
    with read.connect() as conn:
        actors = conn.execute(sa.select(audit_log.c.actor).order_by(audit_log.c.seq)).scalars().all()
    assert actors == ["good1", "good2"]
    assert audit.verify(read) == (2, None)


def _checkouts(writer: Writer) -> list[int]:
    """Counts the writer engine's pool checkouts (a new connection for a batch)."""
    seen: list[int] = []
    sa.event.listen(writer.engine, "checkout", lambda *_: seen.append(1))
    return seen


def test_writer_keeps_its_connection_between_batches(engines: tuple[sa.Engine, Writer]) -> None:
    read, writer = engines
    checkouts = _checkouts(writer)

    async def main() -> None:
        for i in range(20):  # one after the other: 20 batches
            await writer.run(lambda c, i=i: audit.append_in(c, AuditEvent.ADMIN, actor=f"a{i}"))

    asyncio.run(main())
    assert writer.batches == 20
    assert len(checkouts) == 1
    assert audit.verify(read) == (20, None)


def test_writer_takes_a_new_connection_after_a_failed_commit(engines: tuple[sa.Engine, Writer]) -> None:
    read, writer = engines
    checkouts = _checkouts(writer)

    def failing_flush() -> None:
        raise OSError("fsync failed")

    async def main() -> None:
        await writer.run(lambda c: audit.append_in(c, AuditEvent.ADMIN, actor="first"))
        with pytest.raises(OSError):
            await writer.run(lambda c: audit.append_in(c, AuditEvent.ADMIN, actor="lost"), before_commit=failing_flush)
        await writer.run(lambda c: audit.append_in(c, AuditEvent.ADMIN, actor="after"))

    asyncio.run(main())
    assert len(checkouts) == 2
    with read.connect() as conn:
        assert conn.execute(sa.select(audit_log.c.actor).order_by(audit_log.c.seq)).scalars().all() == ["first", "after"]


def test_writer_gives_back_an_idle_connection(engines: tuple[sa.Engine, Writer], monkeypatch: pytest.MonkeyPatch) -> None:
    _, writer = engines
    monkeypatch.setattr(db, "IDLE_RECHECK", 0.0)
    checkouts = _checkouts(writer)

    async def main() -> None:
        for i in range(3):
            await writer.run(lambda c, i=i: audit.append_in(c, AuditEvent.ADMIN, actor=f"a{i}"))

    asyncio.run(main())
    assert len(checkouts) == 3


def test_writer_runs_a_job_again_when_its_kept_connection_died(engines: tuple[sa.Engine, Writer]) -> None:
    read, writer = engines
    assert writer.engine.dialect.name == "sqlite"  # PostgreSQL's restart: tests/faults/test_database_restart
    checkouts = _checkouts(writer)

    async def main() -> None:
        await writer.run(lambda c: audit.append_in(c, AuditEvent.ADMIN, actor="before"))
        assert writer._conn is not None
        writer._conn.connection.dbapi_connection.close()  # type: ignore[union-attr]  # as a restarted server would
        await writer.run(lambda c: audit.append_in(c, AuditEvent.ADMIN, actor="after"))

    asyncio.run(main())
    assert len(checkouts) == 2
    with read.connect() as conn:
        assert conn.execute(sa.select(audit_log.c.actor).order_by(audit_log.c.seq)).scalars().all() == ["before", "after"]


def test_writers_of_one_sqlite_file_take_turns_through_its_lock(engines: tuple[sa.Engine, Writer]) -> None:
    read, writer = engines
    lock_path = db.writer_lock_path(writer.engine.url)
    assert lock_path is not None and lock_path.name.endswith(".db-writer.lock")
    # Another process's writer in its transaction: this one waits for the lock, not for SQLite's busy sleeps.
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        done = threading.Event()
        waiting = threading.Thread(target=lambda: (writer.run_sync(
            lambda c: audit.append_in(c, AuditEvent.ADMIN, actor="waited")), done.set()))
        waiting.start()
        assert not done.wait(0.5)
        with read.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar_one() == 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert done.wait(10)
        waiting.join()
    finally:
        os.close(fd)
    # Its lock is free again once the transaction is over.
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    assert audit.verify(read) == (1, None)


def test_fire_and_forget_jobs_ride_with_the_next_batch_in_submission_order(
        engines: tuple[sa.Engine, Writer], monkeypatch: pytest.MonkeyPatch) -> None:
    read, writer = engines
    monkeypatch.setattr(db, "RIDE_ALONG", 2.0)

    def entry(actor: str) -> Callable[[sa.Connection], None]:
        return lambda c: audit.append_in(c, AuditEvent.ADMIN, actor=actor)

    async def main() -> None:
        writer.submit_nowait(entry("login"))  # no commit of its own ...
        await asyncio.sleep(0.2)
        await writer.run(entry("message"))  # ... it goes with this one, first
        assert writer.batches == 1
        tasks = []
        for i in range(5):  # interleaved: the trail keeps the order they were submitted in
            writer.submit_nowait(entry(f"event-{i}"))
            tasks.append(asyncio.create_task(writer.run(entry(f"job-{i}"))))
            await asyncio.sleep(0)  # the task submits its job now
        await asyncio.gather(*tasks)

    asyncio.run(main())
    with read.connect() as conn:
        actors = conn.execute(sa.select(audit_log.c.actor).order_by(audit_log.c.seq)).scalars().all()
    assert actors == ["login", "message"] + [a for i in range(5) for a in (f"event-{i}", f"job-{i}")]
    assert audit.verify(read) == (12, None)


def test_a_fire_and_forget_job_alone_is_committed_after_a_short_wait(engines: tuple[sa.Engine, Writer]) -> None:
    read, writer = engines

    def count() -> int:
        with read.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar_one())

    writer.submit_nowait(lambda c: audit.append_in(c, AuditEvent.ADMIN, actor="alone"))
    deadline = time.monotonic() + 5
    while count() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert count() == 1 and writer.batches == 1
    writer.submit_nowait(lambda c: audit.append_in(c, AuditEvent.ADMIN, actor="at-stop"))
    writer.stop()  # stopping commits what is waiting
    assert count() == 2


def test_only_sqlite_files_have_a_writer_lock(tmp_path: Path) -> None:
    assert db.writer_lock_path(f"sqlite:///{tmp_path}/caducee.db") == tmp_path / "caducee.db-writer.lock"
    assert db.writer_lock_path("sqlite://") is None
    assert db.writer_lock_path("sqlite:///:memory:") is None
    assert db.writer_lock_path("postgresql+psycopg://caducee@127.0.0.1:5432/caducee") is None


def test_enqueue_then_deliver_exactly_once(engines: tuple[sa.Engine, Writer], tmp_path: Path) -> None:
    read, writer = engines
    _directory(read, writer)
    blobs = BlobStore(tmp_path / "blobs")
    queue = Queue(writer, blobs)
    store = SqlMailStore(read, writer, blobs)
    body = b"From: camille@caducee.test\r\nTo: louis@caducee.test\r\nSubject: CR\r\n\r\nbonjour\r\n"
    notified: list[int] = []

    async def main() -> None:
        env = Envelope(f"camille@{DOMAIN}", (Recipient(f"louis@{DOMAIN}"), Recipient(f"camille@{DOMAIN}")),
                       principal="810001234565", header_message_id="<m1@test>")
        qid = await queue.enqueue(env, body)
        assert len(qid) == 24
        delivery = LocalDelivery(queue, store, frozenset({DOMAIN}))
        louis_inbox = store.get_folder(2, "INBOX")
        assert louis_inbox is not None
        store.add_listener(louis_inbox.id, notified.append)
        first = await delivery.deliver()
        second = await delivery.deliver()
        assert len(first) == 2 and second == []

    asyncio.run(main())
    assert notified  # IDLE listeners heard of the delivery
    with read.connect() as conn:
        rows = conn.execute(sa.select(messages)).all()
        states = conn.execute(sa.select(queue_recipients.c.state)).scalars().all()
    assert len(rows) == 2 and {r.uid for r in rows} == {1}
    assert set(states) == {"delivered"}
    # The mailbox copy is the queued blob itself, Return-Path first (RFC 5321 §4.4): no second file.
    with read.connect() as conn:
        queued = conn.execute(sa.select(queue_messages.c.blob, queue_messages.c.size,
                                        queue_messages.c.trace_length)).one()
    assert {r.blob for r in rows} == {queued.blob}
    assert blobs.get(queued.blob) == b"Return-Path: <camille@caducee.test>\r\n" + body
    assert {r.size for r in rows} == {queued.size} == {len(body) + queued.trace_length}
    assert relayed_content(blobs.get(queued.blob), queued.trace_length) == body
    assert sum(1 for shard in blobs.root.iterdir() if shard.name != "tmp" for _ in shard.iterdir()) == 1
    events = [e.event for e in audit.entries(read)]
    assert events.count("submit") == 1 and events.count("deliver") == 2
    # Delivering again in a fresh transaction finds nothing: the unique queue_recipient_id holds.
    assert writer.run_sync(lambda c: deliver_due_in(c, frozenset({DOMAIN}))) == []


def test_audit_chain_detects_tampering(engines: tuple[sa.Engine, Writer]) -> None:
    read, writer = engines
    for i in range(5):
        writer.run_sync(lambda c, i=i: audit.append_in(c, AuditEvent.LOGIN, actor=f"81000000000{i}"))
    assert audit.verify(read) == (5, None)
    with writer.engine.begin() as conn:
        conn.execute(sa.update(audit_log).where(audit_log.c.seq == 3).values(actor="someone-else"))
    count, broken = audit.verify(read)
    assert (count, broken) == (2, 3)


def test_blob_store_is_content_addressed(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    a = blobs.put(b"x" * 100)
    assert blobs.put(b"x" * 100) == a
    assert blobs.get(a) == b"x" * 100
    assert not any((tmp_path / "tmp").iterdir())  # no temporary file left behind
    with pytest.raises(ValueError):
        blobs.path("../../etc/passwd")


def test_a_failing_flush_before_commit_acknowledges_nothing(engines: tuple[sa.Engine, Writer]) -> None:
    read, writer = engines
    calls: list[int] = []

    class Disk:
        def flush(self) -> None:
            calls.append(1)
            raise OSError("fsync failed")

    disk = Disk()
    with pytest.raises(OSError):
        writer.run_sync(lambda c: audit.append_in(c, AuditEvent.ADMIN, actor="x"), before_commit=disk.flush)
    assert calls == [1]
    with read.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar() == 0
    # hooks of one owner run once per batch, however many jobs name them
    flushed: list[int] = []

    class Blobs:
        def flush(self) -> None:
            flushed.append(1)

    blobs = Blobs()

    async def many() -> None:
        await asyncio.gather(*(writer.run(lambda c: None, before_commit=blobs.flush) for _ in range(50)))

    asyncio.run(many())
    assert 1 <= len(flushed) <= writer.batches


def test_an_entry_queued_before_its_return_path_was_kept_still_gets_one(engines: tuple[sa.Engine, Writer],
                                                                        tmp_path: Path) -> None:
    """Entries queued before migration 0005 have a blob without Return-Path (`trace_length` NULL): the
    mailbox gets a copy with the field added, as before."""
    read, writer = engines
    _directory(read, writer)
    blobs = BlobStore(tmp_path / "blobs")
    queue = Queue(writer, blobs)
    store = SqlMailStore(read, writer, blobs)
    body = b"From: camille@caducee.test\r\nTo: louis@caducee.test\r\nSubject: old\r\n\r\nbonjour\r\n"

    async def main() -> None:
        await queue.enqueue(Envelope(f"camille@{DOMAIN}", (Recipient(f"louis@{DOMAIN}"),)), body)
        old = blobs.put_durable(body)  # as a queue entry of an earlier version held it
        writer.run_sync(lambda c: c.execute(sa.update(queue_messages).values(blob=old, size=len(body),
                                                                               trace_length=None)))
        assert len(await LocalDelivery(queue, store, frozenset({DOMAIN})).deliver()) == 1

    asyncio.run(main())
    with read.connect() as conn:
        (row,) = conn.execute(sa.select(messages)).all()
    assert blobs.get(row.blob) == b"Return-Path: <camille@caducee.test>\r\n" + body
    assert row.size == len(blobs.get(row.blob))


def test_audit_canonical_form_is_stable() -> None:
    # Chains written by earlier versions must still verify: the canonical bytes may never change.
    at = dt.datetime(2026, 1, 2, 3, 4, 5, 6789, tzinfo=dt.timezone.utc)
    canonical = audit._canonical(at, "submit", "810001234565", "smtp", "é@caducee.test", "<m@x>",
                                 audit._DETAIL.encode({"z": "1", "a": "é"}))
    assert canonical == ('["2026-01-02T03:04:05.006789+00:00","submit","810001234565","smtp","é@caducee.test",'
                         '"<m@x>","{\\"a\\":\\"é\\",\\"z\\":\\"1\\"}"]').encode()
    assert audit.chain_hash(audit.GENESIS, canonical) == hashlib.sha256(audit.GENESIS.encode() + canonical).hexdigest()
