"""Message Disposition Notifications: the "accusé de lecture" of the trust space.

Pure functions, values in and bytes or values out: no socket, no database.

Implements:
- RFC 8098: the request (Disposition-Notification-To and -Options, §2.1–2.2, and when an MDN may be sent
  without asking the user), the message/disposition-notification fields (§3.2) and their reading;
- RFC 6522 multipart/report, RFC 3834 §5 (Auto-Submitted), RFC 2047 for the Subject;
- the MSSanté profile (ANS CI-SIS volet "Transmission au LPS de documents CDA provenant d'un courriel
  MSSanté", struct-msg-mdn and error-codes): integration error codes 900–906 carried as
  `processed/Error: <code>^<label>`, the `[KO Intégration système !][<code>]` subject prefix;
- the Direct Project's "dispatched" MDN with its X-DIRECT-FINAL-DESTINATION-DELIVERY field (read).

A report is never answered by another report: `report_kind` tells the server which messages are reports.
"""

from __future__ import annotations

import enum
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.message import Message
from email.utils import format_datetime, getaddresses
from typing import Literal

from mailserver.dsn import (
    MAX_LINE,
    _address_of,
    _ascii_text,
    _assemble_report,
    _check_mailbox,
    _clean_msg_id,
    _clean_text,
    _decode_words,
    _field,
    _fields_named,
    _find_report,
    _fold,
    _fold_text,
    _header_fields,
    _header_message,
    _in_reply_to,
    _new_message_id,
    _original_headers_part,
    _original_message_part,
    _parse_message,
    _payload,
    _qp,
    _report_blocks,
    _returned_message_id,
    _split_message,
)

__all__ = [
    "Disposition",
    "DispositionType",
    "MdnOption",
    "MdnReport",
    "MdnRequest",
    "MssErrorCode",
    "build_mdn",
    "mdn_request",
    "parse_mdn",
    "report_kind",
]

ActionMode = Literal["manual-action", "automatic-action"]
SendingMode = Literal["MDN-sent-manually", "MDN-sent-automatically"]
ErrorForm = Literal["modifier", "field"]

_ACTION_MODES: tuple[ActionMode, ...] = ("manual-action", "automatic-action")
_SENDING_MODES: tuple[SendingMode, ...] = ("MDN-sent-manually", "MDN-sent-automatically")


class MssErrorCode(enum.IntEnum):
    """MSSanté integration error codes (ANS volet CDA-courriel, table applicationErrorCondition)."""

    DOCUMENT_VERSION = 900
    AUTHOR_NOT_ALLOWED = 901
    UNKNOWN_PATIENT = 902
    INS_ABSENT = 903
    INS_MISMATCH = 904
    INS_INCOMPLETE = 905
    OTHER = 906

    @property
    def label(self) -> str:
        """The French label of the ANS table."""
        return _LABELS[self]

    @property
    def ascii_label(self) -> str:
        """The label without diacritics, for the US-ASCII fields of the report (RFC 8098 §3.1)."""
        decomposed = unicodedata.normalize("NFKD", self.label.replace("’", "'"))
        return "".join(ch for ch in decomposed if not unicodedata.combining(ch))

    @property
    def mdn_error(self) -> str:
        """The error string of the MSSanté MDN: "<code>^<label>"."""
        return f"{self.value}^{self.ascii_label}"


_LABELS = {
    MssErrorCode.DOCUMENT_VERSION: "Version du document incorrecte lors d'une demande de remplacement/suppression",
    MssErrorCode.AUTHOR_NOT_ALLOWED: "Auteur non autorisé à remplacer ou supprimer un document",
    MssErrorCode.UNKNOWN_PATIENT: "Identifiant patient inconnu",
    MssErrorCode.INS_ABSENT: "INS non présent dans le document",
    MssErrorCode.INS_MISMATCH: "L'INS transmis ne correspond pas exactement à celui stocké dans la base du "
                               "consommateur",
    MssErrorCode.INS_INCOMPLETE: "L'INS transmis n'est pas complet",
    MssErrorCode.OTHER: "Erreur 'Autre'",
}


class DispositionType(enum.Enum):
    """disposition-type (RFC 8098 §3.2.6.2). FAILED and DENIED come from RFC 3798, which RFC 8098
    obsoletes; Direct implementations still send "failed", so they are read (and may be written)."""

    DISPLAYED = "displayed"
    DELETED = "deleted"
    DISPATCHED = "dispatched"
    PROCESSED = "processed"
    FAILED = "failed"
    DENIED = "denied"


