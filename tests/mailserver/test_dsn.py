"""Delivery status notifications: RFC 3461 parameters, RFC 3464 reports built and read back, real reports."""

from __future__ import annotations

import email
import re
from datetime import datetime, timedelta, timezone
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailserver.dsn import (
    FULL_RETURN_LIMIT,
    Action,
    DsnReport,
    Notify,
    RecipientStatus,
    build_dsn,
    format_orcpt,
    never_report_to,
    parse_dsn,
    parse_notify,
    parse_orcpt,
    should_report,
    validate_envid,
    validate_ret,
    xtext_decode,
    xtext_encode,
)
from mailserver.mdn import report_kind

FIXTURES = Path(__file__).parent.parent / "fixtures" / "mime" / "dsn"
NOW = datetime(2024, 2, 20, 0, 19, tzinfo=timezone.utc)
XTEXT = re.compile(r"^(?:[!-*,-<>-~]|\+[0-9A-F]{2})*$")  # RFC 3461 §4
BARE_LINE_ENDING = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def original_message(subject: str = "XDM/1.0/DDM+COMPTE RENDU", body: bytes = b"Secret clinical text\r\n",
                     message_id: str = "<20240219230100.23456@chb.mssante.fr>") -> bytes:
    return (
        "Return-Path: <medecin@chb.mssante.fr>\r\n"
        "From: Dr Martin <medecin@chb.mssante.fr>\r\n"
        "To: service@chu.mssante.fr\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: {message_id}\r\n"
        "Date: Mon, 19 Feb 2024 23:01:00 +0100\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
    ).encode() + body


def build(recipients: list[RecipientStatus], *, original: bytes | None = None, ret: str | None = None,
          envid: str | None = "QQ314159") -> bytes:
    return build_dsn(
        original=original_message() if original is None else original,
        reporting_mta="mx.chu.mssante.fr", postmaster="mailer-daemon@chu.mssante.fr",
        to="medecin@chb.mssante.fr", envid=envid, ret=ret, arrival_date=NOW, recipients=recipients,
        message_id_domain="chu.mssante.fr",
    )


def failed(address: str = "inconnu@chu.mssante.fr") -> RecipientStatus:
    return RecipientStatus(final_recipient=address, action=Action.FAILED, status="5.1.1",
                           original_recipient=format_orcpt(address),
                           diagnostic="smtp; 550 5.1.1 <inconnu@chu.mssante.fr>: no such mailbox",
                           remote_mta="mx2.chu.mssante.fr", last_attempt=NOW)


def delivered(address: str = "service@chu.mssante.fr") -> RecipientStatus:
    return RecipientStatus(final_recipient=address, action=Action.DELIVERED, status="2.0.0")


def assert_wire_safe(data: bytes) -> None:
    """7bit, CRLF only, no line over 998 octets (RFC 5322 §2.1.1, RFC 2045 §2.7)."""
    assert data.isascii()
    assert BARE_LINE_ENDING.search(data) is None
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def stdlib_parts(data: bytes) -> tuple[EmailMessage, list[EmailMessage]]:
    msg = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    parts = list(msg.iter_parts())
    assert msg.defects == [] and all(p.defects == [] for p in msg.walk())
    return msg, parts  # type: ignore[return-value]


# -- RFC 3461 §4: xtext ------------------------------------------------------------------------------


def test_xtext_encodes_plus_equals_and_non_graphic_octets() -> None:
    assert xtext_encode("bob+tag=x@example.org") == "bob+2Btag+3Dx@example.org"
    assert xtext_encode("a b\t") == "a+20b+09"
    assert xtext_encode("é") == "+C3+A9"


def test_xtext_decode_accepts_lower_case_hex_and_rejects_what_is_not_xtext() -> None:
    assert xtext_decode("bob+2btag+3Dx") == "bob+tag=x"
    for bad in ("a=b", "a b", "a+2", "a+ZZ", "caf\u00e9", "+FF"):
        with pytest.raises(ValueError):
            xtext_decode(bad)


