"""Content-addressed message bodies on the filesystem.

A blob is written to a temporary file, fsynced, and renamed into its shard directory (256 shards,
created once). The rename becomes durable when the shard directory is fsynced: `flush()` does that once
for every blob written since the last flush, and the database writer calls it just before committing
the rows that point at them (group commit for the filesystem too: on ext4 one directory fsync commits
the journal for every rename before it). So once a row that names a blob is committed, the blob's bytes
and its name survive a crash (DESIGN.md §3). A blob is never modified; its name is the SHA-256 of its
bytes, so a message delivered to many mailboxes is stored once.
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
            return address
        tmp = self.tmp / f"{address}.{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
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
        for directory in sorted(pending):
            _fsync_dir(directory)
        if pending:
            self.flushes += 1

    def get(self, address: str) -> bytes:
        return self.path(address).read_bytes()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
