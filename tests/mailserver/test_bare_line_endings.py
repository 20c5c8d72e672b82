"""Bare CR and LF detection (RFC 5321 §2.3.8; SMTP smuggling): the counting check against a regular
expression that states the rule directly."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from mailserver.policy import has_bare_line_ending

RULE = re.compile(rb"\r(?!\n)|(?<!\r)\n")  # a CR not followed by LF, or an LF not preceded by CR

# Bytes biased towards CR, LF and dots, where the cases are.
pieces = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a", b"\r\n.\r\n", b"\n.\n", b"\r.\r"]), max_size=30)


@settings(max_examples=2000)
@given(pieces.map(b"".join))
def test_counting_agrees_with_the_rule(content: bytes) -> None:
    assert has_bare_line_ending(content) == (RULE.search(content) is not None)


def test_known_smuggling_forms_are_caught() -> None:
    for form in (b"x\n.\nMAIL FROM", b"x\r.\rMAIL", b"x\r\n.\nMAIL", b"x\n.\r\n", b"a\rb"):
        assert has_bare_line_ending(b"Subject: s\r\n\r\n" + form + b"\r\n")
    assert not has_bare_line_ending(b"Subject: s\r\n\r\nbody\r\n.. dot-stuffed\r\n")