@given(st.text(max_size=200))
def test_xtext_round_trips_any_text(value: str) -> None:
    encoded = xtext_encode(value)
    assert XTEXT.match(encoded)
    assert xtext_decode(encoded) == value


# -- RFC 3461 §4.1: NOTIFY ---------------------------------------------------------------------------


def test_parse_notify_reads_lists_in_any_case() -> None:
    assert parse_notify("SUCCESS,FAILURE") == {Notify.SUCCESS, Notify.FAILURE}
    assert parse_notify("delay , Failure") == {Notify.DELAY, Notify.FAILURE}
    assert parse_notify("NEVER") == {Notify.NEVER}


@pytest.mark.parametrize("value", ["NEVER,SUCCESS", "FAILURE,NEVER", "", "SUCCESS,", "SOMETIMES"])
def test_parse_notify_refuses_never_with_others_and_unknown_words(value: str) -> None:
    with pytest.raises(ValueError):
        parse_notify(value)


@pytest.mark.parametrize(
    ("notify", "action", "expected"),
    [
        (None, Action.FAILED, True),  # absent NOTIFY: FAILURE,DELAY (our choice within RFC 3461 §4.1)
        (None, Action.DELAYED, True),
        (None, Action.DELIVERED, False),
        (None, Action.RELAYED, False),
        ("SUCCESS", Action.DELIVERED, True),
        ("SUCCESS", Action.RELAYED, True),
        ("SUCCESS", Action.EXPANDED, True),
        ("SUCCESS", Action.FAILED, False),
        ("FAILURE", Action.DELAYED, False),
        ("DELAY", Action.DELAYED, True),
        ("SUCCESS,FAILURE,DELAY", Action.FAILED, True),
        ("NEVER", Action.FAILED, False),
        ("NEVER", Action.DELIVERED, False),
    ],
)
def test_should_report_follows_notify(notify: str | None, action: Action, expected: bool) -> None:
    assert should_report(parse_notify(notify) if notify else None, action) is expected


def test_never_report_to_the_null_reverse_path() -> None:
    assert never_report_to("")
    assert never_report_to("<>")
    assert not never_report_to("medecin@chb.mssante.fr")


# -- RFC 3461 §4.2–4.4: ORCPT, ENVID, RET --------------------------------------------------------------


def test_parse_orcpt_decodes_xtext_and_lowercases_the_type() -> None:
    assert parse_orcpt("rfc822;bob+2Bcardio@example.org") == ("rfc822", "bob+cardio@example.org")
    assert parse_orcpt("RFC822;a@b.fr") == ("rfc822", "a@b.fr")
    assert parse_orcpt("utf-8;ren\\x{E9}@exemple.fr") == ("utf-8", "rené@exemple.fr")


@pytest.mark.parametrize("value", ["a@b.fr", ";a@b.fr", "rfc822;", "rfc822;a b@c", "rfc 822;a@b",
                                   "rfc822;" + "a" * 500])
def test_parse_orcpt_refuses_malformed_values(value: str) -> None:
    with pytest.raises(ValueError):
        parse_orcpt(value)


def test_format_orcpt_uses_the_utf8_type_beyond_ascii() -> None:
    assert format_orcpt("bob+x@example.org") == "rfc822;bob+2Bx@example.org"
    encoded = format_orcpt("rené@exemple.fr")
    assert encoded.startswith("utf-8;") and encoded.isascii()
    assert parse_orcpt(encoded) == ("utf-8", "rené@exemple.fr")