@dataclass(frozen=True)
class Disposition:
    """The Disposition field (RFC 8098 §3.2.6): how the message was handled, how the MDN was sent, and
    for MSSanté an integration error code."""

    action_mode: ActionMode
    sending_mode: SendingMode
    type: DispositionType
    error: MssErrorCode | None = None

    def __post_init__(self) -> None:
        if self.action_mode not in _ACTION_MODES:
            raise ValueError(f"action mode must be one of {', '.join(_ACTION_MODES)} (RFC 8098 §3.2.6.1)")
        if self.sending_mode not in _SENDING_MODES:
            raise ValueError(f"sending mode must be one of {', '.join(_SENDING_MODES)} (RFC 8098 §3.2.6.1)")

    @classmethod
    def automatic(cls, type: DispositionType, error: MssErrorCode | None = None) -> Disposition:
        """automatic-action/MDN-sent-automatically, as a platform sends after integration."""
        return cls("automatic-action", "MDN-sent-automatically", type, error)

    @classmethod
    def manual(cls, type: DispositionType, error: MssErrorCode | None = None) -> Disposition:
        """manual-action/MDN-sent-manually, after the user's explicit action and consent."""
        return cls("manual-action", "MDN-sent-manually", type, error)

    def render(self, error_form: ErrorForm = "modifier") -> str:
        """The field value. With an error, "modifier" gives the MSSanté form of the ANS volet before
        v1.1.3, which platforms read today (`processed/Error: 902^Identifiant patient inconnu`); "field"
        gives the RFC 8098 §3.2.6.3 form (`processed/error`) that the volet adopts from v1.1.3, the text
        then going in an Error field (§3.2.7)."""
        value = f"{self.action_mode}/{self.sending_mode}; {self.type.value}"
        if self.error is None:
            return value
        if error_form == "field":
            return value + "/error"
        return f"{value}/Error: {self.error.mdn_error}"

    def __str__(self) -> str:
        return self.render()


@dataclass(frozen=True)
class MdnOption:
    """One parameter of Disposition-Notification-Options (RFC 8098 §2.2)."""

    attribute: str
    importance: Literal["required", "optional"]
    values: tuple[str, ...]


# Options this implementation understands (RFC 8098 §2.2): the Direct "timely and reliable" request,
# which asks for a dispatched MDN once the message is in the final mailbox.
_UNDERSTOOD_OPTIONS = frozenset({"x-direct-final-destination-delivery"})


@dataclass(frozen=True)
class MdnRequest:
    """What a message asks for by way of MDN (RFC 8098 §2).

    `notify_to` holds the usable addresses of Disposition-Notification-To; `manual_reasons` says why an
    MDN must not be sent without the user's consent (empty when it may be sent automatically);
    `unsupported_required` names required options not understood, in which case no MDN may be sent at
    all (RFC 8098 §2.2).
    """

    notify_to: tuple[str, ...]
    options: tuple[MdnOption, ...]
    original_message_id: str | None
    return_path: str | None
    original_recipient: str | None
    subject: str | None
    manual_reasons: tuple[str, ...]
    unsupported_required: tuple[str, ...]

    @property
    def automatic_allowed(self) -> bool:
        """Whether an MDN may be sent without asking the user (RFC 8098 §2.1)."""
        return not self.manual_reasons and not self.unsupported_required

    @property
    def may_send(self) -> bool:
        """Whether any MDN may be sent, at least with the user's consent (RFC 8098 §2.2)."""
        return not self.unsupported_required


@dataclass(frozen=True)
class MdnReport:
    """A received disposition notification (RFC 8098 §3.2).

    Addresses come without their address type. `modifiers` are the disposition modifiers as written;
    `error_text` is the Error field (§3.2.7), else the text of an MSSanté `Error:` modifier, else an
    RFC 3798 Failure field (Direct "failed" notifications), and `disposition.error` its code when it
    is one of 900–906. `extension_fields` keeps the fields this module does not interpret, such as
    X-DIRECT-FINAL-DESTINATION-DELIVERY.
    """

    original_message_id: str | None
    final_recipient: str | None
    original_recipient: str | None
    reporting_ua: str | None
    disposition: Disposition
    modifiers: tuple[str, ...]
    error_text: str | None
    extension_fields: tuple[tuple[str, str], ...]

    @property
    def is_error(self) -> bool:
        """Whether the notification reports an error (error modifier, Error field, failed type)."""
        return (self.error_text is not None or self.disposition.type is DispositionType.FAILED
                or any(m.lower().startswith("error") for m in self.modifiers))


