"""SMTP command parsing and dispatch under arbitrary input (mailserver/smtp_protocol.py, smtp_server.py).

Whatever the client sends, before or after AUTH, line by line or pipelined: well-formed replies only
(RFC 5321 §4.2: three digits, CRLF, no control character, no exception text), one reply per command line,
no hang, no exception at the connection boundary, and an envelope holding only a sender the user owns and
recipients the policy accepts (security matrix rows 11, 15, 27, 28).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailserver.dsn import parse_notify, parse_orcpt, xtext_decode
from mailserver.smtp_protocol import parse_params, split_path
from tests.fuzz.harness import (
    KNOWN_RECIPIENTS,
    SECOND_ADDRESS,
    SENDER,
    SMTP_COMMANDS,
    TRUSTED_DOMAIN,
    SmtpDriver,
    check_smtp,
    chunked,
    examples,
)

FUZZ = settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])

_ADDRESSES = st.sampled_from([
    SENDER, SECOND_ADDRESS.upper(), *sorted(KNOWN_RECIPIENTS), f"dr@{TRUSTED_DOMAIN}", "x@evil.test", "",
    "@relay.test:louis.bernard@caducee.localhost", "@a,@b:x@evil.test", '"a b"@caducee.localhost',
    "louis.bernard%evil.test@caducee.localhost", "louis.bernard@caducee.localhost.", "x@[127.0.0.1]",
    "a;rm -rf /@caducee.localhost", "$(id)@caducee.localhost", "é@caducee.localhost", "postmaster",
]) | st.text(max_size=30)
_KEYS = st.sampled_from(["SIZE", "BODY", "RET", "ENVID", "SMTPUTF8", "AUTH", "NOTIFY", "ORCPT", "X-VENDOR",
                         "size", "Ret", "notify", "-X", "", "="])
_VALUES = st.sampled_from([
    "1000", "0", "99999999999999999999999", "-1", "7BIT", "8BITMIME", "BINARYMIME", "FULL", "HDRS", "full",
    "SUCCESS,FAILURE", "NEVER", "NEVER,SUCCESS", "DELAY,,FAILURE", "rfc822;louis.bernard@caducee.localhost",
    "RFC822;a+2Bb", "utf-8;caf\\x{E9}@x", "utf-8;\\x{D800}", "+", "+ZZ", "a+2", "+00", "x" * 120, "",
    "<>", "=",
]) | st.text(max_size=20)


@st.composite
def _params(draw: st.DrawFn) -> str:
    out = []
    for _ in range(draw(st.integers(0, 4))):
        key, value = draw(_KEYS), draw(st.none() | _VALUES)
        out.append(key if value is None else f"{key}={value}")
    sep = draw(st.sampled_from([" ", "  ", "\t"]))
    return sep.join(out)


@st.composite
def _path_argument(draw: st.DrawFn, keyword: str) -> str:
    kw = draw(st.sampled_from([keyword, keyword.lower(), keyword.replace(":", " :"), keyword[:-1], ""]))
    address = draw(_ADDRESSES)
    opening, closing = draw(st.sampled_from([("<", ">"), ("", ""), ("<", ""), ("<<", ">>"), ("<", "> ")]))
    space = draw(st.sampled_from(["", " ", "  "]))
    params = draw(_params())
    return f"{kw}{space}{opening}{address}{closing}" + (f" {params}" if params else "")


_ENDINGS = st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r", b"\r\r\n", b""])


@st.composite
def command_line(draw: st.DrawFn) -> bytes:
    """One command line: a known verb with a plausible or hostile argument, or raw bytes."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=80)) + draw(_ENDINGS)
    verb = draw(st.sampled_from(SMTP_COMMANDS)).decode()
    verb = draw(st.sampled_from([verb, verb.lower(), verb.title()]))
    if verb.upper() == "MAIL":
        arg = draw(_path_argument("FROM:"))
    elif verb.upper() == "RCPT":
        arg = draw(_path_argument("TO:"))
    elif verb.upper() == "AUTH":
        arg = draw(st.sampled_from(["EXTERNAL", "EXTERNAL =", "EXTERNAL Y2FtaWxsZS5tYXJ0aW5AY2FkdWNlZS5sb2NhbGhvc3Q=",
                                    "EXTERNAL cmVmdXNl", "EXTERNAL !!", "PLAIN AGEAYg==", "LOGIN", "", "external *"]))
    elif verb.upper() in ("EHLO", "HELO"):
        arg = draw(st.sampled_from(["client.test", "", "[127.0.0.1]", "a b c", "x" * 300]) | st.text(max_size=20))
    else:
        arg = draw(st.sampled_from(["", "x", "  "]) | st.text(max_size=10))
    sep = draw(st.sampled_from([" ", "", "  ", "\t"]))
    line = (verb + (sep + arg if arg or sep else "")).encode("utf-8", "surrogateescape")
    return line + draw(_ENDINGS)


@st.composite
def data_body(draw: st.DrawFn) -> list[bytes]:
    """What follows an accepted DATA: header and body lines, hostile line endings, and the final dot."""
    lines = [f"From: {draw(st.sampled_from([SENDER, SECOND_ADDRESS, 'x@evil.test', '']))}\r\n".encode()]
    pieces = st.sampled_from([b"Subject: x\r\n", b"\r\n", b"texte\r\n", b"..\r\n", b".\n", b"\n.\n", b"a\rb\r\n",
                              b"MAIL FROM:<x@evil.test>\r\n", b"To: a@b\r\n", b" folded\r\n", b"\x00\r\n"])
    lines += draw(st.lists(pieces | st.binary(max_size=40), max_size=6))
    lines.append(draw(st.sampled_from([b".\r\n", b".\r\n", b"\r\n.\r\n", b".\n"])))
    return lines


