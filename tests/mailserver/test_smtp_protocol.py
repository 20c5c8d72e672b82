"""Replies to storage errors: a full disk or database is `452 4.3.1`, any other error `451 4.3.0`; neither
carries the exception's text."""

from __future__ import annotations

import errno
import logging
import sqlite3

import pytest
import sqlalchemy as sa

from mailserver.smtp_protocol import is_storage_full, opaque_exception_reply

log = logging.getLogger("test")


def _sqlite_full() -> sa.exc.OperationalError:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (x BLOB)")
    db.execute("PRAGMA max_page_count = 2")
    try:
        db.execute("INSERT INTO t VALUES (zeroblob(100000))")
    except sqlite3.OperationalError as exc:
        assert exc.sqlite_errorcode == 13  # SQLITE_FULL
        return sa.exc.OperationalError("INSERT", {}, exc)
    finally:
        db.close()
    raise AssertionError("SQLite did not report a full database")


@pytest.mark.parametrize("error, reply", [
    (OSError(errno.ENOSPC, "No space left on device /var/caducee"), "452 4.3.1"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "452 4.3.1"),
    (_sqlite_full(), "452 4.3.1"),
    (OSError(errno.EIO, "Input/output error /var/caducee"), "451 4.3.0"),
    (RuntimeError("patient Dupont"), "451 4.3.0"),
])
def test_storage_errors_are_temporary_with_the_right_code(error: BaseException, reply: str) -> None:
    text = opaque_exception_reply(error, log)
    assert text.startswith(reply + " ")
    assert not any(leak in text for leak in ("caducee", "Dupont", "No space", "quota", "Input/output", "INSERT"))


def test_a_full_disk_is_found_behind_the_exception_that_wraps_it() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("enqueue failed") from inner
    except RuntimeError as outer:
        assert is_storage_full(outer)
    assert not is_storage_full(ValueError("x"))


def test_a_failed_starttls_handshake_is_not_logged_as_an_internal_error(caplog: pytest.LogCaptureFixture) -> None:
    from aiosmtpd.smtp import TLSSetupException

    try:
        try:
            raise ConnectionResetError("peer gone")
        except ConnectionResetError as inner:
            raise TLSSetupException() from inner
    except TLSSetupException as error:
        with caplog.at_level(logging.INFO, logger="test"):
            opaque_exception_reply(error, log)
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "event=tls_handshake_failed error=ConnectionResetError" in caplog.text
    assert "peer gone" not in caplog.text