@given(st.from_regex(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~é-]{1,30}@[a-z0-9-]{1,20}\.fr", fullmatch=True))
def test_orcpt_round_trips(address: str) -> None:
    assert parse_orcpt(format_orcpt(address))[1] == address


def test_validate_envid_decodes_and_checks_length_and_characters() -> None:
    assert validate_envid("QQ314159") == "QQ314159"
    assert validate_envid("a+2Bb") == "a+b"
    for bad in ("", "x" * 101, "a+0Ab", "a=b"):
        with pytest.raises(ValueError):
            validate_envid(bad)


def test_validate_ret() -> None:
    assert validate_ret("full") == "FULL"
    assert validate_ret("HDRS") == "HDRS"
    with pytest.raises(ValueError):
        validate_ret("BODY")


# -- RecipientStatus ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "status"),
    [(Action.FAILED, "4.4.1"), (Action.DELAYED, "5.1.1"), (Action.DELIVERED, "5.0.0"), (Action.FAILED, "5.1"),
     (Action.FAILED, "550"), (Action.RELAYED, "2.0.0x")],
)
def test_recipient_status_checks_the_status_against_the_action(action: Action, status: str) -> None:
    with pytest.raises(ValueError):
        RecipientStatus(final_recipient="a@b.fr", action=action, status=status)


def test_recipient_status_refuses_naive_dates_bad_orcpt_and_non_addresses() -> None:
    with pytest.raises(ValueError):
        RecipientStatus("a@b.fr", Action.FAILED, "5.0.0", last_attempt=datetime(2024, 1, 1))
    with pytest.raises(ValueError):
        RecipientStatus("a@b.fr", Action.FAILED, "5.0.0", original_recipient="a@b.fr")
    with pytest.raises(ValueError):
        RecipientStatus("not an address", Action.FAILED, "5.0.0")
    with pytest.raises(ValueError):
        RecipientStatus("a@b.fr", Action.FAILED, "5.0.0", remote_mta="bad host\r\nX-Injected: 1")


# -- Building ----------------------------------------------------------------------------------------


def test_failure_report_structure_and_top_level_fields() -> None:
    data = build([failed()])
    assert_wire_safe(data)
    msg, parts = stdlib_parts(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status",
                                                     "text/rfc822-headers"]
    assert msg["Subject"] == "Avis de non-remise / Delivery Status Notification (Failure)"
    assert msg["From"].addresses[0].addr_spec == "mailer-daemon@chu.mssante.fr"
    assert msg["To"] == "medecin@chb.mssante.fr"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<20240219230100.23456@chb.mssante.fr>"
    assert msg["References"] == "<20240219230100.23456@chb.mssante.fr>"
    assert msg["MIME-Version"] == "1.0"
    assert re.fullmatch(r"<\d+\.[0-9a-f]{24}@chu\.mssante\.fr>", msg["Message-ID"])
    assert msg["Date"].datetime.tzinfo is not None
    assert report_kind(data) == "dsn"


def test_delivery_status_fields_follow_rfc3464() -> None:
    data = build([failed(), RecipientStatus("bob+cardio@chu.mssante.fr", Action.DELAYED, "4.4.1",
                                            original_recipient="rfc822;bob+2Bcardio@chu.mssante.fr",
                                            diagnostic="451 4.4.1 try again later",
                                            last_attempt=NOW, will_retry_until=NOW + timedelta(days=5))])
    text = data.decode("ascii")
    per_message = ("Reporting-MTA: dns; mx.chu.mssante.fr\r\nOriginal-Envelope-Id: QQ314159\r\n"
                   "Arrival-Date: Tue, 20 Feb 2024 00:19:00 +0000\r\n\r\n")
    assert per_message in text
    assert ("Original-Recipient: rfc822;inconnu@chu.mssante.fr\r\nFinal-Recipient: rfc822;inconnu@chu.mssante.fr"
            "\r\nAction: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mx2.chu.mssante.fr\r\n") in text
    assert "Diagnostic-Code: smtp; 550 5.1.1 <inconnu@chu.mssante.fr>: no such mailbox\r\n" in text
    # the ORCPT is decoded from xtext; a diagnostic without type gets "smtp;"
    assert "Original-Recipient: rfc822;bob+cardio@chu.mssante.fr\r\n" in text
    assert "Diagnostic-Code: smtp; 451 4.4.1 try again later\r\n" in text
    assert "Will-Retry-Until: Sun, 25 Feb 2024 00:19:00 +0000\r\n" in text
    assert "Subject: Avis de non-remise" in text  # the most serious action names the report


