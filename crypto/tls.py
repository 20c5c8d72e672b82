"""TLS contexts carrying the Caducée TLS profile.

Profile (shape of ANSSI's "Recommandations de sécurité relatives à TLS", v1.2):

* TLS 1.3 (RFC 8446) and TLS 1.2 (RFC 5246) only; TLS 1.0/1.1 are refused (RFC 8996);
* on TLS 1.2, ECDHE key exchange with AEAD suites only: AES-256-GCM, ChaCha20-Poly1305, AES-128-GCM
  (RFC 5289, RFC 7905) — no CBC, no static-RSA key exchange, no SHA-1 MAC;
* TLS 1.3 suites TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256, TLS_AES_128_GCM_SHA256;
* no TLS compression (CRIME), no TLS 1.2 renegotiation, the server's suite order wins.

Servers *request* a client certificate but accept any certificate, or none, at the TLS layer: the
application validates it (:mod:`crypto.validation`) and answers in its own protocol — ``535 5.7.8`` for
SMTP (RFC 4954) instead of a TLS alert the user cannot interpret. Python's :mod:`ssl` has no way to say
"request but do not judge", so :func:`accept_any_client_certificate` installs an OpenSSL verify callback
through :mod:`ctypes`; pyOpenSSL (used by Twisted) offers the callback natively.
"""

from __future__ import annotations

import _ssl
import ctypes
import functools
import logging
import os
import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from OpenSSL._util import lib as _pyopenssl_lib
from twisted.internet.interfaces import IOpenSSLContextFactory, IOpenSSLServerConnectionCreator, ISSLTransport
from zope.interface import implementer

log = logging.getLogger(__name__)

__all__ = [
    "TLS12_CIPHERS",
    "TLS13_CIPHERSUITES",
    "TwistedServerContextFactory",
    "accept_any_client_certificate",
    "client_context",
    "peer_certificate_der",
    "server_context",
    "twisted_peer_certificate_der",
    "twisted_server_context_factory",
]

TLS12_CIPHERS: Final[tuple[str, ...]] = (
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
)
"""TLS 1.2 suites (OpenSSL names), in server preference order."""

TLS13_CIPHERSUITES: Final[tuple[str, ...]] = (
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_GCM_SHA256",
)
"""TLS 1.3 suites (RFC 8446 names), in server preference order (OpenSSL's default set)."""

_CIPHER_STRING: Final = ":".join(TLS12_CIPHERS)
_TLS13_STRING: Final = ":".join(TLS13_CIPHERSUITES)
_PROFILE_OPTIONS: Final = (
    ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION | ssl.OP_SINGLE_ECDH_USE
)

# OpenSSL constants (ssl.h); stable across OpenSSL 1.1 and 3.x.
_SSL_VERIFY_NONE: Final = 0x00
_SSL_VERIFY_PEER: Final = 0x01


# -------------------- Python ssl (asyncio, aiosmtpd, outbound clients)