# --------------------------------------------------------------------------------------------------
# Which messages are reports
# --------------------------------------------------------------------------------------------------

_REPORT_KINDS: dict[str, Literal["dsn", "mdn"]] = {
    "delivery-status": "dsn",
    "global-delivery-status": "dsn",  # RFC 6533
    "disposition-notification": "mdn",
    "global-disposition-notification": "mdn",  # RFC 6533
}


def report_kind(data: bytes) -> Literal["dsn", "mdn"] | None:
    """"dsn" or "mdn" when `data` is a multipart/report of type delivery-status or
    disposition-notification (RFC 6522 §3), also when signed (multipart/signed around it); else None.

    The server never answers such a message with another report (RFC 3461 §6.2, RFC 8098 §2.1).
    """
    head = _header_message(data)
    if head is None:
        return None
    ctype = head.get_content_type()
    if ctype == "multipart/report":
        kind = str(head.get_param("report-type", "") or "").strip().lower()
        return _REPORT_KINDS.get(kind)
    if ctype != "multipart/signed":
        return None
    msg = _parse_message(data)
    payload = _payload(msg) if msg is not None else None
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        first = payload[0]
        if first.get_content_type() == "multipart/report":
            return _REPORT_KINDS.get(str(first.get_param("report-type", "") or "").strip().lower())
    return None


# --------------------------------------------------------------------------------------------------
# The request
# --------------------------------------------------------------------------------------------------


def _addr_spec_equal(a: str, b: str) -> bool:
    """RFC 8098 §2.1: local parts compared case-sensitively, domains case-insensitively."""
    local_a, _, domain_a = a.rpartition("@")
    local_b, _, domain_b = b.rpartition("@")
    return local_a == local_b and domain_a.lower() == domain_b.lower()


def _parse_options(values: Sequence[str]) -> tuple[MdnOption, ...]:
    """Disposition-Notification-Options (RFC 8098 §2.2): attribute=importance,value[,value] joined by ";".
    A parameter that does not follow the grammar is skipped."""
    options: list[MdnOption] = []
    for value in values:
        for param in value.split(";"):
            attribute, sep, rest = param.partition("=")
            attribute = attribute.strip()
            if not sep or not attribute:
                continue
            importance, *items = [v.strip() for v in rest.split(",")]
            importance = importance.lower()
            if importance not in ("required", "optional"):
                continue
            options.append(MdnOption(attribute, "required" if importance == "required" else "optional",
                                     tuple(items)))
    return tuple(options)


def _plain_address(address: str) -> str | None:
    try:
        return _check_mailbox(address, "address")
    except ValueError:
        return None


def mdn_request(original: bytes) -> MdnRequest | None:
    """The MDN request of `original` (RFC 8098 §2), or None when it asks for none: no usable
    Disposition-Notification-To, or it is itself a DSN or MDN (never answered by a report).

    An MDN may be sent automatically only when the message has exactly one Return-Path, whose address
    equals the single Disposition-Notification-To address (RFC 8098 §2.1); otherwise the reasons are
    listed in `manual_reasons` and the user must consent (manual sending). The message is identified by
    its Original-Message-ID header when a gateway that rewrote the Message-ID left one, else by its
    Message-ID (RFC 8098 §3.2.5).
    """
    if report_kind(original) is not None:
        return None
    header, _ = _split_message(original)
    fields = _header_fields(header)
    requested = _fields_named(fields, "Disposition-Notification-To")
    if not requested:
        return None
    parsed = [addr for _, addr in getaddresses(requested) if addr]
    notify_to = tuple(dict.fromkeys(a for a in (_plain_address(p) for p in parsed) if a is not None))
    if not notify_to:
        return None
    reasons: list[str] = []
    if any(_plain_address(p) is None for p in parsed):
        reasons.append("Disposition-Notification-To holds an address that cannot be answered "
                       "(not a plain US-ASCII mail address)")
    if len(notify_to) > 1:
        reasons.append("Disposition-Notification-To names more than one address (RFC 8098 §2.1)")
    return_paths = _fields_named(fields, "Return-Path")
    return_path: str | None = None
    if not return_paths:
        reasons.append("the message has no Return-Path, so the requester cannot be checked against the "
                       "envelope sender (RFC 8098 §2.1)")
    elif len(return_paths) > 1:
        reasons.append("the message has more than one Return-Path (RFC 8098 §2.1)")
    else:
        value = return_paths[0].strip()
        return_path = value[1:-1].strip() if value.startswith("<") and value.endswith(">") else value
        if len(notify_to) == 1 and not _addr_spec_equal(notify_to[0], return_path):
            reasons.append(f"Disposition-Notification-To ({notify_to[0]}) differs from Return-Path "
                           f"(<{return_path}>) (RFC 8098 §2.1)")
    options = _parse_options(_fields_named(fields, "Disposition-Notification-Options"))
    unsupported = tuple(o.attribute for o in options
                        if o.importance == "required" and o.attribute.lower() not in _UNDERSTOOD_OPTIONS)
    original_id = _field(fields, "Original-Message-ID") or _field(fields, "Message-ID")
    subject = _field(fields, "Subject")
    return MdnRequest(
        notify_to=notify_to,
        options=options,
        original_message_id=original_id or None,
        return_path=return_path,
        original_recipient=_address_of(_field(fields, "Original-Recipient")),
        subject=_clean_text(_decode_words(subject)) if subject is not None else None,
        manual_reasons=tuple(reasons),
        unsupported_required=unsupported,
    )