_PRELUDES = st.sampled_from([
    (),
    (b"EHLO client.test\r\n",),
    (b"EHLO client.test\r\n", b"AUTH EXTERNAL =\r\n"),
    (b"EHLO client.test\r\n", b"AUTH EXTERNAL =\r\n", f"MAIL FROM:<{SENDER}>\r\n".encode()),
    (b"EHLO client.test\r\n", b"AUTH EXTERNAL =\r\n", f"MAIL FROM:<{SENDER}>\r\n".encode(),
     b"RCPT TO:<louis.bernard@caducee.localhost>\r\n", b"DATA\r\n"),
])


@st.composite
def session(draw: st.DrawFn) -> list[bytes]:
    lines = list(draw(_PRELUDES))
    if lines and lines[-1] == b"DATA\r\n":
        lines += draw(data_body())
    for _ in range(draw(st.integers(1, 8))):
        line = draw(command_line())
        lines.append(line)
        if line.rstrip(b"\r\n").upper() == b"DATA":
            lines += draw(data_body())
    return lines


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpDriver]:
    with SmtpDriver() as driver:
        yield driver


@FUZZ
@given(lines=session())
def test_submission_answers_every_command_line_well(smtp: SmtpDriver, lines: list[bytes]) -> None:
    run = smtp.run(lines, serial=True)
    assert check_smtp(run) == [], run.output.decode("utf-8", "replace")


@FUZZ
@given(lines=session(), sizes=st.lists(st.integers(1, 6), max_size=6))
def test_submission_survives_pipelined_input(smtp: SmtpDriver, lines: list[bytes], sizes: list[int]) -> None:
    run = smtp.run(chunked(lines, iter(sizes)), serial=False)
    assert check_smtp(run) == [], run.output.decode("utf-8", "replace")


@FUZZ
@given(lines=st.lists(command_line(), min_size=1, max_size=8))
def test_starttls_listener_before_tls(smtp: SmtpDriver, lines: list[bytes]) -> None:
    run = smtp.run(lines, starttls_listener=True, serial=True)
    assert check_smtp(run) == [], run.output.decode("utf-8", "replace")


@FUZZ
@given(st.text(max_size=120) | _params())
def test_parameter_parser_returns_a_mapping_or_none(text: str) -> None:
    params = parse_params(text)
    if params is not None:
        assert all(k == k.upper() and k for k in params)


@FUZZ
@given(st.text(max_size=120) | _path_argument("FROM:"), st.sampled_from(["FROM:", "TO:"]))
def test_path_splitter_returns_a_pair_or_none(arg: str, keyword: str) -> None:
    parsed = split_path(arg, keyword)
    if parsed is not None:
        path, _ = parsed
        assert "<" not in path and not any(c in path for c in " \t\r\n")


@FUZZ
@given(_VALUES | st.text(max_size=60))
def test_dsn_parameter_parsers_raise_only_value_error(value: str) -> None:
    for parse in (xtext_decode, parse_notify, parse_orcpt):
        try:
            parse(value)
        except ValueError:
            pass


# -- regressions found by fuzzing -----------------------------------------------------------------------------


def test_unrecognised_command_with_a_bare_cr_is_not_echoed_raw(smtp: SmtpDriver) -> None:
    """aiosmtpd echoes an unknown verb in its 500 reply; a bare CR (or another control character) in it
    made the reply line malformed (RFC 5321 §2.3.8, §4.2), and a client splitting on CR would read two
    replies."""
    run = smtp.run([b"EHLO client.test\r\n", b"A\rB\r\n", b"X\x00Y\x1b[0m\r\n"])
    assert check_smtp(run) == []
    assert b"\r" not in run.output.replace(b"\r\n", b"")
    assert b"\x00" not in run.output and b"\x1b" not in run.output


@pytest.mark.parametrize("argument", [b'"', b'"\\', b"<\"a", b"\xff\xfe", b"a\x00b"])
def test_vrfy_answers_252_without_parsing_the_argument(smtp: SmtpDriver, argument: bytes) -> None:
    """`VRFY "` raised IndexError in the address parser aiosmtpd uses (an internal error, 451), and an
    argument it could not parse was echoed back (`502 Could not VRFY ...`)."""
    run = smtp.run([b"EHLO client.test\r\n", b"AUTH EXTERNAL =\r\n", b"VRFY " + argument + b"\r\n"])
    assert check_smtp(run) == []
    assert run.output.splitlines()[-1] == b"252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"
    assert argument not in run.output


@pytest.mark.parametrize("lines", [
    [b"AUTH EXTERNAL\r\n", b"\xc2\x80\r\n"],
    [b"AUTH EXTERNAL \xc3\xa9\r\n"],
    [b"AUTH EXTERNAL\r\n", b"\xff=\r\n"],
])
def test_a_non_ascii_sasl_response_is_a_syntax_error(smtp: SmtpDriver, lines: list[bytes]) -> None:
    """base64.b64decode raises ValueError (not binascii.Error) on non-ASCII text: AUTH answered 451 (an
    internal error) instead of 501 5.5.2."""
    run = smtp.run([b"EHLO client.test\r\n", *lines])
    assert check_smtp(run) == []
    assert run.output.splitlines()[-1] == b"501 5.5.2 Cannot decode response"
