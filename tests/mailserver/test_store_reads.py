"""The mailbox store's reads for IMAP (mailserver/store.py): messages by UID, (UID, flags) listings, counts
and header-only reads, each checked against the plain read it replaces."""

from __future__ import annotations

import asyncio
import datetime as dt
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
from mailserver.blobs import BlobStore
from mailserver.db import Writer
from mailserver.imap_server import split_message
from mailserver.store import HEADER_CHUNK, IN_LIST_MAX, SqlMailStore, header_end

SEEN, FLAGGED = "\\Seen", "\\Flagged"


PG_ADMIN_URL = os.environ.get("CADUCEE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLite (one node) and PostgreSQL (several nodes): the same statements on both."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.db'}"
        database.upgrade(url)
        yield url
        return
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"caducee_test_{secrets.token_hex(4)}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {type(exc).__name__}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    database.upgrade(url)
    yield url
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture
def store(engines: tuple[sa.Engine, Writer], tmp_path: Path) -> SqlMailStore:
    read, writer = engines
    directory = DirectoryStore(writer.engine)
    principal = directory.add_principal(PrincipalKind.PERSON, "810001234565", "Camille Martin")
    directory.add_mailbox("camille@caducee.test", MailboxType.PER, principal)
    return SqlMailStore(read, writer, BlobStore(tmp_path / "blobs", engine=read))


def _append(store: SqlMailStore, folder_id: int, raws: list[bytes], flags: list[tuple[str, ...]]) -> list[int]:
    async def main() -> list[int]:
        when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
        return [await store.append(folder_id, raw, f, when) for raw, f in zip(raws, flags, strict=True)]

    return asyncio.run(main())


def _inbox(store: SqlMailStore) -> int:
    info = store.get_folder(1, "INBOX")
    assert info is not None
    return info.id


def test_messages_by_uid_match_the_whole_listing(store: SqlMailStore) -> None:
    fid = _inbox(store)
    count = IN_LIST_MAX + 40  # both forms of the query: an IN list and one range of the index
    raws = [b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(count)]
    uids = _append(store, fid, raws, [(SEEN,) if i % 3 == 0 else () for i in range(count)])
    every = store.messages(fid)
    assert [m.uid for m in every] == uids
    by_uid = {m.uid: m for m in every}
    # dense sets are read as one range of the index, sparse ones as an IN list
    for wanted in ([uids[5]], uids[:IN_LIST_MAX], uids[3 : IN_LIST_MAX + 30 : 2], list(reversed(uids)),
                   uids[::3], uids[1::7], [uids[0], uids[-1], 999_999]):
        assert store.messages(fid, wanted) == [by_uid[u] for u in sorted(set(wanted)) if u in by_uid]
    assert store.messages(fid, []) == []
    assert store.messages(fid, [999_999]) == []
    assert every[0].flags == frozenset({SEEN}) and every[1].flags == frozenset()
    assert every[0].internaldate == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def test_flags_listing_and_counts(store: SqlMailStore) -> None:
    fid = _inbox(store)
    uids = _append(store, fid, [b"Subject: %d\r\n\r\nx\r\n" % i for i in range(6)],
                   [(SEEN,), (), (FLAGGED, SEEN), (), ("$Label1",), ()])
    listing = store.message_flags(fid)
    assert listing == [(m.uid, m.flags) for m in store.messages(fid)]
    assert store.message_flags(fid, after=uids[3]) == listing[4:]
    assert store.message_flags(fid, after=uids[-1]) == []
    assert store.message_count(fid) == 6
    assert store.message_count(fid, up_to=uids[2]) == 3
    asyncio.run(store.set_flags(fid, [uids[1]], ["\\Deleted"], "add"))
    asyncio.run(store.expunge(fid))
    assert store.message_count(fid, up_to=uids[2]) == 2
    assert [u for u, _ in store.message_flags(fid)] == [u for u in uids if u != uids[1]]


@pytest.mark.parametrize("raw", [
    b"Subject: crlf\r\n\r\nbody\r\n",
    b"Subject: lf\n\nbody\n",
    b"Subject: mixed\r\n\nbody\r\n",
    b"\r\nno header at all\r\n",
    b"\nno header, bare LF\n",
    b"Subject: no body\r\n",
    b"Subject: empty body\r\n\r\n",
    b"",
    b"Subject: x\r\n" + b"X-Long: " + b"a" * (HEADER_CHUNK - 20) + b"\r\n\r\nbody",  # CRLFCRLF across the chunk
    b"Subject: x\r\n" + b"X-Long: " + b"b" * (HEADER_CHUNK - 17) + b"\r\n\r\nbody",
    b"Subject: x\r\n" + b"X-Long: " + b"c" * (3 * HEADER_CHUNK) + b"\r\n\r\n" + b"d" * HEADER_CHUNK,
    b"Subject: header only, longer than a chunk " + b"e" * (2 * HEADER_CHUNK),
])
def test_read_header_is_the_prefix_split_message_gives(store: SqlMailStore, raw: bytes) -> None:
    in_file = store.blobs.put_durable(raw)
    store.blobs.path(in_file).rename(store.blobs.root / "moved")  # so that the row is read, not the file
    in_row = store.writer.run_sync(lambda conn: store.blobs.put_in(conn, raw))
    assert in_row == in_file
    assert store.read_header(in_row) == split_message(raw)[0]
    assert store.read_blob(in_row) == raw
    (store.blobs.root / "moved").rename(store.blobs.path(in_file))  # file and row: the file is read
    assert store.read_header(in_file) == split_message(raw)[0]
    assert store.read_blob(in_file) == raw


def test_read_small_reads_rows_together_and_leaves_files_out(store: SqlMailStore) -> None:
    rows = [b"Subject: %d\r\n\r\nsmall\r\n" % i for i in range(1200)]  # three queries of 500
    addresses = store.writer.run_sync(lambda conn: [store.blobs.put_in(conn, raw) for raw in rows])
    large = b"Subject: large\r\n\r\n" + b"x" * store.blobs.inline_max
    in_file = store.writer.run_sync(lambda conn: store.blobs.put_in(conn, large), before_commit=store.blobs.flush)
    got = store.read_small([*addresses, in_file, addresses[0]])
    assert got == dict(zip(addresses, rows, strict=True))
    assert store.read_small([]) == {}


def test_header_end_agrees_with_split_message_on_every_prefix() -> None:
    raw = b"A: 1\r\nB: 2\n\r\n\r\nC: body\r\n\r\n"
    for cut in range(len(raw) + 1):
        data = raw[:cut]
        end = header_end(data)
        if end is not None:
            assert data[:end] == split_message(raw)[0]  # found in a prefix: what the whole read gives


def test_blob_file_is_the_blob_store_path(store: SqlMailStore) -> None:
    blob = store.blobs.put_durable(b"Subject: x\r\n\r\ny\r\n")
    assert store._blob_file(blob) == str(store.blobs.path(blob))
    with pytest.raises(ValueError):
        store.read_header("../" + blob[3:])
