"""Content-addressed message bodies on the filesystem.

A blob is written to a temporary file, fsynced, renamed into place and its directory fsynced, so that
once `put` returns the bytes survive a crash (DESIGN.md §3). A blob is never modified; its name is the
SHA-256 of its bytes, so the same message delivered to many mailboxes is stored once.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, address: str) -> Path:
        if len(address) != 64 or not all(c in "0123456789abcdef" for c in address):
            raise ValueError("not a blob address")
        return self.root / address[:2] / address[2:4] / address

    def put(self, data: bytes) -> str:
        """Store `data` durably; returns its content address."""
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
        self._ensure_dir(final.parent)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return address

    def get(self, address: str) -> bytes:
        return self.path(address).read_bytes()

    def _ensure_dir(self, directory: Path) -> None:
        if directory.is_dir():
            return
        parent = directory.parent
        if not parent.is_dir():
            parent.mkdir(parents=True, exist_ok=True)
            _fsync_dir(parent.parent)
        directory.mkdir(exist_ok=True)
        _fsync_dir(parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
