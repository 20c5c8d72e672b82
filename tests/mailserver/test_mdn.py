"""Message disposition notifications: requests, MSSanté error codes, MDNs built and read back, real MDNs."""

from __future__ import annotations

import email
import re
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailserver.mdn import (
    Disposition,
    DispositionType,
    MdnOption,
    MssErrorCode,
    build_mdn,
    mdn_request,
    parse_mdn,
    report_kind,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "mime"
BARE_LINE_ENDING = re.compile(rb"\r(?!\n)|(?<!\r)\n")
ORIGINAL_ID = "<20240219230100.23456@chb.mssante.fr>"


def original_message(*, notify_to: str | None = "pfi@chb.mssante.fr",
                     return_path: str | None = "<pfi@chb.mssante.fr>", subject: str = "XDM/1.0/DDM+ECHOGRAPHIE",
                     extra: str = "", body: bytes = b"Compte rendu du patient DUPONT\r\n") -> bytes:
    lines = []
    if return_path is not None:
        lines.append(f"Return-Path: {return_path}")
    lines += ["From: PFI <pfi@chb.mssante.fr>", "To: service-auto@chu.mssante.fr", f"Subject: {subject}",
              f"Message-ID: {ORIGINAL_ID}", "Date: Mon, 19 Feb 2024 23:01:00 +0100", "MIME-Version: 1.0"]
    if notify_to is not None:
        lines.append(f"Disposition-Notification-To: {notify_to}")
    head = "\r\n".join(lines) + "\r\n" + extra
    return head.encode("utf-8") + b"\r\n" + body


def build(disposition: Disposition, original: bytes | None = None, **kwargs: object) -> bytes:
    return build_mdn(
        original=original_message() if original is None else original,
        final_recipient="service-auto@chu.mssante.fr", reporting_ua="pfi.chu.mssante.fr; Caducee",
        disposition=disposition, from_addr="service-auto@chu.mssante.fr", message_id_domain="chu.mssante.fr",
        **kwargs,  # type: ignore[arg-type]
    )


def assert_wire_safe(data: bytes) -> None:
    assert data.isascii()
    assert BARE_LINE_ENDING.search(data) is None
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def stdlib(data: bytes) -> tuple[EmailMessage, list[EmailMessage]]:
    msg = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg.defects == [] and all(p.defects == [] for p in msg.walk())
    return msg, list(msg.iter_parts())  # type: ignore[arg-type]


# -- MSSanté error codes and the Disposition field ---------------------------------------------------


def test_error_codes_carry_the_ans_labels() -> None:
    assert [c.value for c in MssErrorCode] == list(range(900, 907))
    assert MssErrorCode(902).label == "Identifiant patient inconnu"
    assert MssErrorCode.INS_ABSENT.label == "INS non présent dans le document"
    assert MssErrorCode.AUTHOR_NOT_ALLOWED.label == "Auteur non autorisé à remplacer ou supprimer un document"
    assert MssErrorCode.AUTHOR_NOT_ALLOWED.ascii_label == "Auteur non autorise a remplacer ou supprimer un document"
    assert MssErrorCode.INS_INCOMPLETE.mdn_error == "905^L'INS transmis n'est pas complet"
    assert all(c.ascii_label.isascii() for c in MssErrorCode)


def test_disposition_renders_the_mssante_forms() -> None:
    ok = Disposition.automatic(DispositionType.PROCESSED)
    assert str(ok) == "automatic-action/MDN-sent-automatically; processed"
    ko = Disposition.automatic(DispositionType.PROCESSED, MssErrorCode.UNKNOWN_PATIENT)
    assert str(ko) == "automatic-action/MDN-sent-automatically; processed/Error: 902^Identifiant patient inconnu"
    assert ko.render("field") == "automatic-action/MDN-sent-automatically; processed/error"
    assert str(Disposition.manual(DispositionType.DISPLAYED)) == "manual-action/MDN-sent-manually; displayed"


def test_disposition_refuses_unknown_modes() -> None:
    with pytest.raises(ValueError):
        Disposition("automatic", "MDN-sent-automatically", DispositionType.PROCESSED)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Disposition("manual-action", "sent", DispositionType.PROCESSED)  # type: ignore[arg-type]


# -- The request (RFC 8098 §2) -----------------------------------------------------------------------


def test_request_with_matching_return_path_may_be_answered_automatically() -> None:
    request = mdn_request(original_message(notify_to="PFI <pfi@CHB.MSSANTE.FR>"))
    assert request is not None
    assert request.notify_to == ("pfi@CHB.MSSANTE.FR",)
    assert request.return_path == "pfi@chb.mssante.fr"
    assert request.original_message_id == ORIGINAL_ID
    assert request.subject == "XDM/1.0/DDM+ECHOGRAPHIE"
    assert request.automatic_allowed and request.may_send and request.manual_reasons == ()


@pytest.mark.parametrize(
    ("notify_to", "return_path", "extra", "reason"),
    [
        ("autre@chb.mssante.fr", "<pfi@chb.mssante.fr>", "", "differs from Return-Path"),
        ("PFI@chb.mssante.fr", "<pfi@chb.mssante.fr>", "", "differs from Return-Path"),  # local part: exact
        ("pfi@chb.mssante.fr", "<>", "", "differs from Return-Path"),
        ("pfi@chb.mssante.fr", None, "", "no Return-Path"),
        ("pfi@chb.mssante.fr", "<pfi@chb.mssante.fr>", "Return-Path: <pfi@chb.mssante.fr>\r\n",
         "more than one Return-Path"),
        ("pfi@chb.mssante.fr, secretariat@chb.mssante.fr", "<pfi@chb.mssante.fr>", "", "more than one address"),
        ("pfi@chb.mssante.fr, <rené@chb.mssante.fr>", "<pfi@chb.mssante.fr>", "", "cannot be answered"),
    ],
)
def test_request_that_needs_the_users_consent(notify_to: str, return_path: str | None, extra: str,
                                              reason: str) -> None:
    request = mdn_request(original_message(notify_to=notify_to, return_path=return_path, extra=extra))
    assert request is not None
    assert not request.automatic_allowed
    assert request.may_send
    assert any(reason in r for r in request.manual_reasons)


def test_no_request_without_the_header_or_for_a_report() -> None:
    assert mdn_request(original_message(notify_to=None)) is None
    assert mdn_request(original_message(notify_to="not an address")) is None
    assert mdn_request((FIXTURES / "mdn" / "directri_monitor_MDNMessage.eml").read_bytes()) is None


def test_request_options_required_and_understood() -> None:
    direct = "Disposition-Notification-Options: X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true\r\n"
    request = mdn_request(original_message(extra=direct))
    assert request is not None and request.automatic_allowed
    assert request.options == (MdnOption("X-DIRECT-FINAL-DESTINATION-DELIVERY", "optional", ("true",)),)
    unknown = "Disposition-Notification-Options: signed-receipt-protocol=required,pkcs7-signature; x=optional,a,b\r\n"
    request = mdn_request(original_message(extra=unknown))
    assert request is not None
    assert request.unsupported_required == ("signed-receipt-protocol",)
    assert not request.may_send and not request.automatic_allowed
    assert request.options[1] == MdnOption("x", "optional", ("a", "b"))
    with pytest.raises(ValueError, match=r"RFC 8098 §2\.2"):
        build(Disposition.automatic(DispositionType.PROCESSED), original_message(extra=unknown))


def test_real_request_without_return_path() -> None:
    request = mdn_request((FIXTURES / "mdn" / "directri_agent_raw1_plain_with_DispositionNotificationTo.eml")
                          .read_bytes())
    assert request is not None
    assert request.notify_to == ("llindsey+readreceipt@messaging.cernerdemos.com",)
    assert request.original_message_id == \
        "<928790364.150.1275928451709.JavaMail.llindsey@cernhsvmail03.cernerasp.com>"
    assert request.subject == "test image"
    assert not request.automatic_allowed and "no Return-Path" in request.manual_reasons[0]


# -- Building (RFC 8098 §3) --------------------------------------------------------------------------


def test_mdn_structure_and_fields() -> None:
    data = build(Disposition.automatic(DispositionType.PROCESSED),
                 original_message(extra="Original-Recipient: rfc822;service@chu.mssante.fr\r\n"))
    assert_wire_safe(data)
    msg, parts = stdlib(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "disposition-notification"
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/disposition-notification",
                                                     "text/rfc822-headers"]
    assert msg["To"] == "pfi@chb.mssante.fr"
    assert msg["From"] == "service-auto@chu.mssante.fr"
    assert msg["Subject"] == "XDM/1.0/DDM+ECHOGRAPHIE"  # MSSanté: the XDM subject itself on success
    assert msg["In-Reply-To"] == ORIGINAL_ID and msg["References"] == ORIGINAL_ID
    assert msg["Auto-Submitted"] == "auto-replied"
    text = data.decode("ascii")
    assert ("\r\n\r\nReporting-UA: pfi.chu.mssante.fr; Caducee\r\n"
            "Original-Recipient: rfc822;service@chu.mssante.fr\r\n"
            "Final-Recipient: rfc822;service-auto@chu.mssante.fr\r\n"
            f"Original-Message-ID: {ORIGINAL_ID}\r\n"
            "Disposition: automatic-action/MDN-sent-automatically; processed\r\n\r\n") in text
    assert "Error:" not in text
    assert b"DUPONT" not in data  # headers only by default
    assert report_kind(data) == "mdn"


def test_mdn_with_an_mssante_error() -> None:
    data = build(Disposition.automatic(DispositionType.PROCESSED, MssErrorCode.DOCUMENT_VERSION))
    assert_wire_safe(data)
    msg, parts = stdlib(data)
    assert msg["Subject"] == "[KO Intégration système !][900] XDM/1.0/DDM+ECHOGRAPHIE"
    text = data.decode("ascii")
    label = "Version du document incorrecte lors d'une demande de remplacement/suppression"
    assert f"\r\nDisposition: automatic-action/MDN-sent-automatically; processed/Error: 900^{label}\r\n" in text
    assert f"\r\nError: 900^{label}\r\n" in text
    assert "pour la raison suivante : 900 - Version du document incorrecte" in parts[0].get_content()
    report = parse_mdn(data)
    assert report is not None
    assert report.disposition.error is MssErrorCode.DOCUMENT_VERSION
    assert report.error_text == f"900^{label}" and report.is_error


def test_mdn_error_in_the_rfc8098_form() -> None:
    data = build(Disposition.automatic(DispositionType.PROCESSED, MssErrorCode.INS_MISMATCH), error_form="field")
    text = data.decode("ascii")
    assert "\r\nDisposition: automatic-action/MDN-sent-automatically; processed/error\r\n" in text
    assert "\r\nError: 904^L'INS transmis ne correspond pas exactement a celui stocke dans la base du" in text
    report = parse_mdn(data)
    assert report is not None and report.modifiers == ("error",)
    assert report.disposition.error is MssErrorCode.INS_MISMATCH


def test_manual_mdn_carries_no_auto_submitted_and_generic_subject() -> None:
    data = build(Disposition.manual(DispositionType.DISPLAYED), original_message(subject="Résultats de biologie"))
    msg, parts = stdlib(data)
    assert msg["Auto-Submitted"] is None
    assert msg["Subject"] == "Accusé de lecture / Disposition notification: Résultats de biologie"
    human = parts[0].get_content()
    assert human.index("Accusé de lecture : le message") < human.index("Disposition notification: The message")
    assert "a été affiché" in human and "was displayed" in human
    assert "ne garantit pas que le message a été lu" in human
    report = parse_mdn(data)
    assert report is not None and report.disposition == Disposition.manual(DispositionType.DISPLAYED)


def test_return_original_gives_the_whole_message_when_it_is_7bit() -> None:
    _, parts = stdlib(build(Disposition.automatic(DispositionType.PROCESSED), return_original=True))
    assert parts[2].get_content_type() == "message/rfc822"
    returned = parts[2].get_payload(0)
    assert isinstance(returned, EmailMessage) and "DUPONT" in returned.get_content()
    eight_bit = original_message(body="Données\r\n".encode())
    _, parts = stdlib(build(Disposition.automatic(DispositionType.PROCESSED), eight_bit, return_original=True))
    assert parts[2].get_content_type() == "text/rfc822-headers"


def test_explicit_original_recipient_wins() -> None:
    data = build(Disposition.automatic(DispositionType.DISPATCHED), original_recipient="bal@chu.mssante.fr")
    report = parse_mdn(data)
    assert report is not None
    assert report.original_recipient == "bal@chu.mssante.fr"
    assert report.disposition.type is DispositionType.DISPATCHED


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"original": original_message(notify_to=None)}, "asks for no MDN"),
        ({"final_recipient": "bad address"}, "final_recipient"),
        ({"from_addr": "a@b.fr\r\nBcc: x@y.fr"}, "from_addr"),
        ({"reporting_ua": "ua\r\nX-Injected: 1"}, "reporting_ua"),
        ({"reporting_ua": "Caducée"}, "reporting_ua"),
        ({"message_id_domain": "bad domain"}, "domain"),
    ],
)
def test_build_refuses_bad_arguments(change: dict[str, object], message: str) -> None:
    args: dict[str, object] = dict(
        original=original_message(), final_recipient="service-auto@chu.mssante.fr", reporting_ua="ua.example.fr",
        disposition=Disposition.automatic(DispositionType.PROCESSED), from_addr="service-auto@chu.mssante.fr",
        message_id_domain="chu.mssante.fr",
    )
    args.update(change)
    with pytest.raises(ValueError, match=message):
        build_mdn(**args)  # type: ignore[arg-type]


