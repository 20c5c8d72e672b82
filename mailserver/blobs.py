"""Content-addressed message bodies: small ones in the database, the others on the filesystem.

A body of at most `inline_max` bytes (64 KiB by default, `[storage] inline_max`) is a row of
`inline_blobs`, written by `put_in` in the very transaction that commits the rows naming it: one log
write (SQLite's WAL, PostgreSQL's WAL) makes the body and its queue entry durable together, with no file
to create, fsync and rename per message. That is what lets one writer acknowledge hundreds of messages a
second on a disk where a new file's fsync costs milliseconds, and it keeps small bodies where every node
of a PostgreSQL deployment already reads. An inline row is written afresh (`ON CONFLICT DO UPDATE`) by
every message of the same bytes: the bytes hash to the name by construction, so a row damaged in place is
mended by the next copy instead of being taken for it.

A larger blob is written to a temporary file, fsynced, and renamed into its shard directory (256 shards,
created once). The rename becomes durable when the shard directory is fsynced: `flush()` does that once
for every blob written since the last flush, and the database writer calls it just before committing
the rows that point at them (group commit for the filesystem too: on ext4 one directory fsync commits
the journal for every rename before it). So once a row that names a blob is committed, the blob's bytes
and its name survive a crash (DESIGN.md §3). A blob is never modified; its name is the SHA-256 of its
bytes, so a message delivered to many mailboxes is stored once.

A write that fails (EIO, ENOSPC) leaves nothing behind: its temporary file is removed, and a shard
directory whose fsync failed stays due for the next flush. A blob whose bytes no longer match its name,
or that is missing, is `CorruptBlob` to `get_verified`; the queue sets such a file aside (`quarantine`).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from mailserver.db import defer_in
from mailserver.schema import inline_blobs

_HEX = frozenset("0123456789abcdef")

INLINE_MAX = 64 * 1024  # default `[storage] inline_max`: bodies up to this size are database rows
INLINE_LIMIT = 1024 * 1024  # the largest `inline_max` accepted (rows stay far below both databases' limits)

_SELECT_INLINE = sa.select(inline_blobs.c.data).where(inline_blobs.c.address == sa.bindparam("address"))
_SELECT_INLINE_MANY = sa.select(inline_blobs.c.address, inline_blobs.c.data).where(
    inline_blobs.c.address.in_(sa.bindparam("addresses", expanding=True)))
_DELETE_INLINE = sa.delete(inline_blobs).where(inline_blobs.c.address == sa.bindparam("address"))


def _upsert(dialect: str) -> Any:
    """INSERT … ON CONFLICT (address) DO UPDATE SET data = excluded.data, for `dialect`."""
    insert = postgresql.insert(inline_blobs) if dialect == "postgresql" else sqlite.insert(inline_blobs)
    return insert.on_conflict_do_update(index_elements=[inline_blobs.c.address],
                                        set_={"data": insert.excluded.data})


_UPSERTS = {name: _upsert(name) for name in ("sqlite", "postgresql")}


def _write_inline(conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
    """One statement for a writer batch's inline bodies; the same bytes twice in a batch are one row
    (PostgreSQL refuses to update a row twice in one statement)."""
    unique = list({row["address"]: row for row in rows}.values())
    conn.execute(_UPSERTS[conn.dialect.name], unique)


class BlobStore:
    def __init__(self, root: Path, *, engine: sa.Engine | None = None, inline_max: int = INLINE_MAX) -> None:
        """`engine` reads inline bodies; without one every body is a file (`put_in` writes files)."""
        self.root = root
        self.engine = engine
        self.inline_max = inline_max if engine is not None else 0
        self.tmp = root / "tmp"
        self._pending: set[Path] = set()
        self._lock = threading.Lock()
        self.flushes = 0
        created = False
        for directory in [self.tmp, *(root / f"{i:02x}" for i in range(256))]:
            if not directory.is_dir():
                directory.mkdir(parents=True, exist_ok=True)
                created = True
        if created:
            _fsync_dir(root)

    def path(self, address: str) -> Path:
        if len(address) != 64 or not _HEX.issuperset(address):
            raise ValueError("not a blob address")
        return self.root / address[:2] / address

    def put(self, data: bytes) -> str:
        """Write `data` and fsync it; returns its content address. Durable once `flush()` has run."""
        address = hashlib.sha256(data).hexdigest()
        final = self.path(address)
        if final.exists():
            # Written before, maybe by a batch whose flush failed or by a process that died before its
            # flush: its name is durable only once its shard is flushed again.
            with self._lock:
                self._pending.add(final.parent)
            return address
        tmp = self.tmp / f"{address}.{secrets.token_hex(8)}"
        try:
            _write_new(tmp, data)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a failed write leaves no partial file behind
            raise
        with self._lock:
            self._pending.add(final.parent)
        return address

    def put_in(self, conn: sa.Connection, data: bytes) -> str:
        """Store `data` as part of `conn`'s transaction; returns its content address. A small body is a
        row of that transaction (in a writer batch, one statement at the end with every other job's);
        a larger one is a file (`put`), durable once `flush()` has run: the caller names it as the
        batch's `before_commit`."""
        if len(data) > self.inline_max:
            return self.put(data)
        address = hashlib.sha256(data).hexdigest()
        row = {"address": address, "data": data}
        if not defer_in(conn, "inline_blobs", _write_inline, row):
            _write_inline(conn, [row])
        return address

    def put_durable(self, data: bytes) -> str:
        """`put` then `flush`: for callers outside a database transaction."""
        address = self.put(data)
        self.flush()
        return address

    def flush(self) -> None:
        """Make every rename since the last flush durable (fsync of the shard directories touched)."""
        with self._lock:
            pending, self._pending = self._pending, set()
        done: set[Path] = set()
        try:
            for directory in sorted(pending):
                _fsync_dir(directory)
                done.add(directory)
        except BaseException:
            # The batch that called us rolls back, but a blob of the next batch may share these shards:
            # they stay due, or its row could commit before its name is durable.
            with self._lock:
                self._pending |= pending - done
            raise
        if pending:
            self.flushes += 1

    def get(self, address: str) -> bytes:
        """The bytes of `address` (its file, else its row); FileNotFoundError if it has neither."""
        try:
            return self.path(address).read_bytes()
        except FileNotFoundError:
            data = self.get_inline(address)
            if data is None:
                raise
            return data

    def get_inline(self, address: str) -> bytes | None:
        """The row of `address`, None if it has none (or there is no inline tier)."""
        if self.engine is None:
            return None
        with self.engine.connect() as conn:
            data = conn.execute(_SELECT_INLINE, {"address": address}).scalar()
        return bytes(data) if data is not None else None  # PostgreSQL gives a memoryview

    def get_inline_many(self, addresses: Iterable[str]) -> dict[str, bytes]:
        """Address → bytes of those of `addresses` that are rows (one query per 500): what a FETCH of many
        messages reads instead of one query each. Files are left out, for `get`."""
        wanted = sorted(set(addresses))
        if self.engine is None or not wanted:
            return {}
        out: dict[str, bytes] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(wanted), 500):
                rows = conn.execute(_SELECT_INLINE_MANY, {"addresses": wanted[start:start + 500]})
                out.update((address, bytes(data)) for address, data in rows)
        return out

    def get_verified(self, address: str) -> bytes:
        """The bytes of `address`, checked against it: `CorruptBlob` if missing or altered."""
        try:
            data = self.get(address)
        except FileNotFoundError:
            raise CorruptBlob(address, "missing") from None
        if hashlib.sha256(data).hexdigest() != address:
            raise CorruptBlob(address, "digest_mismatch")
        return data

    def get_verified_many(self, addresses: Iterable[str]) -> dict[str, bytes | CorruptBlob]:
        """`get_verified` of each of `addresses`, the rows read together (one query, not one each):
        address → bytes, or the `CorruptBlob` it raised."""
        wanted = set(addresses)
        rows = self.get_inline_many(wanted)
        out: dict[str, bytes | CorruptBlob] = {}
        for address in wanted:
            data = rows.get(address)
            if data is not None and hashlib.sha256(data).hexdigest() == address:
                out[address] = data
                continue
            try:  # a file, or a row that does not match (the file, if any, is read first)
                out[address] = self.get_verified(address)
            except CorruptBlob as exc:
                out[address] = exc
        return out

    def quarantine(self, address: str) -> Path | None:
        """Set a corrupt blob aside in `quarantine/` (kept for inspection, never served again).

        A file is moved there; an inline row is copied there, and `discard_corrupt_in` removes it in the
        transaction that quarantines its entry. After this a new message with the same bytes is written
        afresh instead of matching the corrupt copy by name. Returns where it went, None if there was
        nothing to set aside."""
        source = self.path(address)
        target = self.root / "quarantine" / f"{address}.{secrets.token_hex(4)}"
        target.parent.mkdir(exist_ok=True)
        try:
            os.replace(source, target)
        except FileNotFoundError:
            data = self.get_inline(address)
            if data is None:
                return None
            _write_new(target, data)
            _fsync_dir(target.parent)
            return target
        _fsync_dir(target.parent)
        _fsync_dir(source.parent)
        return target

    @staticmethod
    def discard_corrupt_in(conn: sa.Connection, address: str) -> bool:
        """Delete the inline row of `address` if its bytes no longer hash to it (a row mended by a new
        copy since, see the module's docstring, stays). True if a row was deleted."""
        data = conn.execute(_SELECT_INLINE, {"address": address}).scalar()
        if data is None or hashlib.sha256(data).hexdigest() == address:
            return False
        conn.execute(_DELETE_INLINE, {"address": address})
        return True


class CorruptBlob(Exception):
    """A blob that is missing or whose bytes do not hash to its name. Carries no content."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"blob {address[:12]}… {reason}")
        self.address = address
        self.reason = reason


def _write_new(path: Path, data: bytes) -> None:
    """Create `path` with `data`, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
