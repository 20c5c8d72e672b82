"""The SMTP protocol shell shared by every listener (submission and relay): aiosmtpd, patched here.

aiosmtpd behaviour replaced in this one place (REFERENCE.md §6), each with a test:
- replies without RFC 3463 enhanced codes get them (`push`);
- MAIL and RCPT are parsed here: aiosmtpd upper-cases parameter values (ENVID and ORCPT are
  case-sensitive), refuses the null reverse-path `MAIL FROM:<>` (every DSN uses it) and knows no DSN
  parameters (RFC 3461: RET, ENVID on MAIL; NOTIFY, ORCPT on RCPT);
- its default exception handler echoes exception text: handlers answer `451 4.3.0` with a reference;
- a session inside DATA is tracked so that shutdown lets it finish (`shutdown`);
- the idle timeout is one timer per session whose deadline each command moves, not a new timer per
  command (`_reset_timeout`);
- its per-connection method tables are built from short name lists (`HookNames`);
- a multi-line reply is written at once, not line by line (`push`), and the session's deprecated
  `login_data` is a plain attribute (`_Session`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import errno
import logging
import re
import ssl
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from aiosmtpd.smtp import MISSING, SMTP, Envelope as SmtpEnvelope, Session, syntax

from mailserver import replies
from mailserver.dsn import parse_notify, parse_orcpt, validate_envid

log = logging.getLogger(__name__)


class _LibraryNoise(logging.Filter):
    """aiosmtpd warnings that do not apply to how it is used here."""

    NOISE = ("auth_required == True but auth_require_tls == False",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOISE)


logging.getLogger("mail.log").addFilter(_LibraryNoise())

_PARAM = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?$")  # RFC 5321 §4.1.2
_REPLY_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters but HT


@dataclass(frozen=True)
class RecipientParams:
    notify: str | None = None  # normalised "SUCCESS,FAILURE" / "NEVER"
    orcpt: str | None = None  # as given: "rfc822;addr" in xtext


class ConnectionRegistry(Protocol):
    connections: set["CaduceeSMTP"]


def parse_params(text: str) -> dict[str, str | None] | None:
    """ESMTP parameters: keyword (case-insensitive) → value (case kept). None on a syntax error."""
    out: dict[str, str | None] = {}
    for token in text.split():
        m = _PARAM.match(token)
        if not m:
            return None
        key = m.group(1).upper()
        if key in out:
            return None
        out[key] = m.group(2)
    return out


def split_path(arg: str | None, keyword: str) -> tuple[str, str] | None:
    """`FROM:<path> params` → (path without brackets, params). None on a syntax error."""
    if arg is None:
        return None
    head = arg[: len(keyword)]
    if head.upper() != keyword:
        return None
    rest = arg[len(keyword):].lstrip()
    if not rest.startswith("<"):
        return None
    end = rest.find(">")
    if end < 0:
        return None
    path = rest[1:end]
    if "<" in path or any(c in path for c in " \t\r\n"):
        return None
    if ":" in path and path.startswith("@"):  # RFC 5321 §4.1.2 source route: ignored
        path = path.split(":", 1)[1]
    return path, rest[end + 1:]


_received_second: tuple[int, str] = (-1, "")  # a second, and its RFC 5322 date-time


def _received_date() -> str:
    """The date-time of a Received field, formatted once per second (email.utils.format_datetime costs more
    than the rest of the field)."""
    global _received_second
    second = int(time.time())
    if second != _received_second[0]:
        _received_second = (second, email.utils.format_datetime(dt.datetime.fromtimestamp(second, dt.timezone.utc)))
    return _received_second[1]


IDENT = "Caducee ESMTP"  # ASCII: it appears in the greeting and in Received fields


def ehlo_lines(responses: list[str]) -> list[str]:
    """aiosmtpd's EHLO lines without HELP, plus what every listener of ours does (RFC 2920, 3461, 2034)."""
    lines = [r for r in responses if r not in ("250 HELP", "250-HELP")]
    return lines + ["250-PIPELINING", "250-DSN", "250 ENHANCEDSTATUSCODES"]