SUBJECTS = st.text(st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")), max_size=150)


def encoded_subject(subject: str) -> str:
    """The subject as one RFC 2047 B encoded-word, as a sending client may write it."""
    import base64

    return "=?utf-8?b?" + base64.b64encode(subject.encode("utf-8")).decode("ascii") + "?="


@settings(max_examples=80, deadline=None)
@given(SUBJECTS, st.sampled_from(list(DispositionType)), st.none() | st.sampled_from(list(MssErrorCode)),
       st.booleans(), st.sampled_from(["modifier", "field"]))
def test_property_build_parse_round_trip(subject: str, dtype: DispositionType, error: MssErrorCode | None,
                                         manual: bool, error_form: str) -> None:
    disposition = Disposition.manual(dtype, error) if manual else Disposition.automatic(dtype, error)
    data = build(disposition, original_message(subject=encoded_subject(subject)), error_form=error_form)
    assert_wire_safe(data)
    msg, _ = stdlib(data)
    clean = re.sub(" {2,}", " ", subject).strip(" ")
    if error is not None:
        expected = f"[KO Intégration système !][{error.value}] {clean}".rstrip()
    elif clean.startswith("XDM/1.0/DDM"):
        expected = clean
    else:
        expected = "Accusé de lecture / Disposition notification" + (f": {clean}" if clean else "")
    assert msg["Subject"] == expected
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if b"=?utf-8?q?" in line:
            assert len(line) <= 76  # RFC 2047 §2
    assert (msg["Auto-Submitted"] == "auto-replied") is (not manual)
    report = parse_mdn(data)
    assert report is not None
    assert report.disposition == disposition
    assert report.final_recipient == "service-auto@chu.mssante.fr"
    assert report.original_message_id == ORIGINAL_ID
    assert report.reporting_ua == "pfi.chu.mssante.fr; Caducee"
    assert report.error_text == (error.mdn_error if error else None)
    assert report_kind(data) == "mdn"


# -- Real MDNs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dtype", "final", "message_id", "ua"),
    [
        ("directri_gateway_MDNMessage_processed.eml", DispositionType.PROCESSED, "externUser1@starugh-stateline.com",
         "<9501051053.aa04167@IETF.CNR I.Reston.VA.US>", "starugh-stateline.com;NHIN Direct Security Agent"),
        ("directri_monitor_MDNMessage.eml", DispositionType.PROCESSED, "externUser1@starugh-stateline.com",
         "<9501051053.aa04167@IETF.CNR I.Reston.VA.US>", "starugh-stateline.com;NHIN Direct Security Agent"),
        ("directri_agent_MDNMessageNonCanonicalized.eml", DispositionType.PROCESSED,
         "llindsey@messaging.cernerdemos.com", "<9501051053.aa04167@IETF.CNR I.Reston.VA.US>",
         "starugh-stateline.com;NHIN Direct Security Agent"),
        ("directri_gateway_MDNDispatchedMessage.eml", DispositionType.DISPATCHED,
         "externUser1@starugh-stateline.com", "<9501051053.aa04167@IETF.CNR I.Reston.VA.US>",
         "starugh-stateline.com;NHIN Direct Security Agent"),
        # fields straight after the part's Content-Type, no Final-Recipient, no closing boundary
        ("directri_agent_MDNResponse.eml", DispositionType.PROCESSED, None, None,
         "messaging.cerner.com;Security Agent"),
    ],
)
def test_real_mdns(name: str, dtype: DispositionType, final: str | None, message_id: str | None, ua: str) -> None:
    data = (FIXTURES / "mdn" / name).read_bytes()
    assert report_kind(data) == "mdn"
    report = parse_mdn(data)
    assert report is not None
    assert report.disposition == Disposition("automatic-action", "MDN-sent-automatically", dtype, None)
    assert (report.final_recipient, report.original_message_id, report.reporting_ua) == (final, message_id, ua)
    assert not report.is_error


