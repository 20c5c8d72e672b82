"""Certificate login: a TLS client certificate becomes a principal of the directory and its mailboxes.

Used by SMTP submission (SASL EXTERNAL, RFC 4422 Appendix A) and by IMAP (AUTHENTICATE EXTERNAL). The
chain must reach a configured trust anchor, the certificate must be in its validity period, allow
clientAuth and not be revoked in its CA's CRL (crypto.validation); its national id (8 + RPPS for a
person, the structure id for an organisation) must name an active principal of the directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from crypto.validation import CertificateRejected, CertificateValidator, ValidatedCertificate
from directory.identifiers import PrincipalKind
from directory.model import Mailbox, Principal
from directory.store import DirectoryStore, normalise_address

log = logging.getLogger(__name__)


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
    def __init__(self, validator: CertificateValidator, directory: DirectoryStore) -> None:
        self.validator = validator
        self.directory = directory

    def authenticate(self, cert_der: bytes | None, authzid: str = "") -> Identity:
        """Validate and map a client certificate; raises `LoginRefused`. Blocking: run in a thread."""
        if not cert_der:
            raise LoginRefused("no_client_certificate")
        try:
            cert = self.validator.validate(cert_der)
        except CertificateRejected as exc:
            raise LoginRefused(f"certificate_{exc.reason.name.lower()}") from None
        found = self.directory.login_view(cert.national_id)
        if found is None:
            raise LoginRefused("unknown_principal")
        principal, owned = found
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
