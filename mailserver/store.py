"""The mailbox store on SQL: folders and message entries pointing at immutable blobs.

Implements `mailserver.store_api.MailStore` for the IMAP server, and `deliver_in` for the delivery
worker. UIDs are allocated from `folders.uidnext` inside the writing transaction (RFC 3501 §2.3.1.1:
strictly ascending, never reused while UIDVALIDITY holds).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import os
import re
import time
from collections import defaultdict
from typing import Callable, Iterable, Sequence

import sqlalchemy as sa

from mailserver.blobs import BlobStore
from mailserver.db import Writer
from mailserver.policy import header_message_id
from mailserver.schema import folders, messages
from mailserver.store_api import FlagMode, FolderInfo, StoredMessage

log = logging.getLogger(__name__)

INBOX = "INBOX"
SEEN = "\\Seen"
DELETED = "\\Deleted"


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _flags_text(flags: Iterable[str]) -> str:
    return " ".join(sorted(set(flags)))


@functools.lru_cache(maxsize=4096)
def _flags_set(text: str) -> frozenset[str]:
    # Folders share a few distinct flag texts: one frozenset each, not one per row read.
    return frozenset(text.split()) if text else frozenset()


def _canonical_name(name: str) -> str:
    return INBOX if name.upper() == INBOX else name


# Constant statements of the delivery path (built once: constructing one costs more than running it).
_FOLDER_ID = sa.select(folders.c.id).where(folders.c.mailbox_id == sa.bindparam("b_mailbox"),
                                           folders.c.name == sa.bindparam("b_name"))
_NEXT_UID = (sa.update(folders).where(folders.c.id == sa.bindparam("b_folder"))
             .values(uidnext=folders.c.uidnext + sa.bindparam("b_count")).returning(folders.c.uidnext))


def folder_id_in(conn: sa.Connection, mailbox_id: int, name: str, *, create: bool = True) -> int | None:
    """The id of a folder, created on demand (INBOX always exists for a delivered message).

    Creation is race-free across nodes: INSERT … ON CONFLICT DO NOTHING, then read back.
    """
    name = _canonical_name(name)
    params = {"b_mailbox": mailbox_id, "b_name": name}
    fid = conn.execute(_FOLDER_ID, params).scalar()
    if fid is None and create:
        insert = _dialect_insert(conn)(folders).values(
            mailbox_id=mailbox_id, name=name, uidvalidity=_new_uidvalidity(), uidnext=1)
        conn.execute(insert.on_conflict_do_nothing(index_elements=["mailbox_id", "name"]))
        fid = conn.execute(_FOLDER_ID, params).scalar()
    return fid


def _dialect_insert(conn: sa.Connection):  # type: ignore[no-untyped-def]
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def _new_uidvalidity() -> int:
    return int(time.time()) & 0x7FFFFFFF


IN_LIST_MAX = 256  # a sparse set of at most this many UIDs is an IN list; others, one range of the index
HEADER_CHUNK = 8192  # first read of a blob when only its header is wanted
_BLANK_LINE_RE = re.compile(rb"\n(\r?\n)")
_BLOB_ADDRESS_RE = re.compile(r"[0-9a-f]{64}")  # as BlobStore.path checks it: no path outside the store


def header_end(data: bytes) -> int | None:
    """Length of the header block at the start of `data`, its empty line included; None when `data`
    holds no empty line (yet). The same split as mailserver.imap_server.split_message (RFC 5322 §2.1;
    a bare LF ends a line too), so that BODY[HEADER] read alone is the prefix a whole read would give."""
    if data.startswith(b"\r\n"):
        return 2
    if data.startswith(b"\n"):
        return 1
    m = _BLANK_LINE_RE.search(data)
    return m.end() if m is not None else None


# The reads of the IMAP server, built once: per command only the parameters change (a UID FETCH of one
# message costs one indexed lookup and no statement construction).
_MESSAGE_COLUMNS = (messages.c.uid, messages.c.size, messages.c.internaldate, messages.c.flags, messages.c.blob)
_IN_FOLDER = messages.c.folder_id == sa.bindparam("folder_id")
_MESSAGES = sa.select(*_MESSAGE_COLUMNS).where(_IN_FOLDER).order_by(messages.c.uid)
_MESSAGES_IN = _MESSAGES.where(messages.c.uid.in_(sa.bindparam("uids", expanding=True)))
_MESSAGES_BETWEEN = _MESSAGES.where(messages.c.uid.between(sa.bindparam("low"), sa.bindparam("high")))
_FLAGS_AFTER = (sa.select(messages.c.uid, messages.c.flags)
                .where(_IN_FOLDER, messages.c.uid > sa.bindparam("after")).order_by(messages.c.uid))
_COUNT = sa.select(sa.func.count()).select_from(messages).where(_IN_FOLDER)
_COUNT_UP_TO = _COUNT.where(messages.c.uid <= sa.bindparam("up_to"))

INSERT_MESSAGE = sa.insert(messages)  # constant: compiled once, executed with many rows


def next_uid(conn: sa.Connection, folder_id: int, count: int = 1) -> int:
    """Allocate `count` consecutive UIDs in a folder; returns the first."""
    first = conn.execute(_NEXT_UID, {"b_folder": folder_id, "b_count": count}).scalar_one()
    return int(first) - count


def deliver_in(
    conn: sa.Connection,
    mailbox_id: int,
    blob: str,
    size: int,
    *,
    header_message_id: str | None,
    queue_recipient_id: int | None,
    internaldate: dt.datetime | None = None,
) -> tuple[int, int]:
    """Place a message in a mailbox's INBOX inside the caller's transaction; returns (folder id, uid)."""
    fid = folder_id_in(conn, mailbox_id, INBOX)
    assert fid is not None
    uid = next_uid(conn, fid)
    conn.execute(INSERT_MESSAGE, dict(
        folder_id=fid, uid=uid, blob=blob, size=size, internaldate=internaldate or dt.datetime.now(dt.timezone.utc),
        flags="", header_message_id=header_message_id, queue_recipient_id=queue_recipient_id))
    return fid, uid


class SqlMailStore:
    """`MailStore` on the shared database. Reads use `engine`; writes go through the `Writer`."""

    def __init__(self, engine: sa.Engine, writer: Writer, blobs: BlobStore) -> None:
        self.engine = engine
        self.writer = writer
        self.blobs = blobs
        self._blob_root = os.fspath(blobs.root)
        self._listeners: dict[int, set[Callable[[int], None]]] = defaultdict(set)
        # Called with (folder id, UIDs) of messages that have just become \Seen (read receipts).
        self.on_seen: Callable[[int, list[int]], None] | None = None

    # -- reads --
    def _folder_infos(self, where: sa.ColumnElement[bool]) -> list[FolderInfo]:
        seen_like = messages.c.flags.like(f"%{SEEN}%")
        counts = (
            sa.select(
                messages.c.folder_id,
                sa.func.count().label("exists"),
                sa.func.sum(sa.case((seen_like, 0), else_=1)).label("unseen"),
            )
            # Only the folders asked for are counted, not every message of every mailbox.
            .where(messages.c.folder_id.in_(sa.select(folders.c.id).where(where)))
            .group_by(messages.c.folder_id)
            .subquery()
        )
        query = (
            sa.select(folders, counts.c.exists, counts.c.unseen)
            .outerjoin(counts, counts.c.folder_id == folders.c.id)
            .where(where)
            .order_by(folders.c.name)
        )
        with self.engine.connect() as conn:
            return [
                FolderInfo(r.id, r.mailbox_id, r.name, int(r.uidvalidity), int(r.uidnext),
                           int(r.exists or 0), int(r.unseen or 0))
                for r in conn.execute(query)
            ]

    def list_folders(self, mailbox_id: int) -> list[FolderInfo]:
        infos = self._folder_infos(folders.c.mailbox_id == mailbox_id)
        if not any(f.name == INBOX for f in infos):
            self.writer.run_sync(lambda conn: folder_id_in(conn, mailbox_id, INBOX))
            infos = self._folder_infos(folders.c.mailbox_id == mailbox_id)
        return infos

    def get_folder(self, mailbox_id: int, name: str) -> FolderInfo | None:
        name = _canonical_name(name)
        found = self._folder_infos(sa.and_(folders.c.mailbox_id == mailbox_id, folders.c.name == name))
        if not found and name == INBOX:
            self.writer.run_sync(lambda conn: folder_id_in(conn, mailbox_id, INBOX))
            found = self._folder_infos(sa.and_(folders.c.mailbox_id == mailbox_id, folders.c.name == name))
        return found[0] if found else None

    def messages(self, folder_id: int, uids: Sequence[int] | None = None) -> list[StoredMessage]:
        params: dict[str, object] = {"folder_id": folder_id}
        keep: set[int] | None = None
        if uids is None:
            query = _MESSAGES
        else:
            wanted = sorted(set(uids))
            if not wanted:
                return []
            if len(wanted) <= IN_LIST_MAX and wanted[-1] - wanted[0] >= 2 * len(wanted):
                query, params["uids"] = _MESSAGES_IN, wanted
            else:  # dense or many: one range scan of the (folder_id, uid) index, then a filter
                query, params["low"], params["high"] = _MESSAGES_BETWEEN, wanted[0], wanted[-1]
                keep = set(wanted) if wanted[-1] - wanted[0] + 1 != len(wanted) else None
        with self.engine.connect() as conn:
            rows = conn.execute(query, params).all()
        return [
            StoredMessage(int(uid), size, _utc(internaldate), _flags_set(flags), blob)
            for uid, size, internaldate, flags, blob in rows
            if keep is None or uid in keep
        ]

    def message_flags(self, folder_id: int, after: int = 0) -> list[tuple[int, frozenset[str]]]:
        with self.engine.connect() as conn:
            rows = conn.execute(_FLAGS_AFTER, {"folder_id": folder_id, "after": after}).all()
        return [(int(uid), _flags_set(flags)) for uid, flags in rows]

    def message_count(self, folder_id: int, up_to: int | None = None) -> int:
        with self.engine.connect() as conn:
            if up_to is None:
                return int(conn.execute(_COUNT, {"folder_id": folder_id}).scalar_one())
            return int(conn.execute(_COUNT_UP_TO, {"folder_id": folder_id, "up_to": up_to}).scalar_one())

    def read_blob(self, blob: str) -> bytes:
        return self.blobs.get(blob)

    def read_small(self, blobs: Sequence[str]) -> dict[str, bytes]:
        return self.blobs.get_inline_many(blobs)

    def read_header(self, blob: str) -> bytes:
        """Only the header block: read in chunks until the empty line, not the whole message.

        Plain os.open/os.read on a checked address: a header listing reads thousands of small files, and
        pathlib plus a buffered file object cost more than the reads themselves. A body with no file is
        a database row (blobs.py), read whole: it is small."""
        try:
            fd = os.open(self._blob_file(blob), os.O_RDONLY)  # not inherited (PEP 446)
        except FileNotFoundError:
            data = self.blobs.get_inline(blob)
            if data is None:
                raise
            end = header_end(data)
            return data if end is None else data[:end]
        try:
            data = os.read(fd, HEADER_CHUNK)
            while True:
                end = header_end(data)
                if end is not None:
                    return data[:end]
                more = os.read(fd, max(HEADER_CHUNK, len(data)))
                if not more:
                    return data
                data += more
        finally:
            os.close(fd)

    def _blob_file(self, blob: str) -> str:
        """`BlobStore.path` as a string, without pathlib (checked by a test against it)."""
        if _BLOB_ADDRESS_RE.fullmatch(blob) is None:
            raise ValueError("not a blob address")
        return f"{self._blob_root}/{blob[:2]}/{blob}"

    # -- writes --
    async def create_folder(self, mailbox_id: int, name: str) -> FolderInfo:
        name = _canonical_name(name)

        def job(conn: sa.Connection) -> None:
            exists = conn.execute(
                sa.select(folders.c.id).where(folders.c.mailbox_id == mailbox_id, folders.c.name == name)
            ).scalar()
            if exists is not None:
                raise ValueError("folder exists")
            folder_id_in(conn, mailbox_id, name)

        await self.writer.run(job)
        info = self.get_folder(mailbox_id, name)
        assert info is not None
        return info

    async def delete_folder(self, folder_id: int) -> None:
        def job(conn: sa.Connection) -> None:
            conn.execute(sa.delete(messages).where(messages.c.folder_id == folder_id))
            conn.execute(sa.delete(folders).where(folders.c.id == folder_id))

        await self.writer.run(job)

    async def rename_folder(self, folder_id: int, new_name: str) -> None:
        await self.writer.run(
            lambda conn: conn.execute(
                sa.update(folders).where(folders.c.id == folder_id).values(name=_canonical_name(new_name))
            )
        )

    async def append(self, folder_id: int, raw: bytes, flags: Iterable[str],
                     internaldate: dt.datetime | None) -> int:
        # A body small enough for the database is a row of the job's transaction; a file is written by
        # a thread first, not to hold up the writer's batch.
        written = await asyncio.to_thread(self.blobs.put, raw) if len(raw) > self.blobs.inline_max else None
        flag_text = _flags_text(flags)
        header_id = header_message_id(raw)

        def job(conn: sa.Connection) -> int:
            blob = written or self.blobs.put_in(conn, raw)
            uid = next_uid(conn, folder_id)
            conn.execute(
                sa.insert(messages).values(
                    folder_id=folder_id, uid=uid, blob=blob, size=len(raw),
                    internaldate=internaldate or dt.datetime.now(dt.timezone.utc),
                    flags=flag_text, header_message_id=header_id,
                )
            )
            return uid

        uid = await self.writer.run(job, before_commit=self.blobs.flush)
        self.notify(folder_id)
        return uid

    async def set_flags(self, folder_id: int, uids: Iterable[int], flags: Iterable[str],
                        mode: FlagMode) -> dict[int, frozenset[str]]:
        wanted = frozenset(flags)
        uid_list = sorted(set(uids))

        newly_seen: list[int] = []

        def job(conn: sa.Connection) -> dict[int, frozenset[str]]:
            out: dict[int, frozenset[str]] = {}
            newly_seen.clear()
            rows = conn.execute(
                sa.select(messages.c.id, messages.c.uid, messages.c.flags).where(
                    messages.c.folder_id == folder_id, messages.c.uid.in_(uid_list)
                )
            ).all()
            for row in rows:
                current = _flags_set(row.flags)
                new = wanted if mode == "set" else (current | wanted if mode == "add" else current - wanted)
                if new != current:
                    conn.execute(sa.update(messages).where(messages.c.id == row.id).values(flags=_flags_text(new)))
                    if SEEN in new and SEEN not in current:
                        newly_seen.append(int(row.uid))
                out[int(row.uid)] = frozenset(new)
            return out

        result = await self.writer.run(job)
        if newly_seen and self.on_seen is not None:
            self.on_seen(folder_id, sorted(newly_seen))
        return result

    async def expunge(self, folder_id: int, uids: Iterable[int] | None = None) -> list[int]:
        only = None if uids is None else sorted(set(uids))

        def job(conn: sa.Connection) -> list[int]:
            cond = sa.and_(messages.c.folder_id == folder_id, messages.c.flags.like(f"%{DELETED}%"))
            if only is not None:
                cond = sa.and_(cond, messages.c.uid.in_(only))
            rows = conn.execute(sa.select(messages.c.id, messages.c.uid, messages.c.flags).where(cond)).all()
            gone = [r for r in rows if DELETED in _flags_set(r.flags)]
            if gone:
                conn.execute(sa.delete(messages).where(messages.c.id.in_([r.id for r in gone])))
            return sorted(int(r.uid) for r in gone)

        return await self.writer.run(job)

    async def _copy(self, folder_id: int, uids: Iterable[int], dest_folder_id: int, *, move: bool) -> list[tuple[int, int]]:
        uid_list = sorted(set(uids))

        def job(conn: sa.Connection) -> list[tuple[int, int]]:
            rows = conn.execute(
                sa.select(messages).where(messages.c.folder_id == folder_id, messages.c.uid.in_(uid_list))
                .order_by(messages.c.uid)
            ).all()
            if not rows:
                return []
            first = next_uid(conn, dest_folder_id, len(rows))
            pairs = []
            for offset, row in enumerate(rows):
                new_uid = first + offset
                conn.execute(
                    sa.insert(messages).values(
                        folder_id=dest_folder_id, uid=new_uid, blob=row.blob, size=row.size,
                        internaldate=row.internaldate, flags=row.flags, header_message_id=row.header_message_id,
                    )
                )
                pairs.append((int(row.uid), new_uid))
            if move:
                conn.execute(sa.delete(messages).where(messages.c.id.in_([r.id for r in rows])))
            return pairs

        pairs = await self.writer.run(job)
        if pairs:
            self.notify(dest_folder_id)
        return pairs

    async def copy(self, folder_id: int, uids: Iterable[int], dest_folder_id: int) -> list[tuple[int, int]]:
        return await self._copy(folder_id, uids, dest_folder_id, move=False)

    async def move(self, folder_id: int, uids: Iterable[int], dest_folder_id: int) -> list[tuple[int, int]]:
        return await self._copy(folder_id, uids, dest_folder_id, move=True)

    # -- notifications --
    def add_listener(self, folder_id: int, listener: Callable[[int], None]) -> None:
        self._listeners[folder_id].add(listener)

    def remove_listener(self, folder_id: int, listener: Callable[[int], None]) -> None:
        self._listeners.get(folder_id, set()).discard(listener)

    def notify(self, folder_id: int) -> None:
        """Tell this process's IDLE sessions that `folder_id` has new messages."""
        for listener in list(self._listeners.get(folder_id, ())):
            try:
                listener(folder_id)
            except Exception:  # noqa: BLE001 - one broken session must not stop delivery
                log.exception("event=listener_failed folder=%s", folder_id)
