"""The blob store: files under failing writes, small bodies as database rows, and corrupt blobs of
both kinds (the fault tests drive the same on the real server: tests/faults)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from caducee import database
from mailserver.blobs import BlobStore, CorruptBlob
from mailserver.db import Writer, make_engine
from mailserver.schema import inline_blobs


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


# -- small bodies as database rows ---------------------------------------------------------------------


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[tuple[sa.Engine, Writer]]:
    url = f"sqlite:///{tmp_path / 'caducee.db'}"
    database.upgrade(url)
    read, writer = make_engine(url), Writer(make_engine(url, writer=True))
    yield read, writer
    writer.stop()
    writer.engine.dispose()
    read.dispose()


def _rows(engine: sa.Engine) -> dict[str, bytes]:
    with engine.connect() as conn:
        return {a: bytes(d) for a, d in conn.execute(sa.select(inline_blobs.c.address, inline_blobs.c.data))}


def test_a_small_body_is_a_row_of_the_transaction_a_large_one_a_file(
        tmp_path: Path, engines: tuple[sa.Engine, Writer]) -> None:
    read, writer = engines
    blobs = BlobStore(tmp_path / "blobs", engine=read, inline_max=1000)
    small, large = b"s" * 1000, b"L" * 1001
    a_small, a_large = writer.run_sync(lambda conn: (blobs.put_in(conn, small), blobs.put_in(conn, large)),
                                       before_commit=blobs.flush)
    assert (a_small, a_large) == (hashlib.sha256(small).hexdigest(), hashlib.sha256(large).hexdigest())
    assert _rows(read) == {a_small: small}
    assert not blobs.path(a_small).exists() and blobs.path(a_large).read_bytes() == large
    assert blobs.get(a_small) == blobs.get_verified(a_small) == small
    assert blobs.get(a_large) == large
    with pytest.raises(FileNotFoundError):
        blobs.get("0" * 64)


def test_a_rolled_back_transaction_leaves_no_row(tmp_path: Path, engines: tuple[sa.Engine, Writer]) -> None:
    read, writer = engines
    blobs = BlobStore(tmp_path / "blobs", engine=read)

    def job(conn: sa.Connection) -> None:
        blobs.put_in(conn, b"refused message")
        raise RuntimeError("the batch fails after the body")

    with pytest.raises(RuntimeError):
        writer.run_sync(job)
    assert _rows(read) == {}
    with pytest.raises(CorruptBlob) as missing:
        blobs.get_verified(hashlib.sha256(b"refused message").hexdigest())
    assert missing.value.reason == "missing"


def test_the_same_bytes_twice_in_a_batch_are_one_row_and_mend_a_damaged_one(
        tmp_path: Path, engines: tuple[sa.Engine, Writer]) -> None:
    read, writer = engines
    blobs = BlobStore(tmp_path / "blobs", engine=read)

    async def batch() -> list[str]:
        return list(await asyncio.gather(*(writer.run(lambda conn: blobs.put_in(conn, b"same report"))
                                           for _ in range(20))))

    addresses = asyncio.run(batch())
    assert len(set(addresses)) == 1 and writer.batches < 20  # jobs shared batches
    address = addresses[0]
    assert _rows(read) == {address: b"same report"}
    writer.run_sync(lambda conn: conn.execute(sa.update(inline_blobs).values(data=b"same rep0rt")))
    with pytest.raises(CorruptBlob) as altered:
        blobs.get_verified(address)
    assert altered.value.reason == "digest_mismatch"
    writer.run_sync(lambda conn: blobs.put_in(conn, b"same report"))  # a new copy of the same bytes
    assert blobs.get_verified(address) == b"same report"


def test_a_corrupt_row_is_copied_aside_and_discarded_a_mended_one_kept(
        tmp_path: Path, engines: tuple[sa.Engine, Writer]) -> None:
    read, writer = engines
    blobs = BlobStore(tmp_path / "blobs", engine=read)
    address = writer.run_sync(lambda conn: blobs.put_in(conn, b"message"))
    writer.run_sync(lambda conn: conn.execute(sa.update(inline_blobs).values(data=b"garbled")))
    moved = blobs.quarantine(address)
    assert moved is not None and moved.parent == tmp_path / "blobs" / "quarantine"
    assert moved.read_bytes() == b"garbled"
    assert writer.run_sync(lambda conn: blobs.discard_corrupt_in(conn, address)) is True
    assert _rows(read) == {}
    assert blobs.quarantine(address) is None  # nothing left to set aside
    writer.run_sync(lambda conn: blobs.put_in(conn, b"message"))
    assert writer.run_sync(lambda conn: blobs.discard_corrupt_in(conn, address)) is False  # whole: kept
    assert blobs.get_verified(address) == b"message"


def test_without_an_engine_or_with_inline_max_0_every_body_is_a_file(
        tmp_path: Path, engines: tuple[sa.Engine, Writer]) -> None:
    read, writer = engines
    for blobs in (BlobStore(tmp_path / "a"), BlobStore(tmp_path / "b", engine=read, inline_max=0)):
        address = writer.run_sync(lambda conn, b=blobs: b.put_in(conn, b"tiny"), before_commit=blobs.flush)
        assert blobs.path(address).read_bytes() == b"tiny"
    assert _rows(read) == {}


def test_get_verified_many_reads_rows_together_and_checks_each(
        tmp_path: Path, engines: tuple[sa.Engine, Writer]) -> None:
    read, writer = engines
    blobs = BlobStore(tmp_path / "blobs", engine=read, inline_max=100)
    good, bad, gone = (writer.run_sync(lambda conn, d=d: blobs.put_in(conn, d)) for d in (b"good", b"bad", b"gone"))
    large = blobs.put_durable(b"L" * 101)
    writer.run_sync(lambda conn: conn.execute(sa.update(inline_blobs).where(inline_blobs.c.address == bad)
                                              .values(data=b"b4d")))
    writer.run_sync(lambda conn: conn.execute(sa.delete(inline_blobs).where(inline_blobs.c.address == gone)))
    got = blobs.get_verified_many([good, bad, gone, large, good])
    assert got[good] == b"good" and got[large] == b"L" * 101
    assert isinstance(got[bad], CorruptBlob) and got[bad].reason == "digest_mismatch"
    assert isinstance(got[gone], CorruptBlob) and got[gone].reason == "missing"
    assert len(got) == 4
