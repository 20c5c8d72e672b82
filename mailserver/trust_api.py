"""What the SMTP servers and the relay need of the trust-space whitelist (mailserver.trust implements it)."""

from __future__ import annotations

from typing import Any, Protocol

from cryptography import x509


class TrustLookup(Protocol):
    def lookup(self, domain: str) -> Any | None:
        """The whitelist entry of an operator domain (with `operator_dn`), or None."""

    def is_trusted(self, domain: str, subject: x509.Name) -> bool:
        """True when `subject` is the operator certificate's DN whitelisted for `domain`."""

    def is_operator(self, subject: x509.Name) -> bool:
        """True when `subject` is the DN of any operator of the trust space."""
