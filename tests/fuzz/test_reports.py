"""Delivery and disposition reports read from the network (mailserver/dsn.py, mailserver/mdn.py).

`parse_dsn`, `parse_mdn`, `report_kind` and `mdn_request` read messages any peer may send: their documented
outcome is a value or None ("not a report"), never an exception (security matrix rows 12–14).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.harness import check_reports, examples

FUZZ = settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIXTURES = Path(__file__).parent.parent / "fixtures" / "mime"
SEEDS = tuple(sorted(p.read_bytes() for p in FIXTURES.glob("*/*.eml")))

_VALUE = st.sampled_from([
    "dns; mx.chu.mssante.fr", "rfc822; louis@chu.mssante.fr", "rfc822;", "utf-8; caf\\x{E9}@chu.fr", "utf-8; \\x{D800}",
    "x400; /C=FR/", "failed", "delivered", "delayed", "relayed", "expanded", "FAILED", "5.1.1", "2.0.0", "9.9.9",
    "5.1", "5.1.1.1", "smtp; 550 5.1.1 unknown", "Mon, 19 Feb 2024 23:01:00 +0100", "Mon, 99 Foo 2024 99:99:99",
    "<id@x>", "<<>>", "<", "automatic-action/MDN-sent-automatically; displayed",
    "manual-action/MDN-sent-manually; processed/error", "automatic-action/MDN-sent-automatically; processed/Error: 906^KO",
    "x/y; deleted", "; ;", "displayed", "pfi.chu.mssante.fr; Caducee", "=?utf-8?q?R=C3=A9sultats?=", "=?x?q?",
    "=?utf-8?b?!!?=", "<pfi@chb.mssante.fr>", "pfi@chb.mssante.fr, x@y", "signed-receipt-protocol=optional,pkcs7-signature",
    "auto-replied", "", " ", "\t",
]) | st.text(max_size=40)
_NAMES = st.sampled_from([
    "Reporting-MTA", "Original-Envelope-Id", "Arrival-Date", "Final-Recipient", "Original-Recipient", "Action",
    "Status", "Diagnostic-Code", "Remote-MTA", "Last-Attempt-Date", "Will-Retry-Until", "Disposition",
    "Original-Message-ID", "Reporting-UA", "Error", "Failure", "MDN-Gateway", "X-DIRECT-FINAL-DESTINATION-DELIVERY",
    "X-Custom", "Content-Type", "Message-ID", "In-Reply-To", "References", "Subject", "From", "To", "Return-Path",
    "Disposition-Notification-To", "Disposition-Notification-Options", "Auto-Submitted", "Content-Transfer-Encoding",
    "MIME-Version", "", " ", "Final-Recipient ",
])
_CTYPES = st.sampled_from([
    'multipart/report; report-type=delivery-status; boundary="B"', "multipart/report; report-type=disposition-notification; boundary=B",
    "multipart/report; boundary=B", "multipart/report; report-type=delivery-status", "multipart/mixed; boundary=B",
    "message/delivery-status", "message/disposition-notification", "message/global-delivery-status",
    "text/rfc822-headers", "message/rfc822", "text/plain; charset=utf-8", "text/plain; charset=bogus",
    "multipart/report; report-type=delivery-status; boundary=\"\"", "multipart/report; report-type=delivery-status; boundary=B; boundary=C",
])
_ENCODINGS = st.sampled_from(["", "base64", "quoted-printable", "7bit", "8bit", "x-uuencode", "binary"])
_EOL = st.sampled_from(["\r\n"] * 6 + ["\n", "\r"])


@st.composite
def _fields(draw: st.DrawFn) -> str:
    eol = draw(_EOL)
    out = []
    for _ in range(draw(st.integers(0, 8))):
        name, value = draw(_NAMES), draw(_VALUE)
        sep = draw(st.sampled_from([": ", ":", " : ", ""]))
        out.append(f"{name}{sep}{value}")
        if draw(st.integers(0, 5)) == 0:
            out.append(draw(st.sampled_from(["", " folded", "\tmore"])))
    return eol.join(out) + eol


@st.composite
def _part(draw: st.DrawFn, depth: int = 0) -> str:
    eol = draw(_EOL)
    ctype = draw(_CTYPES)
    head = f"Content-Type: {ctype}{eol}"
    if enc := draw(_ENCODINGS):
        head += f"Content-Transfer-Encoding: {enc}{eol}"
    if "multipart" in ctype and depth < 3:
        parts = draw(st.lists(_part(depth + 1), max_size=3))
        body = "".join(f"--B{eol}{p}{eol}" for p in parts) + draw(st.sampled_from(["--B--", "--B", "", "--C--"])) + eol
    else:
        body = draw(_fields()) + draw(st.sampled_from(["", eol])) + draw(_fields())
        if enc == "base64" and draw(st.booleans()):
            import base64

            body = base64.b64encode(body.encode("utf-8", "surrogatepass")).decode() + draw(st.sampled_from(["", "!", "="]))
    blank = draw(st.sampled_from([eol, eol, ""]))
    return head + blank + body


@st.composite
def report(draw: st.DrawFn) -> bytes:
    """A message shaped like a DSN or an MDN: header fields, then nested MIME parts with report fields."""
    top = draw(_fields())
    text = top + draw(_part())
    return text.encode("utf-8", "surrogatepass")


@st.composite
def mutated_seed(draw: st.DrawFn) -> bytes:
    """A real report (tests/fixtures/mime) with a few bytes replaced, inserted or cut."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.integers(0, 3))
        chunk = draw(st.binary(min_size=1, max_size=16) | st.sampled_from(
            [b"\r\n", b"\r\n\r\n", b"--", b":", b";", b"=?utf-8?q?", b"\x00", b"\xff", b"boundary=", b"Content-Type: "]))
        if op == 0:
            data[at:at + len(chunk)] = chunk
        elif op == 1:
            data[at:at] = chunk
        elif op == 2:
            del data[at:at + draw(st.integers(1, 200))]
        else:
            data = data[:at]
    return bytes(data)


@FUZZ
@given(report() | mutated_seed() | st.binary(max_size=400))
def test_report_readers_return_a_value_or_none(data: bytes) -> None:
    assert check_reports(data) == []


def test_the_seed_reports_are_read() -> None:
    from mailserver.dsn import parse_dsn
    from mailserver.mdn import parse_mdn

    assert len(SEEDS) >= 10
    assert sum(parse_dsn(s) is not None or parse_mdn(s) is not None for s in SEEDS) >= 10


# -- regressions found by fuzzing -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [b"delivery-status", b"disposition-notification"])
@pytest.mark.parametrize("charset", [b"us-\x00\x00cii", b"idna"])
def test_a_charset_the_stdlib_cannot_decode_with_is_not_a_crash(kind: bytes, charset: bytes) -> None:
    """email.message.Message.get_payload() decodes a non-ASCII text payload with the declared charset and
    catches only LookupError: a charset holding a NUL raised ValueError ("embedded null character") and
    `idna` UnicodeError out of parse_dsn and parse_mdn, here on a multipart/report without a boundary
    (found by atheris, fuzz/dsn_mdn.py)."""
    data = (b"Content-Type: multipart/report; report-type=" + kind + b'; charset="' + charset + b'"\r\n\r\n'
            b"Rapport \xe9\r\n")
    assert check_reports(data) == []
