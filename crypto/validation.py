"""Client certificate validation: chain, validity, key usage and revocation (RFC 5280).

The TLS layer accepts any client certificate (see :mod:`crypto.tls`); this module gives the verdict, so
that the protocol can answer ``535 5.7.8`` (RFC 4954) or ``NO [AUTHENTICATIONFAILED]`` (RFC 5530) itself:

1. the certificate parses (``MALFORMED`` otherwise);
2. now lies in its validity period (``EXPIRED``) — checked first so that an expired certificate is not
   reported as untrusted;
3. its extended key usage allows the requested purpose, clientAuth by default, and for clientAuth its key
   usage allows ``digitalSignature`` (RFC 5280 §4.2.1.3, §4.2.1.12) (``WRONG_USAGE``);
4. a chain reaches a trust anchor (``UNTRUSTED``), built by ``cryptography.x509.verification`` with the
   configured intermediates as untrusted candidates;
5. the subject names its holder: exactly one ``serialNumber`` (person) or else exactly one ``OU``
   (organisation) (``MALFORMED`` otherwise);
6. no certificate of that chain below the anchor is revoked (``REVOKED``) according to the CRL of its
   issuing CA (RFC 5280 §5, §6.3); without a valid complete CRL for a CA the answer is ``CRL_UNAVAILABLE``
   (fail closed). CRL files are re-read when they change; an unreadable or badly signed new version is
   ignored and the last valid one kept; a CRL past its nextUpdate is still used and logged as stale
   (IGC-Santé's rule for clients: keep the last valid CRL).

A person certificate carries the national id (``8`` + RPPS) in the subject ``serialNumber``; an
organisation certificate the structure id in the subject ``OU``.

Steps 1 to 5 depend only on the certificate, the trust store and the time; their outcome is cached per
certificate (bounded LRU) together with the chain's validity window, so a returning client costs a hash,
a dictionary lookup and the revocation check, which is never cached.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    ClientVerifier,
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

log = logging.getLogger(__name__)

__all__ = [
    "CertificateKind",
    "CertificateRejected",
    "CertificateValidator",
    "RejectReason",
    "ValidatedCertificate",
]

_PEM_CRL_RE: Final = re.compile(rb"-----BEGIN X509 CRL-----\s.*?-----END X509 CRL-----", re.DOTALL)
_ENCOUNTERED_RE: Final = re.compile(r"\s*\(encountered processing .*$", re.DOTALL)
_UNPRINTABLE_RE: Final = re.compile(r"[^\x20-\x7e]")
_MAX_DETAIL: Final = 200


class RejectReason(enum.Enum):
    """Why a certificate was refused."""

    MALFORMED = "malformed"
    """Not a parseable X.509 certificate, or no identity attribute to map."""
    UNTRUSTED = "untrusted"
    """No chain from the certificate to a configured trust anchor."""
    EXPIRED = "expired"
    """Outside its validity period (expired or not yet valid), or a CA of its chain is."""
    WRONG_USAGE = "wrong_usage"
    """Its (extended) key usage does not allow the requested purpose."""
    REVOKED = "revoked"
    """Listed in the CRL of the CA that issued it (or one of its CAs is listed in its issuer's CRL)."""
    CRL_UNAVAILABLE = "crl_unavailable"
    """No valid CRL is known for a CA of its chain: revocation status unknown, refused (fail closed)."""


class CertificateRejected(Exception):
    """A certificate failed validation. ``detail`` is safe to log: ASCII, no certificate-controlled text."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class CertificateKind(enum.Enum):
    """Who a certificate names."""

    PERSON = "person"
    """A natural person: the subject has a ``serialNumber`` (the national id, ``8`` + RPPS)."""
    ORGANISATION = "organisation"
    """A structure, its software or its server: identified by the subject ``OU`` (the structure id)."""


@dataclass(frozen=True)
class ValidatedCertificate:
    """A client certificate that passed validation, reduced to what the application needs."""

    kind: CertificateKind
    national_id: str
    """Subject ``serialNumber`` for a person, subject ``OU`` for an organisation."""
    subject_dn: str
    """The subject as an RFC 4514 string (most specific RDN first, e.g. ``CN=…,OU=…,O=…,C=FR``)."""
    issuer_dn: str
    serial: int
    not_after: dt.datetime
    fingerprint_sha256: str
    """Lower-case hexadecimal SHA-256 of the DER certificate."""
    emails: tuple[str, ...]
    """rfc822Name entries of the subjectAltName."""


@dataclass(frozen=True)
class _TrustedCrl:
    """A CRL whose signature was verified with the key of the CA it belongs to."""

    ca_key: tuple[bytes, bytes]
    number: int | None
    this_update: dt.datetime
    next_update: dt.datetime | None
    revoked: Mapping[int, x509.ReasonFlags | None]
    source: Path

    def newer_than(self, other: _TrustedCrl) -> bool:
        mine = -1 if self.number is None else self.number
        theirs = -1 if other.number is None else other.number
        return (mine, self.this_update) > (theirs, other.this_update)


@dataclass(frozen=True)
class _VerifiedChain:
    """A chain that verified (cached per DER and usage); only revocation is checked on every call."""

    certificate: ValidatedCertificate
    not_before: dt.datetime
    """Latest notBefore of the chain: before it, some certificate of the chain is not yet valid."""
    not_after: dt.datetime
    """Earliest notAfter of the chain."""
    links: tuple[tuple[int, tuple[bytes, bytes]], ...]
    """(serial, issuing CA) for every certificate below the anchor, leaf first."""


class _CrlError(Exception):
    pass


@dataclass
class _CrlFile:
    path: Path
    stamp: tuple[int, int, int, int] | None = None
    crls: tuple[_TrustedCrl, ...] = ()
    loaded_once: bool = False


def _as_utc(moment: dt.datetime) -> dt.datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC)


def _log_safe(text: str) -> str:
    """Strip certificate-controlled context and non-printable characters from a library message."""
    text = _ENCOUNTERED_RE.sub("", text)
    text = _UNPRINTABLE_RE.sub("?", text)
    return text[:_MAX_DETAIL]


_EKU_LABELS: Final[Mapping[x509.ObjectIdentifier, str]] = {
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
}


def _oid_label(oid: x509.ObjectIdentifier) -> str:
    return _EKU_LABELS.get(oid, oid.dotted_string)


def _key_identifier(cert: x509.Certificate) -> bytes:
    """The subjectKeyIdentifier, or its RFC 5280 §4.2.1.2 method (1) value computed from the key."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


def _ca_key(cert: x509.Certificate) -> tuple[bytes, bytes]:
    return cert.subject.public_bytes(), _key_identifier(cert)


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _may_sign_crls(cert: x509.Certificate) -> bool:
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True  # RFC 5280 §4.2.1.3: no keyUsage extension, no restriction
    return usage.crl_sign


class CertificateValidator:
    """Validates client certificates against trust anchors and CRLs. Thread-safe; build one and reuse it.

    ``anchors`` are the trusted roots; ``intermediates`` are CA certificates offered as untrusted chain
    candidates (clients usually send only their leaf); ``crl_files`` are PEM (one or more CRLs) or DER
    files, each signed by one of those CAs. Every CA below an anchor in a chain needs a CRL.
    ``cache_size`` bounds the number of verified chains remembered (0 disables the cache).
    """

    def __init__(
        self,
        anchors: Sequence[x509.Certificate],
        intermediates: Sequence[x509.Certificate],
        crl_files: Sequence[Path],
        *,
        cache_size: int = 4096,
    ) -> None:
        if not anchors:
            raise ValueError("at least one trust anchor is required")
        self._anchors = tuple(anchors)
        self._intermediates = list(intermediates)
        self._store = Store(list(self._anchors))
        self._ca_certificates = (*self._anchors, *self._intermediates)
        self._ca_keys = {id(ca): (ca, _ca_key(ca)) for ca in self._ca_certificates}
        self._chains: OrderedDict[tuple[bytes, str], _VerifiedChain] = OrderedDict()
        self._cache_size = max(0, cache_size)
        self._crl_files = [_CrlFile(Path(path)) for path in crl_files]
        self._index: Mapping[tuple[bytes, bytes], _TrustedCrl] = MappingProxyType({})
        self._stale_logged: set[tuple[tuple[bytes, bytes], int | None, dt.datetime]] = set()
        self._lock = threading.Lock()
        self._refresh_crls()

    @classmethod
    def from_files(
        cls, ca_bundle: Path, crl_files: Sequence[Path], *, cache_size: int = 4096
    ) -> CertificateValidator:
        """Build from a PEM bundle: self-signed certificates become anchors, the others intermediates."""
        certificates = x509.load_pem_x509_certificates(Path(ca_bundle).read_bytes())
        anchors = [cert for cert in certificates if _is_self_signed(cert)]
        intermediates = [cert for cert in certificates if not _is_self_signed(cert)]
        if not anchors:
            raise ValueError(f"{ca_bundle}: no self-signed certificate to use as a trust anchor")
        return cls(anchors, intermediates, crl_files, cache_size=cache_size)

    @property
    def anchors(self) -> tuple[x509.Certificate, ...]:
        return self._anchors

    # -------------------- validation

    def validate(
        self,
        leaf_der: bytes,
        *,
        usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
        now: dt.datetime | None = None,
    ) -> ValidatedCertificate:
        """Validate a DER certificate for ``usage`` at ``now`` (default: the current time).

        Raises :class:`CertificateRejected`. Blocking but short: at most one chain build (a few hundred
        microseconds), no I/O beyond a ``stat`` of each CRL file (and a re-read of those that changed).
        """
        return self._validate(leaf_der, usage, now, self._refresh_crls)

    def validate_unless_crls_changed(
        self,
        leaf_der: bytes,
        *,
        usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
        now: dt.datetime | None = None,
    ) -> ValidatedCertificate | None:
        """`validate` without reading a file, for an event loop: None when a CRL file changed since it
        was read (`crls_changed`), and `validate` must then run, in a thread. Raises like `validate`."""
        if self.crls_changed():
            return None
        return self._validate(leaf_der, usage, now, lambda: self._index)

    def _validate(
        self,
        leaf_der: bytes,
        usage: x509.ObjectIdentifier,
        now: dt.datetime | None,
        crl_index: Callable[[], Mapping[tuple[bytes, bytes], _TrustedCrl]],
    ) -> ValidatedCertificate:
        moment = _as_utc(now) if now is not None else dt.datetime.now(dt.UTC)
        data = bytes(leaf_der) if isinstance(leaf_der, (bytes, bytearray, memoryview)) else b""
        digest = hashlib.sha256(data).digest()
        cache_key = (digest, usage.dotted_string)
        with self._lock:
            known = self._chains.get(cache_key)
            if known is not None:
                self._chains.move_to_end(cache_key)
        if known is None or not known.not_before <= moment <= known.not_after:
            known = self._build(data, digest, usage, moment)
            with self._lock:
                self._chains[cache_key] = known
                while len(self._chains) > self._cache_size:
                    self._chains.popitem(last=False)
        index = crl_index()
        for depth, (serial, ca_key) in enumerate(known.links):
            self._check_revocation(serial, ca_key, index, moment, depth)
        return known.certificate

    def _build(
        self, data: bytes, digest: bytes, usage: x509.ObjectIdentifier, moment: dt.datetime
    ) -> _VerifiedChain:
        """Everything but revocation: parse, validity, usage, chain, identity (raises CertificateRejected)."""
        leaf = self._parse(data)
        serial_text = format(leaf.serial_number, "X")
        if moment < leaf.not_valid_before_utc:
            raise CertificateRejected(RejectReason.EXPIRED, f"certificate {serial_text} is not yet valid")
        if moment > leaf.not_valid_after_utc:
            raise CertificateRejected(RejectReason.EXPIRED, f"certificate {serial_text} expired")
        self._check_usage(leaf, usage, serial_text)
        try:
            chain = self._verifier(usage, moment).verify(leaf, self._intermediates).chain
        except VerificationError as exc:
            raise self._classify(exc, serial_text) from None
        kind, national_id = self._identity(leaf, serial_text)
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            emails = tuple(san.get_values_for_type(x509.RFC822Name))
        except x509.ExtensionNotFound:
            emails = ()
        certificate = ValidatedCertificate(
            kind=kind,
            national_id=national_id,
            subject_dn=leaf.subject.rfc4514_string(),
            issuer_dn=leaf.issuer.rfc4514_string(),
            serial=leaf.serial_number,
            not_after=leaf.not_valid_after_utc,
            fingerprint_sha256=digest.hex(),
            emails=emails,
        )
        return _VerifiedChain(
            certificate=certificate,
            not_before=max(cert.not_valid_before_utc for cert in chain),
            not_after=min(cert.not_valid_after_utc for cert in chain),
            links=tuple(
                (chain[position].serial_number, self._ca_key_of(chain[position + 1]))
                for position in range(len(chain) - 1)
            ),
        )

    def _ca_key_of(self, ca: x509.Certificate) -> tuple[bytes, bytes]:
        # The verifier returns the very objects given to it (store, intermediates): look them up by identity.
        known = self._ca_keys.get(id(ca))
        if known is not None and known[0] is ca:
            return known[1]
        return _ca_key(ca)

    @staticmethod
    def _parse(leaf_der: bytes) -> x509.Certificate:
        if not isinstance(leaf_der, (bytes, bytearray, memoryview)) or not leaf_der:
            raise CertificateRejected(RejectReason.MALFORMED, "no DER certificate")
        try:
            leaf = x509.load_der_x509_certificate(bytes(leaf_der))
            # Extensions are parsed lazily; force it so that a malformed extension is MALFORMED here.
            _ = leaf.extensions
            _ = leaf.subject
        except ValueError as exc:
            raise CertificateRejected(
                RejectReason.MALFORMED, f"unparseable certificate: {_log_safe(str(exc))}"
            ) from None
        return leaf

    @staticmethod
    def _check_usage(leaf: x509.Certificate, usage: x509.ObjectIdentifier, serial_text: str) -> None:
        try:
            ekus = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise CertificateRejected(
                RejectReason.WRONG_USAGE, f"certificate {serial_text} has no extendedKeyUsage"
            ) from None
        if usage not in ekus:
            raise CertificateRejected(
                RejectReason.WRONG_USAGE, f"certificate {serial_text} does not allow {_oid_label(usage)}"
            )
        if usage == ExtendedKeyUsageOID.CLIENT_AUTH:
            try:
                key_usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
            except x509.ExtensionNotFound:
                return
            if not key_usage.digital_signature:
                raise CertificateRejected(
                    RejectReason.WRONG_USAGE, f"certificate {serial_text} keyUsage lacks digitalSignature"
                )

    def _verifier(self, usage: x509.ObjectIdentifier, moment: dt.datetime) -> ClientVerifier:
        """A chain verifier at ``moment``; building one is a few microseconds, the store is shared."""
        builder = PolicyBuilder().store(self._store).time(moment)
        if usage != ExtendedKeyUsageOID.CLIENT_AUTH:
            # ClientVerifier insists on clientAuth; for another purpose require that EKU instead.
            def require_usage(_policy: Policy, _cert: x509.Certificate, value: x509.ExtendedKeyUsage) -> None:
                if usage not in value:
                    raise ValueError("required EKU not found")

            builder = builder.extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=ExtensionPolicy.webpki_defaults_ee().require_present(
                    x509.ExtendedKeyUsage, Criticality.AGNOSTIC, require_usage
                ),
            )
        return builder.build_client_verifier()

    @staticmethod
    def _classify(exc: VerificationError, serial_text: str) -> CertificateRejected:
        message = _log_safe(str(exc))
        if "not valid at validation time" in message:
            return CertificateRejected(
                RejectReason.EXPIRED, f"certificate {serial_text}: a CA of its chain is {message}"
            )
        if "EKU" in message:
            return CertificateRejected(RejectReason.WRONG_USAGE, f"certificate {serial_text}: {message}")
        return CertificateRejected(RejectReason.UNTRUSTED, f"certificate {serial_text}: {message}")

    def _check_revocation(
        self,
        serial: int,
        ca_key: tuple[bytes, bytes],
        index: Mapping[tuple[bytes, bytes], _TrustedCrl],
        moment: dt.datetime,
        depth: int,
    ) -> None:
        serial_text = format(serial, "X")
        crl = index.get(ca_key)
        if crl is None:
            raise CertificateRejected(
                RejectReason.CRL_UNAVAILABLE,
                f"no valid CRL for the CA of certificate {serial_text} (chain depth {depth})",
            )
        if crl.next_update is not None and crl.next_update < moment:
            marker = (crl.ca_key, crl.number, crl.this_update)
            if marker not in self._stale_logged:
                self._stale_logged.add(marker)
                log.warning(
                    "CRL %s (number %s) is stale: nextUpdate %s has passed; still using it",
                    crl.source,
                    crl.number,
                    crl.next_update.isoformat(),
                )
        if serial in crl.revoked:
            reason = crl.revoked[serial]
            what = "certificate" if depth == 0 else "CA certificate"
            raise CertificateRejected(
                RejectReason.REVOKED,
                f"{what} {serial_text} revoked ({reason.value if reason else 'unspecified'})"
                f" per CRL {crl.number}",
            )

    @staticmethod
    def _identity(leaf: x509.Certificate, serial_text: str) -> tuple[CertificateKind, str]:
        serial_numbers = leaf.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
        if serial_numbers:
            kind, attributes = CertificateKind.PERSON, serial_numbers
        else:
            kind, attributes = (
                CertificateKind.ORGANISATION,
                leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME),
            )
        values = {str(attribute.value).strip() for attribute in attributes}
        if len(values) != 1 or not next(iter(values)):
            raise CertificateRejected(
                RejectReason.MALFORMED,
                f"certificate {serial_text}: subject has no single serialNumber or OU identifying its holder",
            )
        return kind, values.pop()

    # -------------------- CRLs

    def crls_changed(self) -> bool:
        """Whether `validate` would read a CRL file again (one changed, appeared or went since it was read):
        a `stat` of each."""
        for crl_file in self._crl_files:
            try:
                info = os.stat(crl_file.path)
            except OSError:
                if crl_file.stamp is not None or not crl_file.loaded_once:
                    return True
                continue
            if (info.st_ino, info.st_dev, info.st_size, info.st_mtime_ns) != crl_file.stamp:
                return True
        return False

    def _refresh_crls(self) -> Mapping[tuple[bytes, bytes], _TrustedCrl]:
        """Reload changed CRL files and return the index CA → best valid CRL."""
        with self._lock:
            changed = False
            for crl_file in self._crl_files:
                changed |= self._refresh_file(crl_file)
            if changed:
                best: dict[tuple[bytes, bytes], _TrustedCrl] = {}
                for crl_file in self._crl_files:
                    for crl in crl_file.crls:
                        current = best.get(crl.ca_key)
                        if current is None or crl.newer_than(current):
                            best[crl.ca_key] = crl
                self._index = MappingProxyType(best)
            return self._index

    def _refresh_file(self, crl_file: _CrlFile) -> bool:
        try:
            info = os.stat(crl_file.path)
        except OSError as exc:
            if crl_file.stamp is not None or not crl_file.loaded_once:
                crl_file.stamp = None
                crl_file.loaded_once = True
                log.warning(
                    "CRL file %s unreadable (%s)%s",
                    crl_file.path,
                    exc.strerror,
                    "; keeping the last valid CRL" if crl_file.crls else "",
                )
            return False
        # A replaced file (atomic rename) has a new inode even when its mtime did not tick.
        stamp = (info.st_ino, info.st_dev, info.st_size, info.st_mtime_ns)
        if stamp == crl_file.stamp:
            return False
        crl_file.stamp = stamp
        crl_file.loaded_once = True
        try:
            crls = self._load_crl_file(crl_file.path)
            previous = {crl.ca_key: crl for crl in crl_file.crls}
            for crl in crls:
                old = previous.get(crl.ca_key)
                if (
                    old is not None
                    and old.number is not None
                    and crl.number is not None
                    and crl.number < old.number
                ):
                    raise _CrlError(f"CRL number went backwards ({crl.number} < {old.number})")
        except (OSError, _CrlError) as exc:
            log.warning(
                "CRL file %s rejected: %s%s",
                crl_file.path,
                exc,
                "; keeping the last valid CRL" if crl_file.crls else "",
            )
            return False
        crl_file.crls = crls
        log.info("loaded %d CRL(s) from %s", len(crls), crl_file.path)
        return True

    def _load_crl_file(self, path: Path) -> tuple[_TrustedCrl, ...]:
        data = path.read_bytes()
        try:
            if b"-----BEGIN" in data:
                blocks = _PEM_CRL_RE.findall(data)
                if not blocks:
                    raise _CrlError("no PEM X509 CRL block")
                crls = [x509.load_pem_x509_crl(block) for block in blocks]
            else:
                crls = [x509.load_der_x509_crl(data)]
        except ValueError as exc:
            raise _CrlError(f"unparseable CRL: {_log_safe(str(exc))}") from None
        return tuple(self._trust_crl(crl, path) for crl in crls)

    def _trust_crl(self, crl: x509.CertificateRevocationList, source: Path) -> _TrustedCrl:
        """Check a CRL's scope and signature (RFC 5280 §6.3.3) and find the CA that issued it."""
        try:
            extensions = crl.extensions
            revoked_entries = list(crl)
        except ValueError as exc:
            raise _CrlError(f"malformed CRL: {_log_safe(str(exc))}") from None
        for extension in extensions:
            if isinstance(extension.value, x509.DeltaCRLIndicator):
                raise _CrlError("delta CRLs are not supported; a complete CRL is required")
            if isinstance(extension.value, x509.IssuingDistributionPoint):
                idp = extension.value
                if (
                    idp.only_contains_user_certs
                    or idp.only_contains_ca_certs
                    or idp.only_contains_attribute_certs
                    or idp.only_some_reasons
                    or idp.indirect_crl
                ):
                    raise _CrlError("partitioned or indirect CRLs are not supported")
            elif extension.critical and not isinstance(
                extension.value, (x509.CRLNumber, x509.AuthorityKeyIdentifier)
            ):
                raise _CrlError(f"unsupported critical CRL extension {extension.oid.dotted_string}")
        key_id: bytes | None = None
        for extension in extensions:
            if isinstance(extension.value, x509.AuthorityKeyIdentifier):
                key_id = extension.value.key_identifier
        for ca in self._ca_certificates:
            if ca.subject != crl.issuer:
                continue
            ca_key = _ca_key(ca)
            if key_id is not None and ca_key[1] != key_id:
                continue
            if not _may_sign_crls(ca):
                continue
            try:
                signature_valid = crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
            except (TypeError, ValueError):
                signature_valid = False
            if not signature_valid:
                continue
            number: int | None = None
            for extension in extensions:
                if isinstance(extension.value, x509.CRLNumber):
                    number = extension.value.crl_number
            return _TrustedCrl(
                ca_key=ca_key,
                number=number,
                this_update=crl.last_update_utc,
                next_update=crl.next_update_utc,
                revoked=MappingProxyType(
                    {entry.serial_number: _revocation_reason(entry) for entry in revoked_entries}
                ),
                source=source,
            )
        raise _CrlError("not signed by any configured CA")


def _revocation_reason(entry: x509.RevokedCertificate) -> x509.ReasonFlags | None:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except (x509.ExtensionNotFound, ValueError):
        return None