def _apply_profile(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(_CIPHER_STRING)
    ctx.options |= _PROFILE_OPTIONS
    # Defence in depth: a distribution policy or an OpenSSL alias must not have widened the list.
    allowed = set(TLS12_CIPHERS) | set(TLS13_CIPHERSUITES)
    unexpected = sorted({cipher["name"] for cipher in ctx.get_ciphers()} - allowed)
    if unexpected:
        raise RuntimeError(f"TLS profile: OpenSSL enabled unexpected cipher suites {unexpected}")


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server context for asyncio listeners (aiosmtpd STARTTLS, implicit TLS).

    ``cert_file`` is a PEM certificate, optionally followed by its chain (sent to clients as is).
    The context requests a client certificate and accepts any (or none): read it with
    :func:`peer_certificate_der` and validate it with :class:`crypto.validation.CertificateValidator`.

    One TLS 1.3 session ticket instead of OpenSSL's two, none on TLS 1.2 (``OP_NO_TICKET``): each ticket
    re-encodes the session with the client's certificate, ~0.2 ms of CPU (2.2 ms per server handshake with
    two, 1.8 with one, 1.6 with none; measured in memory), and the mail clients seen here (Python's
    smtplib, Postfix's smtp) open new sessions without resuming. Not zero: the ticket is what the server
    sends right after the client's last handshake flight, and so carries the TCP acknowledgement of that
    flight at once. Without it a client that leaves Nagle's algorithm on (smtplib) holds its EHLO until
    the delayed acknowledgement, 40 ms later: 75 → 17 connections per second for one sequential client.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_profile(ctx)
    ctx.load_cert_chain(certfile=os.fspath(cert_file), keyfile=os.fspath(key_file))
    accept_any_client_certificate(ctx)
    restrict_key_exchange_groups(ctx)
    ctx.num_tickets = 1
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def client_context(
    ca_file: Path,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    *,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A client context (outbound relay, tests) that verifies the server against ``ca_file``.

    With ``cert_file`` (and ``key_file``, unless the key is in ``cert_file``) the client presents that
    certificate when the server asks for one (mutual TLS between operators). The server certificate is
    always verified (RFC 5280 path validation by OpenSSL); ``check_hostname`` adds RFC 6125 name matching.
    """
    if key_file is not None and cert_file is None:
        raise ValueError("key_file given without cert_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _apply_profile(ctx)
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=os.fspath(ca_file))
    if cert_file is not None:
        ctx.load_cert_chain(
            certfile=os.fspath(cert_file),
            keyfile=os.fspath(key_file) if key_file is not None else None,
        )
    return ctx


def peer_certificate_der(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> bytes | None:
    """The DER certificate the peer presented, or ``None``.

    Use this rather than ``getpeercert()``: with :func:`accept_any_client_certificate` the certificate
    was not verified, and the dict form is meant for verified certificates only.
    """
    der = ssl_object.getpeercert(binary_form=True)
    return der or None


# -------------------- the ctypes patch: "request a client certificate, accept any" for ssl

_VerifyCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


def _accept_any(preverify_ok: int, x509_store_ctx: int | None) -> int:
    """OpenSSL verify callback (SSL_CTX_set_verify(3)): every certificate of the chain is acceptable."""
    return 1


_CertVerifyCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


def _accept_chain(x509_store_ctx: int | None, arg: int | None) -> int:
    """OpenSSL certificate verification callback (SSL_CTX_set_cert_verify_callback(3)), called once per
    handshake instead of X509_verify_cert: the chain is accepted without building or checking it."""
    return 1


# Module-level, hence alive for the whole process: OpenSSL keeps a raw pointer to these trampolines in every
# patched SSL_CTX, and a collected ctypes callback would leave a dangling pointer.
_ACCEPT_ANY_CALLBACK: Final = _VerifyCallback(_accept_any)
_ACCEPT_ANY_ADDRESS: Final = ctypes.cast(_ACCEPT_ANY_CALLBACK, ctypes.c_void_p).value
_ACCEPT_CHAIN_CALLBACK: Final = _CertVerifyCallback(_accept_chain)


class _LibSSL:
    """The few libssl functions the patch needs, from the libssl CPython's ``_ssl`` is linked to."""

    def __init__(self, library: ctypes.CDLL, origin: str) -> None:
        self.origin = origin
        self.SSL_CTX_get_verify_mode = library.SSL_CTX_get_verify_mode
        self.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
        self.SSL_CTX_get_verify_mode.restype = ctypes.c_int
        self.SSL_CTX_get_options = library.SSL_CTX_get_options
        self.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        self.SSL_CTX_get_options.restype = ctypes.c_uint64
        self.SSL_CTX_get_verify_callback = library.SSL_CTX_get_verify_callback
        self.SSL_CTX_get_verify_callback.argtypes = [ctypes.c_void_p]
        self.SSL_CTX_get_verify_callback.restype = ctypes.c_void_p
        self.SSL_CTX_set_verify = library.SSL_CTX_set_verify
        self.SSL_CTX_set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, _VerifyCallback]
        self.SSL_CTX_set_verify.restype = None
        self.SSL_CTX_set_cert_verify_callback = library.SSL_CTX_set_cert_verify_callback
        self.SSL_CTX_set_cert_verify_callback.argtypes = [ctypes.c_void_p, _CertVerifyCallback, ctypes.c_void_p]
        self.SSL_CTX_set_cert_verify_callback.restype = None
        self.SSL_CTX_ctrl = library.SSL_CTX_ctrl
        self.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.SSL_CTX_ctrl.restype = ctypes.c_long
        # OpenSSL_version_num lives in libcrypto, a dependency of libssl: dlsym(3) on a handle searches
        # the dependencies too.
        self.OpenSSL_version_num = library.OpenSSL_version_num
        self.OpenSSL_version_num.argtypes = []
        self.OpenSSL_version_num.restype = ctypes.c_ulong


def _libssl_from_maps() -> ctypes.CDLL:
    """The libssl mapped into this process, when exactly one is (it is already loaded: no new code)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {
                line.split(None, 5)[5].strip()
                for line in maps
                if len(line.split(None, 5)) == 6 and re.search(r"/libssl\.so[^/]*$", line.strip())
            }
    except OSError as exc:
        raise RuntimeError(f"cannot read /proc/self/maps to locate libssl: {exc}") from exc
    if len(paths) != 1:
        raise RuntimeError(f"expected exactly one libssl mapped in the process, found {sorted(paths)}")
    return ctypes.CDLL(paths.pop())


@functools.cache
def _libssl() -> _LibSSL:
    """Resolve libssl symbols, preferring the handle of CPython's ``_ssl`` extension.

    ``dlopen`` of the already-loaded ``_ssl`` module returns its handle, and symbol lookup through it
    reaches the libssl/libcrypto it was linked against — the very library that owns the ``SSL_CTX``.
    The runtime version must match :data:`ssl.OPENSSL_VERSION_NUMBER` (what ``_ssl`` reports).
    """
    errors: list[str] = []
    candidates: list[tuple[str, Callable[[], ctypes.CDLL]]] = [
        ("_ssl extension", lambda: ctypes.CDLL(_ssl.__file__)),
        ("/proc/self/maps", _libssl_from_maps),
    ]
    for origin, opener in candidates:
        try:
            library = opener()
            lib = _LibSSL(library, origin)
        except (OSError, AttributeError, RuntimeError, TypeError) as exc:
            errors.append(f"{origin}: {exc}")
            continue
        version = lib.OpenSSL_version_num()
        if version != ssl.OPENSSL_VERSION_NUMBER:
            errors.append(
                f"{origin}: OpenSSL {version:#x} is not the ssl module's {ssl.OPENSSL_VERSION_NUMBER:#x}"
            )
            continue
        log.debug("OpenSSL %#x symbols resolved through the %s", version, origin)
        return lib
    raise RuntimeError("cannot locate the libssl used by the ssl module: " + "; ".join(errors))


def _ssl_ctx_pointer(ctx: ssl.SSLContext) -> int:
    """The ``SSL_CTX *`` inside a Python SSLContext.

    CPython's ``_ssl`` module defines ``typedef struct { PyObject_HEAD; SSL_CTX *ctx; ... } PySSLContext``
    (Modules/_ssl.c), so the pointer is the first field after the object header, whose size is
    ``object.__basicsize__``. This is read-only; :func:`_check_pointer` proves it before anything is written.
    """
    if not isinstance(ctx, _ssl._SSLContext):
        raise TypeError(f"expected an ssl.SSLContext, got {type(ctx).__name__}")
    offset = object.__basicsize__
    if _ssl._SSLContext.__basicsize__ < offset + ctypes.sizeof(ctypes.c_void_p):
        raise RuntimeError("unexpected _ssl._SSLContext layout")
    pointer = ctypes.c_void_p.from_address(id(ctx) + offset).value
    if not pointer:
        raise RuntimeError("SSLContext holds no SSL_CTX")
    return pointer


def _check_pointer(lib: _LibSSL, pointer: int, ctx: ssl.SSLContext) -> None:
    """Prove that ``pointer`` is this context's SSL_CTX by reading state the ssl module just set through it.

    The verify mode is flipped NONE → OPTIONAL through the Python API and each value read back with
    ``SSL_CTX_get_verify_mode``; the 64-bit option mask must equal ``ctx.options``. A wrong pointer (another
    layout, another context) cannot pass the three reads.
    """
    ctx.verify_mode = ssl.CERT_NONE
    mode_none = lib.SSL_CTX_get_verify_mode(pointer)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    mode_optional = lib.SSL_CTX_get_verify_mode(pointer)
    options = lib.SSL_CTX_get_options(pointer)
    if mode_none != _SSL_VERIFY_NONE or mode_optional != _SSL_VERIFY_PEER or options != int(ctx.options):
        raise RuntimeError(
            "refusing to patch the TLS context: the SSL_CTX found by layout does not match the SSLContext "
            f"(verify modes {mode_none}/{mode_optional}, options {options:#x} vs {int(ctx.options):#x}); "
            "this Python build is not supported by crypto.tls.accept_any_client_certificate"
        )


def accept_any_client_certificate(ctx: ssl.SSLContext) -> None:
    """Make a *server* context request a client certificate and accept whatever is presented, or nothing.

    This patches a gap of Python's :mod:`ssl`: ``CERT_OPTIONAL`` requests a certificate but lets OpenSSL
    abort the handshake with a TLS alert when the certificate does not verify (expired, unknown CA …), and
    there is no verify-callback API. A mail server must instead finish the handshake and refuse in its own
    protocol (``535 5.7.8``), after validating the certificate itself
    (:class:`crypto.validation.CertificateValidator`).

    How: the context's ``SSL_CTX *`` is found by CPython's struct layout (:func:`_ssl_ctx_pointer`),
    proven by reading back values through OpenSSL (:func:`_check_pointer`; ``RuntimeError`` if the proof
    fails, before anything is written), then ``SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, cb)`` installs a
    callback returning 1 for every certificate (SSL_CTX_set_verify(3)), and
    ``SSL_CTX_set_cert_verify_callback`` one that accepts the chain without OpenSSL building and checking
    it (X509_verify_cert, whose verdict would be ignored: a seventh of a server handshake's CPU). The
    client must still prove possession of its key (CertificateVerify, checked apart from the chain), so
    the certificate that reaches the application is the client's. CPython keeps the callbacks when
    ``verify_mode`` is set later, and copies them to each connection. Do **not** use this on a client
    context: the server certificate would go unverified.

    After the call ``ctx.verify_mode`` is ``CERT_OPTIONAL``; read the peer certificate with
    :func:`peer_certificate_der`.
    """
    if ctx.check_hostname or ctx.protocol == ssl.PROTOCOL_TLS_CLIENT:
        raise ValueError("accept_any_client_certificate is for server contexts only")
    lib = _libssl()
    pointer = _ssl_ctx_pointer(ctx)
    _check_pointer(lib, pointer, ctx)
    lib.SSL_CTX_set_verify(pointer, _SSL_VERIFY_PEER, _ACCEPT_ANY_CALLBACK)
    lib.SSL_CTX_set_cert_verify_callback(pointer, _ACCEPT_CHAIN_CALLBACK, None)
    installed = lib.SSL_CTX_get_verify_callback(pointer)
    if installed != _ACCEPT_ANY_ADDRESS or ctx.verify_mode != ssl.CERT_OPTIONAL:
        raise RuntimeError("the verify callback was not installed on the TLS context")


# SSL_CTX_set1_groups_list(3) is a macro over SSL_CTX_ctrl with this command number (ssl.h).
_SSL_CTRL_SET_GROUPS_LIST: Final = 92
TLS_GROUPS: Final = "X25519:P-256:P-384"


def restrict_key_exchange_groups(ctx: ssl.SSLContext, groups: str = TLS_GROUPS) -> None:
    """Limit (EC)DHE key exchange to `groups` (REFERENCE.md §1: X25519, P-256, P-384).

    Python's :mod:`ssl` (before 3.13) can set only one ECDH curve and none for TLS 1.3, so OpenSSL's
    default list (with X448, P-521 and the FFDHE groups) would stay on offer. Same pointer proof as
    :func:`accept_any_client_certificate`, then ``SSL_CTX_set1_groups_list``.
    """
    lib = _libssl()
    pointer = _ssl_ctx_pointer(ctx)
    _check_pointer(lib, pointer, ctx)
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, ctypes.c_char_p(groups.encode("ascii"))) != 1:
        raise RuntimeError(f"OpenSSL refused the key exchange groups {groups!r}")


# -------------------- pyOpenSSL / Twisted (IMAP4 STARTTLS, listenSSL)


def _accept_any_pyopenssl(
    connection: SSL.Connection, certificate: object, error_number: int, error_depth: int, ok: int
) -> bool:
    """pyOpenSSL verify callback: every certificate is acceptable; the application decides."""
    return True


def _pyopenssl_server_context(cert_file: Path, key_file: Path) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    context.set_cipher_list(_CIPHER_STRING.encode("ascii"))
    context.set_tls13_ciphersuites(_TLS13_STRING.encode("ascii"))
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_SINGLE_ECDH_USE
    )
    context.use_certificate_chain_file(os.fspath(cert_file))
    context.use_privatekey_file(os.fspath(key_file))
    context.check_privatekey()
    context.set_verify(SSL.VERIFY_PEER, _accept_any_pyopenssl)
    # pyOpenSSL has no public groups API; its binding exposes SSL_CTX_set1_curves_list (the same call as
    # SSL_CTX_set1_groups_list in OpenSSL 3). One private attribute, here only.
    if _pyopenssl_lib.SSL_CTX_set1_curves_list(context._context, TLS_GROUPS.encode("ascii")) != 1:
        raise RuntimeError(f"OpenSSL refused the key exchange groups {TLS_GROUPS!r}")
    # OpenSSL refuses to resume sessions of a context that verifies peers without a session id context.
    context.set_session_id(b"caducee")
    return context


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class TwistedServerContextFactory:
    """Server TLS configuration for Twisted, with the project's profile.

    Usable as ``contextFactory`` of ``IMAP4Server`` (STARTTLS), with ``reactor.listenSSL`` and with
    ``TLSMemoryBIOFactory``. Requests a client certificate and accepts any; read it with
    :func:`twisted_peer_certificate_der`.
    """

    isClient = False

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self._context = _pyopenssl_server_context(cert_file, key_file)

    def getContext(self) -> SSL.Context:  # noqa: N802 - Twisted interface
        """The shared pyOpenSSL context (IOpenSSLContextFactory)."""
        return self._context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N802,N803
        """A new server-side connection (IOpenSSLServerConnectionCreator)."""
        return SSL.Connection(self._context, None)


def twisted_server_context_factory(cert_file: Path, key_file: Path) -> TwistedServerContextFactory:
    """The Twisted counterpart of :func:`server_context`."""
    return TwistedServerContextFactory(cert_file, key_file)


def twisted_peer_certificate_der(transport: object) -> bytes | None:
    """The DER certificate the TLS peer of a Twisted transport presented, or ``None`` (no TLS, no cert)."""
    if not ISSLTransport.providedBy(transport):
        return None
    handle = transport.getHandle()  # type: ignore[attr-defined]
    if isinstance(handle, SSL.Connection):
        certificate = handle.get_peer_certificate(as_cryptography=True)
        return None if certificate is None else certificate.public_bytes(serialization.Encoding.DER)
    peer = transport.getPeerCertificate()  # type: ignore[attr-defined]
    if peer is None:
        return None
    return peer.to_cryptography().public_bytes(serialization.Encoding.DER)  # type: ignore[no-any-return]