@pytest.mark.parametrize(
    ("recipient", "subject", "french"),
    [
        (RecipientStatus("a@chu.mssante.fr", Action.DELIVERED, "2.0.0"),
         "Accusé de réception / Delivery Status Notification (Success)",
         "Accusé de réception : votre message a été remis dans la boîte aux lettres de :"),
        (RecipientStatus("a@chu.mssante.fr", Action.RELAYED, "2.0.0"),
         "Message relayé / Delivery Status Notification (Relayed)", "sa remise finale ne sera pas confirmée"),
        (RecipientStatus("a@chu.mssante.fr", Action.DELAYED, "4.4.1", will_retry_until=NOW),
         "Remise différée / Delivery Status Notification (Delay)", "Remise différée : votre message"),
        (RecipientStatus("a@chu.mssante.fr", Action.FAILED, "5.1.1", diagnostic="smtp; 550 5.1.1 unknown"),
         "Avis de non-remise / Delivery Status Notification (Failure)", "Réponse du serveur : 550 5.1.1 unknown"),
    ],
)
def test_subject_and_human_part_in_french_then_english(recipient: RecipientStatus, subject: str,
                                                        french: str) -> None:
    msg, parts = stdlib_parts(build([recipient]))
    assert msg["Subject"] == subject
    human = parts[0]
    assert human["Content-Transfer-Encoding"] == "quoted-printable"
    assert human.get_content_charset() == "utf-8"
    text = human.get_content()
    assert french in text
    assert text.index("Ceci est un message automatique") < text.index("This is an automatic message")
    assert "a@chu.mssante.fr" in text


def test_headers_only_by_default_and_never_the_body() -> None:
    body = b"Le patient DUPONT presente une fracture\r\n"
    for ret in (None, "HDRS"):
        data = build([failed()], original=original_message(body=body), ret=ret)
        assert b"DUPONT" not in data
        _, parts = stdlib_parts(data)
        assert parts[2].get_content_type() == "text/rfc822-headers"
        assert "Subject: XDM/1.0/DDM+COMPTE RENDU" in parts[2].get_content()


def test_ret_full_returns_the_whole_original_on_failure_but_not_in_the_human_part() -> None:
    original = original_message(body=b"Le patient DUPONT\r\n")
    data = build([failed()], original=original, ret="FULL")
    _, parts = stdlib_parts(data)
    assert parts[2].get_content_type() == "message/rfc822"
    returned = parts[2].get_payload(0)
    assert isinstance(returned, EmailMessage)
    assert returned["Message-ID"] == "<20240219230100.23456@chb.mssante.fr>"
    assert returned.get_content().rstrip("\r\n") == "Le patient DUPONT"
    assert "DUPONT" not in parts[0].get_content()