def test_direct_dispatched_mdn_keeps_its_extension_field() -> None:
    report = parse_mdn((FIXTURES / "mdn" / "directri_gateway_MDNDispatchedMessage.eml").read_bytes())
    assert report is not None
    assert report.extension_fields == (("X-DIRECT-FINAL-DESTINATION-DELIVERY", ""),)


LEGACY_MSSANTE_MDN = (
    "From: service-auto@chu.mssante.fr\r\n"
    "To: pfi@chb.mssante.fr\r\n"
    "Subject: [KO Int=?utf-8?q?=C3=A9?=gration]\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: multipart/report; report-type=disposition-notification; boundary=\"b1\"\r\n"
    "\r\n"
    "--b1\r\n"
    "Content-Type: text/plain; charset=UTF-8\r\n"
    "\r\n"
    "Le document n'a pas pu etre integre.\r\n"
    "--b1\r\n"
    "Content-Type: message/disposition-notification\r\n"
    "\r\n"
    "Original-Recipient: rfc822;service-auto@chu.mssante.fr \r\n"
    "Final-Recipient: rfc822; service-auto@chu.mssante.fr\r\n"
    "Original-Message-ID: <20240219230100.23456@chb.mssante.fr>\r\n"
    "Disposition:Automatic-Action/MDN-Sent-Automatically; Processed/Error: 902^Identifiant de patient "
    "inconnu^applicationErrorCondition| E^Error^errorSeverity\r\n"
    "--b1--\r\n"
).encode("ascii")