class HookNames:
    """`dir()` of a session or handler lists only the names aiosmtpd builds its tables from.

    aiosmtpd's `SMTP.__init__` runs, at every connection, `inspect.getmembers(session)` and
    `inspect.getmembers(handler)` (which read every attribute, properties included) and `dir()` of both,
    keeping only the names starting with `smtp_`, `handle_` and `auth_`: a third of the Python time
    of a new connection. Listing those names alone, once per class, gives the same tables (test).
    """

    HOOK_PREFIXES = ("smtp_", "handle_", "auth_")
    _hook_names: ClassVar[dict[type, list[str]]] = {}

    def __dir__(self) -> list[str]:
        cls = type(self)
        names = HookNames._hook_names.get(cls)
        if names is None:
            names = sorted(n for n in object.__dir__(self) if n.startswith(HookNames.HOOK_PREFIXES))
            HookNames._hook_names[cls] = names
        return list(names)


class _Session(Session):
    """aiosmtpd's session with `login_data` a plain attribute: aiosmtpd sets it at every AUTH through a
    deprecated property that logs a warning each time (a log record built, then dropped)."""

    login_data: Any = None


class CaduceeSMTP(HookNames, SMTP):
    """aiosmtpd's SMTP with the fixes above. `handler.connections` tracks the live sessions."""

    def __init__(self, handler: ConnectionRegistry, *, implicit_tls: bool, dsn: bool = True, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.implicit_tls = implicit_tls
        self.dsn = dsn
        self._in_ehlo = False
        self._held: list[str] = []  # continuation lines of the reply being written
        self.in_data = False
        self._deadline = 0.0
        handler.connections.add(self)

    def _create_session(self) -> Session:
        return _Session(self.loop)

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            # RFC 5321 §4.2 (textstring): aiosmtpd echoes an unknown verb; a CR, NUL or escape in it would
            # make a malformed reply (found by tests/fuzz).
            status = _REPLY_UNSAFE.sub("?", status)
            if not self._in_ehlo:
                status = replies.with_enhanced_code(status)
            # aiosmtpd writes each line of a multi-line reply (EHLO's ten) by itself: a TLS record and a
            # send() each, and as many wake-ups of the client. Continuation lines ("250-…", RFC 5321
            # §4.2.1) wait for the reply's last line and go out with it, in one write.
            if status[3:4] == "-":
                self._held.append(status)
                return
            if self._held:
                self._held.append(status)
                status = "\r\n".join(self._held)
                self._held.clear()
        await super().push(status)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        self.in_data = True
        try:
            await self._data(arg)
        except Exception:
            # RFC 5321 §4.1.1.4: the end of data ends the transaction whatever the reply. aiosmtpd resets
            # the envelope only when the DATA hook returns; after a hook that raised (answered 451 by
            # handle_exception) the next MAIL would get "503 Nested MAIL command".
            self._set_post_data_state()
            raise
        finally:
            self.in_data = False

    async def _data(self, arg: str) -> None:
        """aiosmtpd's DATA, reading the message in blocks instead of line by line.

        aiosmtpd awaits every line of the message (a 5 KB message is 70 awaits); here the buffered bytes are
        taken as they come and searched for the end of data, which is several times cheaper on the event
        loop. The semantics are aiosmtpd's: only CRLF "." CRLF ends the data (a bare LF or CR never does:
        those are refused later, policy.has_bare_line_ending); a line starting with "." loses that dot
        (RFC 5321 §4.5.2); a line longer than `line_length_limit` gets `500` and more than
        `data_size_limit` bytes `552`, each once the end of data has arrived (RFC 5321 §4.2.5), with the
        excess discarded as it comes so that memory stays bounded.
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        limit = self.data_size_limit
        # The data as if preceded by CRLF, so that an empty message (".\r\n" at once) ends like any other.
        buf = bytearray(b"\r\n")
        scanned = 0  # buf[:scanned] holds no terminator (the last 4 bytes are searched again)
        dropped = 0  # bytes discarded beyond the size limit
        too_much = False
        reader = self._reader
        while True:
            end = buf.find(b"\r\n.\r\n", max(0, scanned - 4))
            if end >= 0:
                break
            scanned = len(buf)
            if limit and len(buf) - 2 + dropped > limit:
                too_much = True
                dropped += len(buf) - 6  # keep the last 4 bytes: a terminator may straddle two blocks
                del buf[2:-4]
                scanned = len(buf)
            if self.transport is None:
                return
            try:
                chunk = await reader.read(65536)
            except asyncio.CancelledError:
                log.info("event=connection_lost_in_data")
                self._writer.close()
                raise
            if not chunk:  # end of stream: the client is gone, nothing was accepted
                return
            buf += chunk
        rest = bytes(buf[end + 5:])
        if rest:  # pipelined commands after the end of data: back to the reader, in order
            reader._buffer[0:0] = rest  # type: ignore[attr-defined]
        if too_much or (limit and end + dropped > limit):
            await self.push("552 Error: Too much mail data")
            self._set_post_data_state()
            return
        # Dot-unstuffing, then without the leading CRLF and the terminator's dot line.
        original_content = bytes(buf[:end + 2]).replace(b"\r\n.", b"\r\n")[2:]
        del buf
        if self.line_length_limit and original_content and max(
                map(len, original_content.split(b"\r\n"))) + 2 > self.line_length_limit:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            self._set_post_data_state()
            return
        self.envelope.content = original_content
        self.envelope.original_content = original_content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd cancels its idle timer and schedules a new one at every command: a heap entry per
        command, the cancelled ones kept until their time comes. Here a command moves the deadline, and the
        one timer, when it fires before it, sets itself again for the rest (same timeout, same close)."""
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(self._deadline, self._idle_check)

    def _idle_check(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._idle_check)
            return
        self._timeout_cb()

    def connection_lost(self, error: Exception | None) -> None:
        self.event_handler.connections.discard(self)
        super().connection_lost(error)
        # aiosmtpd's protocol sits in reference cycles (its dicts of bound methods, the stream writer, the
        # STARTTLS SSLProtocol and its 256 KiB buffer, the handler task and its traceback): a closed
        # connection would wait for the cyclic garbage collector, and under TLS churn memory climbs by
        # hundreds of MB (REFERENCE.md §7, `caducee bench memory`). Once the session task has finished
        # (it still logs and closes the writer after its cancellation), the cycles are broken so that
        # reference counting frees the connection at once.
        task = self._handler_coroutine
        if task is not None and not task.done():
            task.add_done_callback(self._release)
        else:
            self._release()

    def _release(self, _task: asyncio.Task[None] | None = None) -> None:
        """Drop the references of a closed connection that lead back to it (connection_lost)."""
        self._handler_coroutine = None
        self._client_connected_cb = None
        self._smtp_methods = {}
        self._auth_methods = {}
        self._timeout_handle = None
        self._reader = None  # type: ignore[assignment]
        self._writer = None  # type: ignore[assignment]
        self._tls_protocol = None
        self._original_transport = None
        self.transport = None

    @property
    def tls_ssl_object(self) -> ssl.SSLObject | ssl.SSLSocket | None:
        """The TLS object of this connection, for STARTTLS and implicit TLS alike."""
        if self.session is not None and self.session.ssl:
            obj = self.session.ssl.get("ssl_object")
            if obj is not None:
                return obj  # type: ignore[no-any-return]
        if self.transport is not None:
            return self.transport.get_extra_info("ssl_object")  # type: ignore[no-any-return]
        return None

    @property
    def is_tls(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    def received_header(self, hostname: str, queue_id: str, protocol: str) -> bytes:
        """The trace field of RFC 5321 §4.4; `protocol` per RFC 3848 (ESMTPS, ESMTPSA)."""
        from mailserver.policy import sanitise_helo

        tls = self.tls_ssl_object
        tls_info = ""
        if tls is not None:
            cipher = tls.cipher()
            tls_info = f" (version={tls.version()} cipher={cipher[0] if cipher else ''})"
        assert self.session is not None
        helo = sanitise_helo(self.session.host_name or "unknown")
        peer_ip = self.session.peer[0] if isinstance(self.session.peer, tuple) else "unknown"
        date = _received_date()
        return (
            f"Received: from {helo} ([{peer_ip}])\r\n\tby {hostname} ({IDENT}) with {protocol}"
            f" id {queue_id}{tls_info};\r\n\t{date}\r\n"
        ).encode("ascii", errors="replace")

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str | None) -> None:
        """RFC 5321 §3.5.3: 252 without parsing nor echoing the argument (no address harvesting). aiosmtpd's
        parser raised IndexError on `VRFY "` and echoed what it could not parse (found by tests/fuzz)."""
        if await self.check_auth_needed("VRFY"):
            return
        if not arg:
            await self.push("501 5.5.4 Syntax: VRFY <address>")
            return
        await self.push("252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery")

    # -- MAIL and RCPT (RFC 5321 §4.1.1.2–3, RFC 1870, RFC 6152, RFC 6531, RFC 3461 §4) --

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("MAIL"):
            return
        assert self.session is not None and self.envelope is not None
        if getattr(self.envelope, "mail_given", False):
            await self.push("503 5.5.1 Nested MAIL command")
            return
        parsed = split_path(arg, "FROM:")
        if parsed is None:
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address> [parameters]")
            return
        address, rest = parsed
        params = parse_params(rest)
        if params is None or (params and not self.session.extended_smtp):
            await self.push("501 5.5.4 Syntax error in parameters")
            return
        body = (params.pop("BODY", None) or "7BIT").upper()
        if body not in ("7BIT", "8BITMIME"):
            await self.push("501 5.5.4 BODY must be 7BIT or 8BITMIME")
            return
        if "SMTPUTF8" in params:
            if params.pop("SMTPUTF8") is not None:
                await self.push("501 5.5.4 SMTPUTF8 takes no value")
                return
            self.envelope.smtp_utf8 = True
        size = params.pop("SIZE", None)
        if size is not None:
            if not size.isdigit():
                await self.push("501 5.5.4 SIZE must be a number")
                return
            if self.data_size_limit and int(size) > self.data_size_limit:
                await self.push(str(replies.MESSAGE_TOO_BIG))
                return
        ret = params.pop("RET", None) if self.dsn else None
        envid = params.pop("ENVID", None) if self.dsn else None
        if ret is not None and ret.upper() not in ("FULL", "HDRS"):
            await self.push("501 5.5.4 RET must be FULL or HDRS")
            return
        if envid is not None:
            # RFC 3461 §4.4: xtext of 1–100 printable US-ASCII characters. A decoded CR, LF or NUL was
            # accepted here and then refused by build_dsn, which stalled every report behind it.
            try:
                validate_envid(envid)
            except ValueError:
                await self.push("501 5.5.4 Invalid ENVID")
                return
        if params:
            await self.push("555 5.5.4 MAIL parameters not recognized or not implemented")
            return
        self.envelope.dsn_ret = ret.upper() if ret else None  # type: ignore[attr-defined]
        self.envelope.dsn_envid = envid  # type: ignore[attr-defined]
        status = await self._call_handler_hook("MAIL", address, (rest or "").split())
        if status is MISSING:
            status = str(replies.SENDER_OK)
        if status.startswith("250"):
            self.envelope.mail_from = address
            self.envelope.mail_given = True  # type: ignore[attr-defined]
        await self.push(status)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("RCPT"):
            return
        assert self.session is not None and self.envelope is not None
        if not getattr(self.envelope, "mail_given", False):
            await self.push("503 5.5.1 Need MAIL command first")
            return
        parsed = split_path(arg, "TO:")
        if parsed is None or not parsed[0]:
            await self.push("501 5.5.4 Syntax: RCPT TO:<address> [parameters]")
            return
        address, rest = parsed
        params = parse_params(rest)
        if params is None or (params and not self.session.extended_smtp):
            await self.push("501 5.5.4 Syntax error in parameters")
            return
        notify = params.pop("NOTIFY", None) if self.dsn else None
        orcpt = params.pop("ORCPT", None) if self.dsn else None
        try:
            notify_text = ",".join(sorted(n.name for n in parse_notify(notify))) if notify else None
            if orcpt is not None:
                parse_orcpt(orcpt)
        except ValueError:
            await self.push("501 5.5.4 Invalid NOTIFY or ORCPT")
            return
        if params:
            await self.push("555 5.5.4 RCPT parameters not recognized or not implemented")
            return
        status = await self._call_handler_hook("RCPT", address, (rest or "").split())
        if status is MISSING:
            status = str(replies.RECIPIENT_OK)
        if status.startswith("250"):
            if address not in self.envelope.rcpt_tos:
                self.envelope.rcpt_tos.append(address)
                dsn = getattr(self.envelope, "rcpt_dsn", None)
                if dsn is None:
                    dsn = self.envelope.rcpt_dsn = {}  # type: ignore[attr-defined]
                dsn[address] = RecipientParams(notify_text, orcpt)
        await self.push(status)


_NO_DSN = RecipientParams()


def envelope_dsn(envelope: SmtpEnvelope, address: str) -> RecipientParams:
    return getattr(envelope, "rcpt_dsn", {}).get(address, _NO_DSN)  # type: ignore[no-any-return]


async def shutdown(registry: ConnectionRegistry, servers: list[asyncio.base_events.Server], grace: float = 30.0) -> None:
    """Stop listening; idle sessions get 421; sessions inside DATA may finish within `grace` seconds."""
    for srv in servers:
        srv.close()
    for conn in list(registry.connections):
        if not conn.in_data and conn.transport is not None and not conn.transport.is_closing():
            try:
                await asyncio.wait_for(conn.push(str(replies.SHUTTING_DOWN)), 2)
            except Exception:  # noqa: BLE001 - the peer may be gone already; we are closing anyway
                pass
            if conn.transport is not None:
                conn.transport.close()
    deadline = asyncio.get_running_loop().time() + grace
    while any(c.in_data for c in registry.connections) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    for conn in list(registry.connections):
        if conn.transport is not None and not conn.transport.is_closing():
            # RFC 5321 §3.8: a session still sending its message when the grace is over gets 421 too
            # (the message was not acknowledged: the client keeps it and retries).
            try:
                await asyncio.wait_for(conn.push(str(replies.SHUTTING_DOWN)), 2)
            except Exception:  # noqa: BLE001 - the peer may be gone already; we are closing anyway
                pass
        if conn.transport is not None:
            conn.transport.close()


def is_storage_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it) says the disk or the database is full: ENOSPC/EDQUOT from the
    filesystem, SQLITE_FULL from SQLite, SQLSTATE 53100 (disk_full) from PostgreSQL."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if getattr(exc, "sqlite_errorcode", None) == 13:  # SQLITE_FULL
            return True
        if getattr(exc, "sqlstate", None) == "53100":
            return True
        orig = getattr(exc, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's exception
        todo += [orig if isinstance(orig, BaseException) else None, exc.__cause__, exc.__context__]
    return False


def opaque_exception_reply(error: BaseException, logger: logging.Logger) -> str:
    """`451 4.3.0` (`452 4.3.1` when storage is full) with a reference; the log gets where it failed,
    never the exception's text."""
    import traceback

    from aiosmtpd.smtp import TLSSetupException

    if isinstance(error, TLSSetupException):
        # A client that gave up during the STARTTLS handshake (or spoke something else): its connection
        # is closed and nothing was accepted; not an error of ours.
        logger.info("event=tls_handshake_failed error=%s", type(error.__cause__ or error).__name__)
        return str(replies.internal_error()[0])
    reply, ref = replies.storage_full() if is_storage_full(error) else replies.internal_error()
    where = " < ".join(
        f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}:{frame.name}"
        for frame in reversed(traceback.extract_tb(error.__traceback__))
    )
    logger.error("event=smtp_exception ref=%s error=%s where=%s", ref, type(error).__name__, where)
    return str(reply)