def test_ret_full_success_reports_return_headers_only_above_the_limit() -> None:
    small = original_message(body=b"x" * 100 + b"\r\n")
    big = original_message(body=(b"y" * 76 + b"\r\n") * (FULL_RETURN_LIMIT // 78 + 10))
    assert len(big) > FULL_RETURN_LIMIT
    _, parts = stdlib_parts(build([delivered()], original=small, ret="FULL"))
    assert parts[2].get_content_type() == "message/rfc822"
    for action, status in ((Action.DELIVERED, "2.0.0"), (Action.DELAYED, "4.0.0")):
        data = build([RecipientStatus("a@chu.mssante.fr", action, status)], original=big, ret="FULL")
        assert len(data) < 10_000
        assert stdlib_parts(data)[1][2].get_content_type() == "text/rfc822-headers"
    data = build([failed()], original=big, ret="FULL")  # a failure returns it whatever the size
    assert len(data) > FULL_RETURN_LIMIT
    assert stdlib_parts(data)[1][2].get_content_type() == "message/rfc822"


def test_an_8bit_original_is_returned_as_quoted_printable_headers() -> None:
    original = original_message(subject="Compte rendu échographie", body="Données\r\n".encode())
    data = build([failed()], original=original, ret="FULL")
    assert_wire_safe(data)
    _, parts = stdlib_parts(data)
    headers = parts[2]
    assert headers.get_content_type() == "text/rfc822-headers"
    assert headers["Content-Transfer-Encoding"] == "quoted-printable"
    assert headers.get_payload(decode=True) == original.split(b"\r\n\r\n")[0] + b"\r\n"


def test_lf_only_original_and_long_header_lines_stay_wire_safe() -> None:
    original = (b"From: a@b.fr\nX-Long: " + b"z" * 3000 + b"\nMessage-ID: <lf@b.fr>\n\nbody\n")
    data = build([failed()], original=original, ret="HDRS")
    assert_wire_safe(data)
    report = parse_dsn(data)
    assert report is not None and report.original_message_id == "<lf@b.fr>"


def test_untrusted_diagnostics_cannot_break_out_of_their_field() -> None:
    evil = "smtp; 550 no\r\nX-Injected: yes\r\n\r\nbody é \x00 " + "w" * 3000
    data = build([RecipientStatus("a@chu.mssante.fr", Action.FAILED, "5.0.0", diagnostic=evil)])
    assert_wire_safe(data)
    assert b"\r\nX-Injected" not in data
    report = parse_dsn(data)
    assert report is not None
    diagnostic = report.recipients[0].diagnostic
    # line breaks and NUL become spaces, non-ASCII "?", and the 3000-octet word is cut to fit a line
    assert diagnostic == "smtp; 550 no X-Injected: yes body ? " + "w" * 900


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"to": ""}, "null reverse-path"),
        ({"to": "<>"}, "null reverse-path"),
        ({"to": "rené@exemple.fr"}, "US-ASCII"),
        ({"to": "a@b.fr\r\nBcc: x@y.fr"}, "plain mail address"),
        ({"recipients": []}, "at least one recipient"),
        ({"arrival_date": datetime(2024, 1, 1)}, "timezone-aware"),
        ({"envid": "a=b"}, "xtext"),
        ({"ret": "BODY"}, "RET"),
        ({"reporting_mta": "mx\r\nX: y"}, "host name"),
        ({"message_id_domain": "bad domain"}, "domain"),
    ],
)
def test_build_refuses_bad_arguments(change: dict[str, object], message: str) -> None:
    args: dict[str, object] = dict(
        original=original_message(), reporting_mta="mx.chu.mssante.fr", postmaster="mailer-daemon@chu.mssante.fr",
        to="medecin@chb.mssante.fr", envid=None, ret=None, arrival_date=NOW, recipients=[failed()],
        message_id_domain="chu.mssante.fr",
    )
    args.update(change)
    with pytest.raises(ValueError, match=message):
        build_dsn(**args)  # type: ignore[arg-type]


def test_build_then_parse_round_trips() -> None:
    recipients = [
        failed(),
        RecipientStatus("rené@chu.mssante.fr", Action.DELAYED, "4.2.2", original_recipient=None,
                        diagnostic="smtp; 452 4.2.2 mailbox full", last_attempt=NOW,
                        will_retry_until=NOW + timedelta(days=4)),
        delivered(),
    ]
    report = parse_dsn(build(recipients, envid="QQ+2B314159"))
    assert isinstance(report, DsnReport)
    assert (report.reporting_mta, report.original_envelope_id, report.arrival_date, report.original_message_id) \
        == ("mx.chu.mssante.fr", "QQ+314159", NOW, "<20240219230100.23456@chb.mssante.fr>")
    assert [(r.final_recipient, r.original_recipient, r.action, r.status, r.diagnostic, r.remote_mta,
             r.last_attempt, r.will_retry_until) for r in report.recipients] == [
        ("inconnu@chu.mssante.fr", "inconnu@chu.mssante.fr", Action.FAILED, "5.1.1",
         "smtp; 550 5.1.1 <inconnu@chu.mssante.fr>: no such mailbox", "mx2.chu.mssante.fr", NOW, None),
        ("rené@chu.mssante.fr", None, Action.DELAYED, "4.2.2", "smtp; 452 4.2.2 mailbox full", None, NOW,
         NOW + timedelta(days=4)),
        ("service@chu.mssante.fr", None, Action.DELIVERED, "2.0.0", None, None, None, None),
    ]


