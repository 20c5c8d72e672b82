"""SMTP replies: one type carrying the code, the enhanced status (RFC 3463) and a generic public text.

The public text never carries exception text, certificate details or patient data; details go to the
log, under an opaque reference the client can quote.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


# RFC 3207 §4: commands other than NOOP, EHLO, STARTTLS and QUIT before TLS.
MUST_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")
AUTH_SYNTAX = Reply(501, "5.5.2", "Cannot decode response")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
SENDER_NOT_OWNED = Reply(550, "5.7.1", "Sender address is not a mailbox of the authenticated user")
NULL_SENDER_REFUSED = Reply(550, "5.7.1", "Null sender not allowed on submission")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
UNKNOWN_RECIPIENT = Reply(550, "5.1.1", "No such mailbox here")
RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied: recipient outside the trust space")
BAD_ADDRESS = Reply(553, "5.1.3", "Invalid address syntax")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message too big for system")
BARE_LINE_ENDING = Reply(550, "5.5.2", "Message refused: bare CR or LF in message data (RFC 5321 section 2.3.8)")
FROM_NOT_OWNED = Reply(550, "5.7.1", "From: header is not a mailbox of the authenticated user")
FROM_MISSING = Reply(550, "5.6.0", "Message has no valid From: header")
HEADER_MALFORMED = Reply(550, "5.6.0", "Message header is malformed")
HEADER_TOO_LARGE = Reply(552, "5.3.4", "Message header too large: too many fields or a field too long")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def internal_error() -> tuple[Reply, str]:
    """A temporary failure with an opaque reference for the log."""
    ref = secrets.token_hex(6).upper()
    return Reply(451, "4.3.0", f"Internal error, reference {ref}"), ref


def storage_full() -> tuple[Reply, str]:
    """RFC 5321 §4.2.3 / RFC 3463 4.3.1: no room to store the message now (disk or database full)."""
    ref = secrets.token_hex(6).upper()
    return Reply(452, "4.3.1", f"Insufficient system storage, try again later, reference {ref}"), ref


_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")

# Replies of aiosmtpd that carry no enhanced status code, or not the one RFC 3463 gives.
_LIBRARY_REPLIES = {
    "530 Must issue a STARTTLS command first": str(MUST_STARTTLS),
    "552 Error: Too much mail data": str(MESSAGE_TOO_BIG),
    "552 Error: message size exceeds fixed maximum message size": str(MESSAGE_TOO_BIG),
    "500 Command line too long": "500 5.5.2 Command line too long",
    "500 Error: bad syntax": "500 5.5.2 Syntax error",
    "500 Error: strict ASCII mode": "500 5.6.7 Non-ASCII data requires SMTPUTF8",
    "554 Command refused due to lack of security": "554 5.7.0 Command refused due to lack of security",
    "501 5.7.0 Auth aborted": str(AUTH_ABORTED),
    "538 5.7.11 Encryption required for requested authentication mechanism": str(MUST_STARTTLS),
}

_DEFAULT_ENHANCED = {"2": "2.0.0", "4": "4.0.0", "5": "5.5.0"}
_BY_CODE = {"500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4", "555": "5.5.4",
            "250": "2.0.0", "221": "2.0.0", "421": "4.4.2"}


def with_enhanced_code(line: str) -> str:
    """Give a reply line of the SMTP library an RFC 3463 code (we announce ENHANCEDSTATUSCODES)."""
    if line in _LIBRARY_REPLIES:
        return _LIBRARY_REPLIES[line]
    if len(line) < 4 or not line[:3].isdigit() or line[3] not in " -":
        return line
    code = line[:3]
    # RFC 2034 §3: no enhanced code on the greeting, EHLO/HELO lines, AUTH challenges, DATA go-ahead.
    if code in ("220", "334", "354") or line[3] == "-" or _HAS_ENHANCED.match(line):
        return line
    enhanced = _BY_CODE.get(code, _DEFAULT_ENHANCED.get(code[0]))
    if enhanced is None:
        return line
    text = line[4:]
    if text.startswith("Error: "):
        text = text[len("Error: "):]
    return f"{code} {enhanced} {text}"
