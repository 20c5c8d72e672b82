"""LDAP client connections (ldap3) of the publication to OpenLDAP and of certificate discovery.

Transport security, the same rule for both (RFC 4513 §3, §5.1.2):

- `ldaps://host[:636]`: TLS from the first byte. The server certificate is verified against a CA bundle
  (`--ca`, `[discovery] ca`, else the node's `[tls] trust_anchors`) and must name the host dialled
  (RFC 6125, Python's `ssl` host name check); TLS 1.2+ with the profile of `crypto.tls`.
- `ldap://host[:389]` with StartTLS: the same verification, before anything else is sent (no bind, no
  search in clear).
- `ldap://` without StartTLS: only to a loopback address (`127.0.0.0/8`, `::1`, `localhost`), where
  nothing crosses a network. Any other host is refused: a password, and the directory, in clear on a
  network would be readable (and the directory's answers forgeable) by anyone on the path.

ldap3's own TLS wrapper checks host names with `ssl.match_hostname` (deprecated, and only after the
handshake); `_VerifiedTls` replaces it with a context from `crypto.tls.client_context`, which verifies the
chain and the name during the handshake.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import ssl
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crypto.tls import client_context

with warnings.catch_warnings():
    # ldap3 2.9.1 imports names that pyasn1 >= 0.6 deprecates (tagMap, typeMap): harmless, and not ours.
    warnings.simplefilter("ignore", DeprecationWarning)
    import ldap3
    from ldap3.core import exceptions as ldap3_exceptions

log = logging.getLogger(__name__)

__all__ = [
    "LdapBindError",
    "LdapConnectionError",
    "LdapEndpoint",
    "LdapError",
    "close",
    "connect",
    "is_loopback",
    "ldap3",
    "ldap3_exceptions",
    "parse_url",
]

DEFAULT_PORTS = {"ldap": 389, "ldaps": 636}

# RFC 4511 §4.1.9 result codes used by callers.
SUCCESS = 0
INVALID_CREDENTIALS = 49


class LdapError(Exception):
    """An LDAP server could not be used; the message says which one and why, and is safe to print."""


class LdapConnectionError(LdapError):
    """The server cannot be reached, refused TLS, timed out or closed the connection."""


class LdapBindError(LdapError):
    """The server refused the bind (wrong DN or password, account locked…)."""


@dataclass(frozen=True)
class LdapEndpoint:
    """Where an LDAP server is and how to talk to it safely (see the module's rule)."""

    scheme: str  # ldap | ldaps
    host: str
    port: int
    starttls: bool = False

    @property
    def tls(self) -> bool:
        return self.scheme == "ldaps" or self.starttls

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        return self.url + (" with StartTLS" if self.starttls else "")


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_url(url: str, *, starttls: bool = False) -> LdapEndpoint:
    """An endpoint from `ldap[s]://host[:port][/]`, applying the transport rule (LdapError when refused)."""
    parts = urllib.parse.urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise LdapError(f"{url!r}: expected an ldaps://host[:port] or ldap://host[:port] URL")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise LdapError(f"{url!r}: bad port") from None
    host = parts.hostname or ""
    if not host:
        raise LdapError(f"{url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise LdapError(f"{url!r}: give the server only (scheme, host, port); the base DN is a separate option")
    if scheme == "ldaps" and starttls:
        raise LdapError(f"{url!r}: StartTLS is for ldap:// URLs; ldaps:// is already TLS")
    if scheme == "ldap" and not starttls and not is_loopback(host):
        raise LdapError(f"{url!r}: plain ldap:// would cross the network in clear; use ldaps://, or ldap:// with "
                        "StartTLS (plain ldap:// is allowed to a loopback address only)")
    return LdapEndpoint(scheme, host, port, starttls)


class _VerifiedTls(ldap3.Tls):  # type: ignore[misc]
    """ldap3's TLS settings, wrapping sockets with a verifying context of `crypto.tls` instead of its own."""

    def __init__(self, ca_file: Path, hostname: str) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED, ca_certs_file=str(ca_file))
        self._context = client_context(Path(ca_file))  # chain + host name, TLS 1.2+
        self._hostname = hostname

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        connection.socket = self._context.wrap_socket(
            connection.socket, server_side=False, do_handshake_on_connect=do_handshake,
            server_hostname=self._hostname)


def _reason(exc: BaseException) -> str:
    """The message of an exception, out of the tuples ldap3 wraps around the socket error it caught."""
    value: object = exc
    while isinstance(value, BaseException | tuple) and not isinstance(value, str):
        args = value.args if isinstance(value, BaseException) else value
        if len(args) != 1:
            break
        value = args[0]
    text = (value if isinstance(value, str) else str(exc)).strip() or type(exc).__name__
    while (wrapped := re.fullmatch(r"""\((['"])(.*)\1,\)""", text, re.DOTALL)) is not None:
        text = wrapped.group(2)
    return text.splitlines()[0][:300]


def connect(endpoint: LdapEndpoint, *, ca_file: Path | None, bind_dn: str | None = None,
            password: str | None = None, timeout: int = 10, **connection_args: Any) -> Any:
    """An open (and, with `bind_dn`, bound) ldap3 connection; `LdapConnectionError` or `LdapBindError`.

    `timeout` (seconds) bounds the TCP connection, the TLS handshake and every wait for an answer.
    """
    if endpoint.tls and ca_file is None:
        raise LdapError(f"{endpoint}: a CA bundle is needed to verify the server's certificate")
    tls = _VerifiedTls(ca_file, endpoint.host) if endpoint.tls and ca_file is not None else None
    server = ldap3.Server(endpoint.host, port=endpoint.port, use_ssl=endpoint.scheme == "ldaps", tls=tls,
                          get_info=ldap3.NONE, connect_timeout=timeout)
    conn = ldap3.Connection(
        server, user=bind_dn, password=password,
        authentication=ldap3.SIMPLE if bind_dn else ldap3.ANONYMOUS,
        receive_timeout=int(timeout), raise_exceptions=False, auto_referrals=False, **connection_args)
    try:
        conn.open()
        if endpoint.starttls and not conn.start_tls():
            raise LdapConnectionError(f"{endpoint}: StartTLS refused ({conn.result.get('description')})")
        if bind_dn and not conn.bind():
            result = conn.result or {}
            code, description = result.get("result"), result.get("description")
            message = (result.get("message") or "").strip()
            if code == INVALID_CREDENTIALS:
                raise LdapBindError(f"{endpoint}: bind as {bind_dn!r} refused: invalid credentials "
                                    "(wrong DN or password)")
            raise LdapBindError(f"{endpoint}: bind as {bind_dn!r} refused: {description} ({code})"
                                + (f": {message}" if message else ""))
    except LdapError:
        close(conn)
        raise
    except (ldap3_exceptions.LDAPException, OSError, ssl.SSLError) as exc:
        close(conn)
        raise LdapConnectionError(f"{endpoint}: {_reason(exc)}") from None
    return conn


def close(conn: Any) -> None:
    """Unbind and close, whatever state the connection is in (ldap3 leaves the socket of a failed connect
    open for the garbage collector: closed here)."""
    try:
        conn.unbind()
    except Exception as exc:  # noqa: BLE001 - closing a broken connection: nothing more to do
        log.debug("closing an LDAP connection: %s", type(exc).__name__)
    sock = getattr(conn, "socket", None)
    if sock is not None:
        try:
            sock.close()
        except OSError as exc:
            log.debug("closing an LDAP socket: %s", type(exc).__name__)