def test_message_without_message_id_gives_no_in_reply_to() -> None:
    original = b"From: a@b.fr\r\nSubject: x\r\n\r\nbody\r\n"
    msg, _ = stdlib_parts(build([failed()], original=original))
    assert msg["In-Reply-To"] is None and msg["References"] is None
    report = parse_dsn(build([failed()], original=original))
    assert report is not None and report.original_message_id is None


ADDRESSES = st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,15}@[a-z0-9-]{1,12}\.(fr|org|mssante\.fr)", fullmatch=True) | \
    st.from_regex(r"[a-zé][a-zé0-9.]{0,10}@[a-z]{1,8}\.fr", fullmatch=True)
DIAGNOSTICS = st.none() | st.from_regex(r"[!-~][ -~]{0,150}", fullmatch=True)


@st.composite
def recipient_statuses(draw: st.DrawFn) -> RecipientStatus:
    action = draw(st.sampled_from(list(Action)))
    first = {Action.FAILED: "5", Action.DELAYED: "4"}.get(action, "2")
    status = f"{first}.{draw(st.integers(0, 999))}.{draw(st.integers(0, 999))}"
    address = draw(ADDRESSES)
    orcpt = draw(st.none() | ADDRESSES.map(format_orcpt))
    retry = NOW + timedelta(hours=draw(st.integers(1, 200))) if action is Action.DELAYED else None
    return RecipientStatus(address, action, status, orcpt, draw(DIAGNOSTICS),
                           draw(st.none() | st.just("mx.example.org")),
                           draw(st.none() | st.just(NOW)), retry)


