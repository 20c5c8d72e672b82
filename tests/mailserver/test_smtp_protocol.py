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


def _full_tables(session: object, handler: object) -> tuple[set[str], set[str], set[str]]:
    """The names aiosmtpd's SMTP.__init__ would collect from the complete attribute lists."""
    def names(obj: object, prefix: str) -> set[str]:
        return {n.replace(prefix, "", 1) for n in object.__dir__(obj) if n.startswith(prefix)}
    auth = {n.replace("__", "-") for n in names(session, "auth_") | names(handler, "auth_")}
    return names(session, "smtp_"), names(handler, "handle_"), auth


@pytest.mark.parametrize("kind", ["submission", "relay"])
def test_per_connection_tables_are_those_of_the_full_attribute_lists(kind: str) -> None:
    import asyncio

    from mailserver.relay_server import RelayHandler
    from mailserver.smtp_protocol import CaduceeSMTP
    from mailserver.smtp_server import SubmissionHandler, SubmissionSMTP

    handler_cls, session_cls = ((SubmissionHandler, SubmissionSMTP) if kind == "submission"
                                else (RelayHandler, CaduceeSMTP))
    handler = object.__new__(handler_cls)
    handler.connections = set()
    loop = asyncio.new_event_loop()
    try:
        session = session_cls(handler, implicit_tls=True, loop=loop)
        commands, hooks, auth = _full_tables(session, handler)
        assert set(session._smtp_methods) == commands
        assert set(session._handle_hooks) == hooks
        assert set(session._auth_methods) == auth
        assert {"EHLO", "MAIL", "RCPT", "DATA", "STARTTLS", "AUTH", "QUIT"} <= commands
        assert {"EHLO", "MAIL", "RCPT", "DATA", "exception"} <= hooks
        # dir() is short: no property is evaluated at each connection
        assert "tls_ssl_object" not in dir(session) and len(dir(session)) == len(set(dir(session)))
    finally:
        loop.close()


def test_received_date_is_the_current_second_in_rfc5322_form() -> None:
    import email.utils
    import time

    from mailserver.smtp_protocol import _received_date

    before = int(time.time())
    text = _received_date()
    after = int(time.time())
    parsed = email.utils.parsedate_to_datetime(text)
    assert before <= parsed.timestamp() <= after
    assert text.endswith(" +0000")  # UTC, as email.utils.format_datetime writes it