# --------------------------------------------------------------------------------------------------
# Building an MDN
# --------------------------------------------------------------------------------------------------

_DONE_FR = {
    DispositionType.DISPLAYED: "a été affiché",
    DispositionType.DELETED: "a été supprimé",
    DispositionType.DISPATCHED: "a été remis à sa destination finale",
    DispositionType.PROCESSED: "a été traité",
    DispositionType.FAILED: "n'a pas pu être traité",
    DispositionType.DENIED: "a été reçu, mais le destinataire refuse d'en accuser la lecture",
}
_DONE_EN = {
    DispositionType.DISPLAYED: "was displayed",
    DispositionType.DELETED: "was deleted",
    DispositionType.DISPATCHED: "was dispatched to its final destination",
    DispositionType.PROCESSED: "was processed",
    DispositionType.FAILED: "could not be processed",
    DispositionType.DENIED: "was received, but the recipient declines to acknowledge it",
}
_KO_PREFIX = "[KO Intégration système !]"
_XDM_SUBJECT = "XDM/1.0/DDM"


def _mdn_subject(subject: str | None, disposition: Disposition) -> str:
    """The MSSanté subjects for XDM documents (error: "[KO Intégration système !][902] <subject>";
    success: the subject itself); otherwise "Accusé de lecture / Disposition notification: <subject>"."""
    if disposition.error is not None:
        return f"{_KO_PREFIX}[{disposition.error.value}] {subject or ''}".rstrip()
    if subject and subject.startswith(_XDM_SUBJECT):
        return subject
    title = "Accusé de lecture / Disposition notification"
    return f"{title}: {subject}" if subject else title


def _human_mdn(
    request: MdnRequest, final_recipient: str, disposition: Disposition, original_date: str | None
) -> str:
    """The human-readable part: French, then English (RFC 8098 §3.1, RFC 6522 §3)."""
    ref = _clean_msg_id(request.original_message_id) or ""
    about_fr = f"le message {ref}".rstrip()
    about_en = f"The message {ref}".rstrip()
    if request.subject:
        about_fr += f" (« {request.subject} »)"
        about_en += f' ("{request.subject}")'
    if original_date:
        about_fr += f" du {original_date}"
        about_en += f" of {original_date}"
    fr = [f"Accusé de lecture : {about_fr}, adressé à {final_recipient}, "
          f"{_DONE_FR[disposition.type]}."]
    en = [f"Disposition notification: {about_en}, sent to {final_recipient}, "
          f"{_DONE_EN[disposition.type]}."]
    if disposition.type is DispositionType.DISPLAYED:
        fr.append("Cela ne garantit pas que le message a été lu ni compris.")
        en.append("This does not guarantee that the message was read or understood.")
    if disposition.error is not None:
        fr += ["", "Le message n'a pas pu être intégré automatiquement pour la raison suivante : "
                   f"{disposition.error.value} - {disposition.error.label}"]
        en += ["", "The message could not be integrated automatically, for this reason: "
                   f"{disposition.error.value} - {disposition.error.label}"]
    return "\r\n".join([*fr, "", "-" * 72, "", *en]) + "\r\n"