def test_legacy_mssante_error_modifier_with_hl7_err_string() -> None:
    report = parse_mdn(LEGACY_MSSANTE_MDN)
    assert report is not None
    assert report.disposition == Disposition.automatic(DispositionType.PROCESSED, MssErrorCode.UNKNOWN_PATIENT)
    assert report.final_recipient == "service-auto@chu.mssante.fr"
    assert report.original_recipient == "service-auto@chu.mssante.fr"
    assert report.error_text is not None and report.error_text.startswith("902^Identifiant de patient inconnu")


def test_parse_mdn_is_none_for_other_messages() -> None:
    assert parse_mdn(original_message()) is None
    assert parse_mdn((FIXTURES / "dsn" / "sisimai_rfc3464-01.eml").read_bytes()) is None
    no_disposition = LEGACY_MSSANTE_MDN.replace(b"Disposition:", b"X-Disposition:")
    assert parse_mdn(no_disposition) is None
    unknown_type = LEGACY_MSSANTE_MDN.replace(b"Processed/", b"Frobbed/")
    assert parse_mdn(unknown_type) is None


# -- report_kind -------------------------------------------------------------------------------------


def test_report_kind() -> None:
    assert report_kind(original_message()) is None
    assert report_kind(b"") is None
    assert report_kind(b"Content-Type: multipart/report; report-type=feedback-report; boundary=x\r\n\r\n") is None
    assert report_kind(b"Content-Type: Multipart/Report; Report-Type=\"Delivery-Status\"; boundary=x\r\n\r\n") \
        == "dsn"
    signed = (
        b"Content-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; micalg=sha-256; boundary=s\r\n"
        b"\r\n--s\r\n" + LEGACY_MSSANTE_MDN + b"\r\n--s\r\nContent-Type: application/pkcs7-signature\r\n\r\nAAAA\r\n"
        b"--s--\r\n"
    )
    assert report_kind(signed) == "mdn"
    assert parse_mdn(signed) is not None


def test_deeply_nested_messages_are_not_reports() -> None:
    deep = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(3000))
    assert report_kind(deep) is None
    assert parse_mdn(deep) is None
    assert mdn_request(deep) is None


def test_rfc3798_failed_notification_reads_as_an_error() -> None:
    failed = LEGACY_MSSANTE_MDN.replace(
        b"Disposition:Automatic-Action/MDN-Sent-Automatically; Processed/Error: 902^Identifiant de patient "
        b"inconnu^applicationErrorCondition| E^Error^errorSeverity\r\n",
        b"Disposition: automatic-action/MDN-sent-automatically; failed\r\nFailure: decryption failed\r\n"
        b"Warning: not a real warning\r\n")
    report = parse_mdn(failed)
    assert report is not None
    assert report.disposition.type is DispositionType.FAILED and report.disposition.error is None
    assert report.error_text == "decryption failed" and report.is_error
    assert report.extension_fields == (("Warning", "not a real warning"),)
