"""Discovery of other operators' encryption certificates in a remote LDAP directory (DESIGN.md §2).

To encrypt a message end to end to a mailbox of another operator, the sender needs that mailbox's
encryption certificate. `CertificateDiscovery.lookup(address)` finds it in the directory configured in
`[discovery]` (`url`, `base`, `ca`, `cache_ttl`, `timeout`): a subtree search under `base` for
`(mail=<address>)`, reading `userCertificate;binary` (DER) and `userSMIMECertificate` (PKCS#7 certs-only,
RFC 2798 §9.1.2) — what `caducee directory publish` writes, and what address books read.

**No filter injection.** The address must look like one (ASCII, no control character or space, a local
part and a DNS domain, at most 320 characters; `InvalidAddress` otherwise) and is then escaped as
RFC 4515 §3 requires (`ldap3.utils.conv.escape_filter_chars`): `*`, `(`, `)`, `\\` in a local part are
matched literally, so no address can widen the search.

**Which certificates are returned**, in this order of checks:

1. values that parse (others are skipped and logged), each certificate once;
2. valid now (notBefore ≤ now ≤ notAfter);
3. an encryption certificate: keyUsage present with keyEncipherment or dataEncipherment (RFC 5280
   §4.2.1.3; the key transport of S/MIME, RFC 8551 §2.4), and, when extendedKeyUsage is present,
   emailProtection or anyExtendedKeyUsage in it (RFC 8550 §4.4.4);
4. with a `validator` (the server and `caducee directory certificate` give one built from `[tls]
   trust_anchors` and `crls`: IGC-Santé is the trust space's only CA, REFERENCE.md §1): a chain to the
   trust anchors, emailProtection, and not revoked according to the CRL of each CA of the chain — a CA
   without a valid CRL means refused (fail closed, the rule of `crypto.validation` for logins).

Not checked: that the certificate names the address (a person's encryption certificate serves each of
their mailboxes; `directory.ldap_view` publishes it on all of them).

**Cache.** The directory's answer for an address (the parsed certificates, possibly none) is kept for
`cache_ttl` seconds, at most `max_entries` addresses (least recently used dropped first); checks 2 to 4
run at every lookup, so a certificate that expires or is revoked stops being returned at once. Failures
are not cached. Thread-safe: cache hits never wait for the network; LDAP searches share one connection,
one at a time.

**Errors.** `DiscoveryError` and its subclasses, with a message that says which server and why; every
network wait is bounded by `timeout` (TCP connect, TLS handshake, each answer), so a lookup never hangs.
Transport security follows `directory.ldap_client`: `ldaps://` verified against `ca`; `ldap://` to a
loopback address in clear, to any other host with StartTLS (verified the same way), always.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID

from crypto.validation import CertificateRejected, CertificateValidator
from directory.ldap_client import (
    LdapConnectionError,
    LdapEndpoint,
    LdapError,
    close,
    connect,
    is_loopback,
    ldap3,
    ldap3_exceptions,
    parse_url,
)

log = logging.getLogger(__name__)

__all__ = [
    "CertificateDiscovery",
    "DiscoveryError",
    "DiscoveryNotConfigured",
    "DiscoveryUnavailable",
    "InvalidAddress",
    "discovery_endpoint",
    "is_encryption_certificate",
    "local_encryption_certificates",
    "usable_encryption_certificates",
]

CERTIFICATE_ATTRIBUTES = ("userCertificate;binary", "userSMIMECertificate")
MAX_ADDRESS = 320
MAX_ENTRIES_PER_ADDRESS = 16  # one address is one mailbox entry; a few more are tolerated, never a dump
SUCCESS = 0
NO_SUCH_OBJECT = 32
SIZE_LIMIT_EXCEEDED = 4
_DER = Encoding.DER
_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(?:\.(?!-)[a-z0-9-]{1,63}(?<!-))+$")


class DiscoveryError(Exception):
    """A lookup could not be answered; the message is safe to print."""


class DiscoveryNotConfigured(DiscoveryError):
    """No remote directory is configured (`[discovery] url`)."""


class DiscoveryUnavailable(DiscoveryError):
    """The remote directory cannot be reached, refused TLS, timed out or failed the search."""


class InvalidAddress(DiscoveryError, ValueError):
    """Not a mailbox address: nothing is searched."""


class DiscoverySettings(Protocol):
    """What `caducee.config.DiscoveryConfig` carries ([discovery] section)."""

    url: str
    base: str
    ca: str
    cache_ttl: int
    timeout: int


def normalise_address(address: str) -> str:
    """The address in lower case, or `InvalidAddress` (see the module's rule)."""
    if not isinstance(address, str) or not address:
        raise InvalidAddress("empty address")
    if len(address) > MAX_ADDRESS:
        raise InvalidAddress(f"address longer than {MAX_ADDRESS} characters")
    if not address.isascii() or any(ch <= " " or ch == "\x7f" for ch in address):
        raise InvalidAddress("an address is printable ASCII without spaces")
    local, at, domain = address.rpartition("@")
    if not at or not local or len(local) > 64:
        raise InvalidAddress("expected local-part@domain")
    if not _DOMAIN_RE.match(domain.lower()):
        raise InvalidAddress("the domain is not a DNS name")
    return address.lower()


def is_encryption_certificate(cert: x509.Certificate) -> bool:
    """keyUsage allows key or data encipherment, and extendedKeyUsage (if any) allows e-mail protection."""
    try:
        key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return False
    except ValueError:  # a malformed extension
        return False
    if not (key_usage.key_encipherment or key_usage.data_encipherment):
        return False
    try:
        ekus = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    except ValueError:
        return False
    return ExtendedKeyUsageOID.EMAIL_PROTECTION in ekus or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in ekus


def usable_encryption_certificates(certificates: list[x509.Certificate], *,
                                   validator: CertificateValidator | None = None,
                                   now: dt.datetime | None = None) -> list[x509.Certificate]:
    """Checks 2 to 4 of the module's rule (validity now, encryption key usage, chain and revocation)."""
    moment = now or dt.datetime.now(dt.UTC)
    usable = []
    for cert in certificates:
        serial = format(cert.serial_number, "X")
        if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
            log.info("discovery skips certificate serial=%s reason=not_valid_now", serial)
            continue
        if not is_encryption_certificate(cert):
            log.info("discovery skips certificate serial=%s reason=not_for_encryption", serial)
            continue
        if validator is not None:
            try:
                validator.validate(cert.public_bytes(_DER), usage=ExtendedKeyUsageOID.EMAIL_PROTECTION, now=moment)
            except CertificateRejected as exc:
                log.info("discovery skips certificate serial=%s reason=%s", serial, exc.reason.value)
                continue
        usable.append(cert)
    return usable


def parse_certificate_values(values: dict[str, list[bytes]]) -> list[x509.Certificate]:
    """Certificates of `userCertificate;binary` and `userSMIMECertificate` values, each once."""
    found: dict[bytes, x509.Certificate] = {}
    for name, raw in values.items():
        key = name.lower()
        for value in raw:
            try:
                if key.startswith("usercertificate"):
                    certs = [x509.load_der_x509_certificate(bytes(value))]
                elif key.startswith("usersmimecertificate"):
                    certs = pkcs7.load_der_pkcs7_certificates(bytes(value))
                else:
                    continue
            except ValueError:
                log.info("discovery skips an unreadable %s value", name)
                continue
            for cert in certs:
                found.setdefault(hashlib.sha256(cert.public_bytes(_DER)).digest(), cert)
    return list(found.values())


def local_encryption_certificates(engine: Any, address: str, *, validator: CertificateValidator | None = None
                                  ) -> list[x509.Certificate]:
    """The usable encryption certificates of an active mailbox of the local directory: those bound to it and
    its holder's unbound ones (usage enc, or org for an organisation), valid in the table and by the checks
    of the module's rule; none when there is no such mailbox."""
    import sqlalchemy as sa

    from directory.schema import certificates, mailboxes

    key = normalise_address(address)
    with engine.connect() as conn:
        box = conn.execute(sa.select(mailboxes.c.id, mailboxes.c.owner_id).where(
            mailboxes.c.address == key, mailboxes.c.active.is_(True))).first()
        if box is None:
            return []
        rows = conn.execute(sa.select(certificates.c.der).where(
            certificates.c.usage.in_(("enc", "org")), certificates.c.status == "valid",
            certificates.c.not_after > dt.datetime.now(dt.UTC),
            sa.or_(certificates.c.mailbox_id == box.id,
                   sa.and_(certificates.c.mailbox_id.is_(None), certificates.c.principal_id == box.owner_id)),
        ).order_by(certificates.c.not_after.desc(), certificates.c.id)).all()
    parsed = []
    for row in rows:
        try:
            parsed.append(x509.load_der_x509_certificate(bytes(row.der)))
        except ValueError:
            log.warning("certificate table holds an unreadable certificate for a mailbox")
    return usable_encryption_certificates(parsed, validator=validator)


@dataclass
class _Cached:
    certificates: list[x509.Certificate]
    expires: float


class CertificateDiscovery:
    """Finds encryption certificates of remote mailboxes; one per process, shared by threads."""

    def __init__(self, config: DiscoverySettings, *, ca_file: Path | None = None,
                 validator: CertificateValidator | None = None, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not config.url:
            raise DiscoveryNotConfigured("no remote directory is configured ([discovery] url)")
        if not config.base:
            raise DiscoveryNotConfigured("no search base is configured ([discovery] base)")
        try:
            self.endpoint: LdapEndpoint = discovery_endpoint(config.url)
        except LdapError as exc:
            raise DiscoveryNotConfigured(f"[discovery] url: {exc}") from None
        if self.endpoint.tls and ca_file is None:
            raise DiscoveryNotConfigured(f"{self.endpoint}: a CA bundle is needed ([discovery] ca or [tls] "
                                         "trust_anchors)")
        self.base = config.base
        self.ca_file = ca_file
        self.validator = validator
        self.ttl = float(config.cache_ttl)
        self.timeout = int(config.timeout)
        self.max_entries = max(1, max_entries)
        self._clock = clock
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._ldap_lock = threading.Lock()
        self._conn: Any = None
        self.searches = 0  # LDAP searches sent (tests and metrics)
        self.hits = 0

    # ---- public

    def lookup(self, address: str) -> list[x509.Certificate]:
        """The usable encryption certificates of `address` (possibly none); `DiscoveryError` on failure."""
        key = normalise_address(address)
        now = self._clock()
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None and cached.expires > now:
                self._cache.move_to_end(key)
                self.hits += 1
                found = list(cached.certificates)
            else:
                found = None
        if found is None:
            found = self._search(key)
            with self._cache_lock:
                self._cache[key] = _Cached(found, self._clock() + self.ttl)
                self._cache.move_to_end(key)
                while len(self._cache) > self.max_entries:
                    self._cache.popitem(last=False)
        return usable_encryption_certificates(found, validator=self.validator)

    def forget(self, address: str | None = None) -> None:
        """Drop one address, or everything, from the cache."""
        with self._cache_lock:
            if address is None:
                self._cache.clear()
            else:
                self._cache.pop(normalise_address(address), None)

    def close(self) -> None:
        with self._ldap_lock:
            self._drop()

    # ---- LDAP

    def _search(self, address: str) -> list[x509.Certificate]:
        from ldap3.utils.conv import escape_filter_chars

        search_filter = f"(mail={escape_filter_chars(address)})"  # RFC 4515 §3
        with self._ldap_lock:
            for attempt in (1, 2):
                reused = self._conn is not None
                conn = self._connection()
                self.searches += 1
                try:
                    ok = conn.search(self.base, search_filter, ldap3.SUBTREE, attributes=list(CERTIFICATE_ATTRIBUTES),
                                     size_limit=MAX_ENTRIES_PER_ADDRESS, time_limit=self.timeout)
                except ldap3_exceptions.LDAPException as exc:
                    self._drop()
                    reason = (str(exc).strip() or type(exc).__name__).splitlines()[0][:200]
                    # A reused connection the server closed while idle: try once more on a fresh one.
                    if attempt == 1 and reused and "timed out" not in reason.lower():
                        continue
                    raise DiscoveryUnavailable(f"{self.endpoint}: search failed ({reason})") from None
                result = conn.result or {}
                code = result.get("result")
                if not ok and code not in (SUCCESS, SIZE_LIMIT_EXCEEDED):  # False also means "no entry"
                    if code == NO_SUCH_OBJECT:
                        raise DiscoveryUnavailable(f"{self.endpoint}: the base {self.base!r} does not exist there")
                    raise DiscoveryUnavailable(f"{self.endpoint}: search refused: {result.get('description')} "
                                               f"({code})")
                certificates: list[x509.Certificate] = []
                for entry in conn.response or []:
                    if entry.get("type") == "searchResEntry":
                        certificates += parse_certificate_values(dict(entry.get("raw_attributes") or {}))
                unique = {hashlib.sha256(c.public_bytes(_DER)).digest(): c for c in certificates}
                return list(unique.values())
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self) -> Any:
        if self._conn is None:
            try:
                self._conn = connect(self.endpoint, ca_file=self.ca_file, timeout=self.timeout, check_names=False,
                                     read_only=True)
            except LdapConnectionError as exc:
                raise DiscoveryUnavailable(str(exc)) from None
            except LdapError as exc:
                raise DiscoveryUnavailable(str(exc)) from None
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            close(self._conn)
            self._conn = None


def discovery_endpoint(url: str) -> LdapEndpoint:
    """ldaps:// as given; ldap:// in clear to a loopback host, with StartTLS to any other (see the module)."""
    if url.strip().lower().startswith("ldap:"):
        endpoint = parse_url(url, starttls=True)
        if is_loopback(endpoint.host):
            return LdapEndpoint(endpoint.scheme, endpoint.host, endpoint.port, starttls=False)
        return endpoint
    return parse_url(url)
