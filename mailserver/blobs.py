"""Content-addressed message bodies on the filesystem.

A blob is written to a temporary file, fsynced, and renamed into its shard directory (256 shards,
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
from pathlib import Path

_HEX = frozenset("0123456789abcdef")


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
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
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a failed write leaves no partial file behind
            raise
        with self._lock:
            self._pending.add(final.parent)
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
        return self.path(address).read_bytes()

    def get_verified(self, address: str) -> bytes:
        """The bytes of `address`, checked against it: `CorruptBlob` if missing or altered."""
        try:
            data = self.path(address).read_bytes()
        except FileNotFoundError:
            raise CorruptBlob(address, "missing") from None
        if hashlib.sha256(data).hexdigest() != address:
            raise CorruptBlob(address, "digest_mismatch")
        return data

    def quarantine(self, address: str) -> Path | None:
        """Move a corrupt blob aside to `quarantine/` (kept for inspection, never served again).

        After this a new message with the same bytes is written afresh instead of matching the corrupt
        file by name. Returns where it went, None if there was no file."""
        source = self.path(address)
        target = self.root / "quarantine" / f"{address}.{secrets.token_hex(4)}"
        target.parent.mkdir(exist_ok=True)
        try:
            os.replace(source, target)
        except FileNotFoundError:
            return None
        _fsync_dir(target.parent)
        _fsync_dir(source.parent)
        return target


class CorruptBlob(Exception):
    """A blob that is missing or whose bytes do not hash to its name. Carries no content."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"blob {address[:12]}… {reason}")
        self.address = address
        self.reason = reason


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
