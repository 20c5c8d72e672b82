"""The queue, delivery, store and audit trail on PostgreSQL, the multi-node backend (DESIGN.md §3, §6).

Two writers stand for two nodes sharing one database: every message is delivered exactly once.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from caducee import database
from directory.identifiers import PrincipalKind
from directory.model import MailboxType
from directory.store import DirectoryStore
from mailserver import audit
from mailserver.blobs import BlobStore
from mailserver.db import Writer, make_engine
from mailserver.delivery import deliver_due_in
from mailserver.queue import Envelope, Queue, Recipient
from mailserver.schema import inline_blobs, messages, queue_recipients
from mailserver.store import SqlMailStore

ADMIN_URL = os.environ.get("CADUCEE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
DOMAIN = "caducee.test"


@pytest.fixture
def pg_url() -> Iterator[str]:
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"caducee_test_{secrets.token_hex(4)}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {ADMIN_URL}: {type(exc).__name__}")
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    database.upgrade(url)
    yield url
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.dispose()


def test_two_nodes_deliver_each_message_exactly_once(pg_url: str, tmp_path: Path) -> None:
    read = make_engine(pg_url)
    node_a, node_b = Writer(make_engine(pg_url, writer=True)), Writer(make_engine(pg_url, writer=True))
    directory = DirectoryStore(node_a.engine)
    person = directory.add_principal(PrincipalKind.PERSON, "810001234565", "Camille Martin")
    directory.add_mailbox(f"camille@{DOMAIN}", MailboxType.PER, person)
    blobs = BlobStore(tmp_path / "blobs", engine=read)  # small bodies are rows of the PostgreSQL database
    queue = Queue(node_a, blobs)

    async def main() -> None:
        env = Envelope(f"camille@{DOMAIN}", (Recipient(f"camille@{DOMAIN}"),), principal=person.national_id)
        # 150 distinct bodies among 200 messages: the same bytes come twice within writer batches.
        await asyncio.gather(*(queue.enqueue(env, b"Subject: %d\r\n\r\nx\r\n" % (i % 150)) for i in range(200)))

        async def drain(writer: Writer) -> int:
            total = 0
            while True:
                done = await writer.run(lambda c: deliver_due_in(c, frozenset({DOMAIN}), limit=7))
                if not done:
                    return total
                total += len(done)

        a, b = await asyncio.gather(drain(node_a), drain(node_b))
        assert a + b == 200
        assert a > 0 and b > 0  # both nodes took part (SKIP LOCKED let them share the queue)

    try:
        asyncio.run(main())
        with read.connect() as conn:
            uids = conn.execute(sa.select(messages.c.uid).order_by(messages.c.uid)).scalars().all()
            states = set(conn.execute(sa.select(queue_recipients.c.state)).scalars())
        assert uids == list(range(1, 201))  # one entry per message, UIDs strictly ascending, no gap
        assert states == {"delivered"}
        assert audit.verify(read) == (400, None)  # 200 submissions + 200 deliveries, chain intact
        with read.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(inline_blobs)).scalar_one() == 150
        assert not list((tmp_path / "blobs").glob("[0-9a-f][0-9a-f]/*")), "no body went to a file"

        store = SqlMailStore(read, node_a, blobs)
        inbox = store.list_folders(1)[0]
        assert (inbox.name, inbox.exists, inbox.unseen) == ("INBOX", 200, 200)
        changed = asyncio.run(store.set_flags(inbox.id, [1, 2], ["\\Seen", "\\Deleted"], "add"))
        assert changed[1] == frozenset({"\\Seen", "\\Deleted"})
        assert asyncio.run(store.expunge(inbox.id)) == [1, 2]
        third = store.messages(inbox.id, [3])[0]
        assert store.read_blob(third.blob) == b"Return-Path: <camille@caducee.test>\r\nSubject: 2\r\n\r\nx\r\n"
        assert store.read_header(third.blob) == b"Return-Path: <camille@caducee.test>\r\nSubject: 2\r\n\r\n"
    finally:
        for w in (node_a, node_b):
            w.stop()
            w.engine.dispose()
        read.dispose()