def build_mdn(
    *,
    original: bytes,
    final_recipient: str,
    reporting_ua: str,
    disposition: Disposition,
    from_addr: str,
    message_id_domain: str,
    original_recipient: str | None = None,
    error_form: ErrorForm = "modifier",
    return_original: bool = False,
) -> bytes:
    """Build the MDN (RFC 8098 §3, in an RFC 6522 multipart/report) for `original` as seen by the mailbox
    `final_recipient`.

    - To: every Disposition-Notification-To address; ValueError when the message asks for no MDN
      (`mdn_request` is None) or has a required option that is not understood (RFC 8098 §2.2).
      Whether the MDN may go without the user's consent is the caller's decision (`MdnRequest`).
    - `reporting_ua`: "ua-name; ua-product" (RFC 8098 §3.2.1), printable US-ASCII.
    - `original_recipient`: the address the sender used; by default the original's Original-Recipient
      header, and the field is left out without either (RFC 8098 §3.2.3).
    - `error_form`: where an MSSanté error code goes: "modifier" (`processed/Error: 902^...`, the form of
      the ANS volet before v1.1.3) or "field" (`processed/error`, the form of v1.1.3 and RFC 8098
      §3.2.6.3). The Error field (§3.2.7) carries the same "<code>^<label>" in both, so readers of
      either version find the code.
    - `return_original`: return the whole original as message/rfc822 (the ANS volet asks for it) when it
      is 7bit-clean; otherwise, and by default, its header block as text/rfc822-headers.

    Auto-Submitted: auto-replied (RFC 3834 §5) marks an MDN sent automatically: it answers a message, so
    "auto-generated" would be wrong; an MDN sent manually, with the user's consent, carries none.
    Returns CRLF, 7bit bytes with every line within 998 octets.
    """
    request = mdn_request(original)
    if request is None:
        raise ValueError("the message asks for no MDN: no usable Disposition-Notification-To, or it is "
                         "itself a report (RFC 8098 §2.1)")
    if not request.may_send:
        raise ValueError("the MDN request has required options that are not understood: "
                         f"{', '.join(request.unsupported_required)} (RFC 8098 §2.2)")
    _check_mailbox(final_recipient, "final_recipient")
    _check_mailbox(from_addr, "from_addr")
    if not reporting_ua or not all(" " <= ch <= "~" for ch in reporting_ua):
        raise ValueError("reporting_ua must be printable US-ASCII (RFC 8098 §3.2.1)")
    recipient_of_original = original_recipient or request.original_recipient
    if recipient_of_original is not None:
        _check_mailbox(recipient_of_original, "original_recipient")

    header, _ = _split_message(original)
    original_fields = _header_fields(header)
    parent = _clean_msg_id(request.original_message_id)
    date = _field(original_fields, "Date")

    top = [
        _fold("From", from_addr),
        _fold("To", ", ".join(request.notify_to)),
        _fold_text("Subject", _mdn_subject(request.subject, disposition)),
        _fold("Date", format_datetime(datetime.now(timezone.utc))),
        _fold("Message-ID", _new_message_id(message_id_domain)),
    ]
    if parent is not None:  # RFC 5322 §3.6.4
        top += [_fold("In-Reply-To", parent), _fold("References", parent)]
    if disposition.sending_mode == "MDN-sent-automatically":
        top.append("Auto-Submitted: auto-replied")  # RFC 3834 §5

    fields = [_fold("Reporting-UA", reporting_ua)]  # RFC 8098 §3.2.1
    if recipient_of_original is not None:
        fields.append(_fold("Original-Recipient", "rfc822;" + recipient_of_original))  # §3.2.3
    fields.append(_fold("Final-Recipient", "rfc822;" + final_recipient))  # §3.2.4
    if request.original_message_id:
        fields.append(_fold("Original-Message-ID", _ascii_text(request.original_message_id)))  # §3.2.5
    # Disposition and Error stay on one line (they fit in 998): MSSanté platforms read them line by line.
    fields.append(_fold("Disposition", disposition.render(error_form), width=MAX_LINE))  # §3.2.6
    if disposition.error is not None:
        fields.append(_fold("Error", disposition.error.mdn_error, width=MAX_LINE))  # §3.2.7
    notification = ("\r\n".join(fields) + "\r\n").encode("ascii")

    human = _qp(_human_mdn(request, final_recipient, disposition,
                           _ascii_text(date) if date else None))
    parts: list[tuple[Sequence[str], bytes]] = [
        (["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: quoted-printable"],
         human.encode("ascii")),
        (["Content-Type: message/disposition-notification"], notification),
    ]
    returned = _original_message_part(original) if return_original else None
    parts.append(returned if returned is not None else _original_headers_part(original))
    return _assemble_report(top, "disposition-notification", parts)


