"""Certificate login: a TLS client certificate becomes a principal of the directory and its mailboxes.

Used by SMTP submission (SASL EXTERNAL, RFC 4422 Appendix A) and by IMAP (AUTHENTICATE EXTERNAL). The
chain must reach a configured trust anchor, the certificate must be in its validity period, allow
clientAuth and not be revoked in its CA's CRL (crypto.validation); its national id (8 + RPPS for a
person, the structure id for an organisation) must name an active principal of the directory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from crypto.validation import (
    CertificateRejected,
    CertificateValidator,
    ValidatedCertificate,
)
from directory.identifiers import PrincipalKind
from directory.model import Mailbox, Principal
from directory.store import DirectoryStore, normalise_address

log = logging.getLogger(__name__)
_V = TypeVar("_V", ValidatedCertificate, "ValidatedCertificate | None")


class LoginRefused(Exception):
    """Why a certificate login failed: for the log and the audit trail, never for the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    """Who is logged in: the principal, the mailboxes it may use, and the certificate that proved it."""

    principal: Principal
    mailboxes: tuple[Mailbox, ...]
    certificate: ValidatedCertificate
    authzid: str = ""

    @property
    def addresses(self) -> frozenset[str]:
        return frozenset(m.address for m in self.mailboxes)

    def owns(self, address: str) -> bool:
        return normalise_address(address) in self.addresses

    def mailbox_for(self, authzid: str) -> Mailbox | None:
        """The mailbox a session opens: the one named by the authzid, else the first by preference."""
        if not authzid or authzid == self.principal.national_id:
            return self.mailboxes[0] if self.mailboxes else None
        wanted = normalise_address(authzid)
        return next((m for m in self.mailboxes if m.address == wanted), None)


class CertificateAuthenticator:
    """Certificate login. `authenticate` reads the directory (run it in a thread); `from_memory` answers
    on the event loop when it can.

    The directory's answer for a principal (`login_view`) is kept `ttl` seconds: software sending each
    report on a new connection logs in once per message, and a thread plus two reads per login was a
    tenth of the time of such a message. The certificate is validated at every login, its CRLs included
    (a changed CRL file sends the login through `authenticate`, which reads it): a revoked certificate is
    refused at once. A principal deactivated or a mailbox withdrawn in the directory is refused at most
    `ttl` seconds later, as `policy.RecipientCache` answers recipient checks."""

    def __init__(self, validator: CertificateValidator, directory: DirectoryStore, *, ttl: float = 5.0,
                 size: int = 10_000) -> None:
        self.validator = validator
        self.directory = directory
        self.ttl = ttl
        self.size = size
        self._views: dict[str, tuple[float, tuple[Principal, list[Mailbox]] | None]] = {}

    def authenticate(self, cert_der: bytes | None, authzid: str = "") -> Identity:
        """Validate and map a client certificate; raises `LoginRefused`. Blocking: run in a thread."""
        cert = self._validate(cert_der, self.validator.validate)
        view = self.directory.login_view(cert.national_id)
        if len(self._views) >= self.size:
            self._views.clear()  # bounded; refilled by the next logins
        self._views[cert.national_id] = (time.monotonic() + self.ttl, view)
        return self._identity(cert, view, authzid)

    def from_memory(self, cert_der: bytes | None, authzid: str = "") -> Identity | None:
        """`authenticate` without blocking, or None when it must read (a CRL file changed, or the
        principal was not looked up in the last `ttl` seconds): then call `authenticate` in a thread."""
        cert = self._validate(cert_der, self.validator.validate_unless_crls_changed)
        if cert is None:
            return None
        entry = self._views.get(cert.national_id)
        if entry is None or time.monotonic() >= entry[0]:
            return None
        return self._identity(cert, entry[1], authzid)

    @staticmethod
    def _validate(cert_der: bytes | None, validate: Callable[[bytes], _V]) -> _V:
        if not cert_der:
            raise LoginRefused("no_client_certificate")
        try:
            return validate(cert_der)
        except CertificateRejected as exc:
            raise LoginRefused(f"certificate_{exc.reason.name.lower()}") from None

    @staticmethod
    def _identity(cert: ValidatedCertificate, view: tuple[Principal, list[Mailbox]] | None,
                  authzid: str) -> Identity:
        if view is None:
            raise LoginRefused("unknown_principal")
        principal, owned = view
        expected = PrincipalKind.PERSON if cert.kind.name == "PERSON" else PrincipalKind.ORGANISATION
        if principal.kind is not expected:
            raise LoginRefused("principal_kind_mismatch")
        mailboxes = tuple(owned)
        if not mailboxes:
            raise LoginRefused("no_mailbox")
        identity = Identity(principal, mailboxes, cert, authzid)
        # RFC 4422 §A.1: an authzid the certificate may not act as is a failure.
        if authzid and identity.mailbox_for(authzid) is None:
            raise LoginRefused("authzid_not_allowed")
        return identity