SUBJECTS = st.text(st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")), max_size=120)


@settings(max_examples=60, deadline=None)
@given(st.lists(recipient_statuses(), min_size=1, max_size=5), SUBJECTS, st.sampled_from([None, "FULL", "HDRS"]))
def test_property_build_parse_round_trip(recipients: list[RecipientStatus], subject: str, ret: str | None) -> None:
    original = original_message(subject="x").replace(b"Subject: x", b"Subject: " + subject.encode("utf-8"))
    data = build(recipients, original=original, ret=ret)
    assert_wire_safe(data)
    _, parts = stdlib_parts(data)
    assert [p.get_content_type() for p in parts][:2] == ["text/plain", "message/delivery-status"]
    report = parse_dsn(data)
    assert report is not None
    assert report.original_message_id == "<20240219230100.23456@chb.mssante.fr>"
    assert len(report.recipients) == len(recipients)
    for sent, got in zip(recipients, report.recipients, strict=True):
        assert got.final_recipient == sent.final_recipient
        assert got.action is sent.action and got.status == sent.status
        assert got.original_recipient == (parse_orcpt(sent.original_recipient)[1] if sent.original_recipient
                                          else None)
        if sent.diagnostic is None:
            assert got.diagnostic is None
        else:
            text = " ".join(sent.diagnostic.split())
            expected = text if re.match(r"^[A-Za-z][A-Za-z0-9-]*\s*;", text) else "smtp; " + text
            assert got.diagnostic == " ".join(expected.split())
        assert got.will_retry_until == sent.will_retry_until
    returned = parts[2]
    if returned.get_content_type() == "text/rfc822-headers":
        assert returned.get_payload(decode=True) == original.split(b"\r\n\r\n")[0] + b"\r\n"


# -- Real reports ------------------------------------------------------------------------------------


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@pytest.mark.parametrize(
    ("name", "mta", "message_id", "final", "original", "action", "status", "diagnostic"),
    [
        ("directri_gateway_DSNMessage.eml", "Example.ORG", None, "Carol@Ivory.EDU", "Carol@Ivory.EDU",
         Action.FAILED, "5.0.0", "smtp; 550 error - no such recipient"),
        # Exchange: blank lines inside the report, no space after the colon, no Final-Recipient, no Action
        ("mimekit_delivery-status-multiple-blank-lines.eml", "someserver.com", None, None,
         "orig_recip@customer.com", Action.FAILED, "5.5.0", "smtp;550 Requested action not taken"),
        # 1996 report with no Status, no opening boundary before the human text
        ("mimekit_delivery-status.eml", "mm1", "<31FC7EB4.41C6@netscape.com>", "newsletter-request@imusic.com",
         None, Action.FAILED, None, "X-LOCAL; 500 (err.nosuchuser)"),
        ("mimekit_delivery-status-no-blank-line.eml", "mm1", "<31FC7EB4.41C6@netscape.com>",
         "newsletter-request@imusic.com", None, Action.FAILED, None, "X-LOCAL; 500 (err.nosuchuser)"),
        ("mimekit_delivery-status2.eml", "smtp-out.dis-hosting.net", None, "source@domain.com", None,
         Action.FAILED, "5.0.0", None),
        ("sisimai_lhost-postfix-01.eml", "p351355.pool.example.ne.jp", None, "r@p351355.pool.example.ne.jp",
         "kijitora@example.org", Action.FAILED, "5.1.1",
         "x-unix; procmail: Couldn't create \"/var/spool/mail/neko\" id: r.example.org: No such user"),
        ("sisimai_rfc3464-01.eml", "smtpgw.example.jp", "<E1C50F1B-1C83-4820-BC36-AC6FBFBE8568@example.org>",
         "userunknown@bouncehammer.jp", None, Action.FAILED, "5.1.1",
         "SMTP; 550 5.1.1 <userunknown@bouncehammer.jp>... User Unknown"),
    ],
)
def test_real_reports(name: str, mta: str, message_id: str | None, final: str | None, original: str | None,
                      action: Action, status: str | None, diagnostic: str | None) -> None:
    data = fixture(name)
    assert report_kind(data) == "dsn"
    report = parse_dsn(data)
    assert report is not None
    assert report.reporting_mta == mta
    assert report.original_message_id == message_id
    assert len(report.recipients) == 1
    r = report.recipients[0]
    assert (r.final_recipient, r.original_recipient, r.action, r.status, r.diagnostic) == (
        final, original, action, status, diagnostic)


def test_real_report_details() -> None:
    sisimai = parse_dsn(fixture("sisimai_rfc3464-01.eml"))
    assert sisimai is not None
    assert sisimai.arrival_date == datetime(2013, 10, 16, 14, 15, 34, tzinfo=timezone(timedelta(hours=9)))
    assert sisimai.recipients[0].remote_mta == "mx.bouncehammer.jp"
    assert sisimai.recipients[0].last_attempt == datetime(2013, 10, 16, 14, 15, 35,
                                                          tzinfo=timezone(timedelta(hours=9)))
    direct = parse_dsn(fixture("directri_gateway_DSNMessage.eml"))
    assert direct is not None and direct.original_envelope_id == "QQ314159"
    assert direct.recipients[0].extension_fields == (("SMTP-Remote-Recipient", "Carol@Ivory.EDU"),)


def test_parse_dsn_is_none_for_other_messages() -> None:
    assert parse_dsn(original_message()) is None
    mdn = (FIXTURES.parent / "mdn" / "directri_gateway_MDNMessage_processed.eml").read_bytes()
    assert parse_dsn(mdn) is None
    assert parse_dsn(b"") is None
    assert parse_dsn(b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n--x--\r\n") \
        is None
