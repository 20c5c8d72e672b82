"""The blob store under failing writes, and corrupt blobs (the fault tests drive the same on the real
server: tests/faults)."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from mailserver.blobs import BlobStore, CorruptBlob


def _eio(*_args: object) -> None:
    raise OSError(errno.EIO, "Input/output error")


def test_a_failed_write_leaves_no_file_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blobs = BlobStore(tmp_path)
    monkeypatch.setattr(os, "fsync", _eio)
    with pytest.raises(OSError):
        blobs.put(b"never durable")
    address = hashlib.sha256(b"never durable").hexdigest()
    assert not blobs.path(address).exists()
    assert list(blobs.tmp.iterdir()) == []


def test_a_failed_flush_keeps_its_directories_due(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blobs = BlobStore(tmp_path)
    address = blobs.put(b"message")
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", _eio)
    with pytest.raises(OSError):
        blobs.flush()

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    blobs.flush()  # the next batch's flush still makes the rename durable
    assert str(blobs.path(address).parent) in synced


def test_a_blob_written_before_is_flushed_again(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    address = blobs.put_durable(b"same bytes")
    flushes = blobs.flushes
    assert blobs.put(b"same bytes") == address
    blobs.flush()  # its name may not be durable yet (an earlier flush failed, the process died)
    assert blobs.flushes == flushes + 1


def test_get_verified_refuses_missing_and_altered_blobs(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    good, bad = blobs.put_durable(b"whole message"), blobs.put_durable(b"another message")
    assert blobs.get_verified(good) == b"whole message"
    blobs.path(bad).write_bytes(b"another mess")
    with pytest.raises(CorruptBlob) as altered:
        blobs.get_verified(bad)
    assert altered.value.reason == "digest_mismatch" and "mess" not in str(altered.value)
    blobs.path(good).unlink()
    with pytest.raises(CorruptBlob) as missing:
        blobs.get_verified(good)
    assert missing.value.reason == "missing"


def test_quarantine_moves_the_file_aside(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    address = blobs.put_durable(b"message")
    blobs.path(address).write_bytes(b"garbled")
    moved = blobs.quarantine(address)
    assert moved is not None and moved.parent == tmp_path / "quarantine" and moved.read_bytes() == b"garbled"
    assert not blobs.path(address).exists()
    assert blobs.quarantine(address) is None  # idempotent
    assert blobs.put_durable(b"message") == address  # the same bytes are written afresh
    assert blobs.get_verified(address) == b"message"