# --------------------------------------------------------------------------------------------------
# Reading an MDN
# --------------------------------------------------------------------------------------------------

_MDN_TYPES = frozenset({"disposition-notification", "global-disposition-notification"})
_MDN_PARTS = ("message/disposition-notification", "message/global-disposition-notification")
_KNOWN_FIELDS = frozenset({
    "reporting-ua", "mdn-gateway", "original-recipient", "final-recipient", "original-message-id",
    "disposition", "error", "failure",
})


def _parse_disposition(value: str) -> tuple[Disposition, tuple[str, ...]] | None:
    """Read a Disposition value (RFC 8098 §3.2.6), liberally: any case, any spacing; the MSSanté
    `Error: <code>^<label>` modifier; modes missing (read as automatic). None for an unknown type."""
    modes, sep, rest = value.partition(";")
    if not sep:
        modes, rest = "", value
    type_text, _, modifier_text = rest.partition("/")
    try:
        dtype = DispositionType(type_text.strip().lower())
    except ValueError:
        return None
    action_text, _, sending_text = modes.partition("/")
    default_action: ActionMode = "automatic-action"
    default_sending: SendingMode = "MDN-sent-automatically"
    action = next((m for m in _ACTION_MODES if m.lower() == action_text.strip().lower()), default_action)
    sending = next((m for m in _SENDING_MODES if m.lower() == sending_text.strip().lower()), default_sending)
    modifier_text = modifier_text.strip()
    if modifier_text.lower().startswith("error:"):
        modifiers: tuple[str, ...] = (modifier_text,)  # MSSanté: one modifier holding the error text
    else:
        modifiers = tuple(m.strip() for m in modifier_text.split(",") if m.strip())
    return Disposition(action, sending, dtype, None), modifiers


def _error_code(text: str | None) -> MssErrorCode | None:
    if not text:
        return None
    code, _, _ = text.strip().partition("^")
    code = code.strip()
    if len(code) == 3 and code.isdigit():
        try:
            return MssErrorCode(int(code))
        except ValueError:
            return None
    return None


def parse_mdn(data: bytes) -> MdnReport | None:
    """Read a disposition notification (RFC 8098 §3, RFC 6522); None when `data` is not one or has no
    Disposition of a known type.

    Liberal in what it reads: fields after the part's Content-Type without a blank line, a Final-Recipient
    without address type, extension fields (kept in `extension_fields`), the MSSanté error modifier and
    the RFC 8098 Error field.
    """
    msg = _parse_message(data)
    if msg is None:
        return None
    report = _find_report(msg, _MDN_TYPES)
    if report is None:
        return None
    payload = _payload(report)
    part = next((p for p in payload if isinstance(p, Message) and p.get_content_type() in _MDN_PARTS),
                None) if isinstance(payload, list) else None
    if part is None:
        return None
    fields = [f for block in _report_blocks(part) for f in block]
    disposition_text = _field(fields, "Disposition")
    parsed = _parse_disposition(disposition_text) if disposition_text else None
    if parsed is None:
        return None
    disposition, modifiers = parsed
    error_text = _field(fields, "Error")
    if error_text is None:
        legacy = next((m for m in modifiers if m.lower().startswith("error:")), None)
        error_text = legacy.partition(":")[2].strip() if legacy else _field(fields, "Failure")  # RFC 3798
    disposition = Disposition(disposition.action_mode, disposition.sending_mode, disposition.type,
                              _error_code(error_text))
    original_id = _field(fields, "Original-Message-ID")
    return MdnReport(
        original_message_id=original_id or _returned_message_id(report, part) or _in_reply_to(report, msg),
        final_recipient=_address_of(_field(fields, "Final-Recipient")),
        original_recipient=_address_of(_field(fields, "Original-Recipient")),
        reporting_ua=_field(fields, "Reporting-UA") or None,
        disposition=disposition,
        modifiers=modifiers,
        error_text=error_text or None,
        extension_fields=tuple((n, v) for n, v in fields if n.lower() not in _KNOWN_FIELDS),
    )

